"""Rows in, token ids out: loading JSONL files and `datasets` folders, checking columns, encoding prompts.

A row is a dict. Its `prompt_column` holds plain text or chat messages; every other column rides
along to the reward functions untouched.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

# defined in types, so that lower layers (the run directory, model loading) can raise them too
from grpokit.core.types import DataError, InputWarning

if TYPE_CHECKING:
    import torch

# Names the trainer passes to every reward function (rewards.REWARD_INPUTS); a data set column may not shadow them.
RESERVED_COLUMNS = (
    "prompts",
    "completions",
    "completion_ids",
    "completion_lengths",
    "truncated",
    "raw_prompts",
    "rendered_prompts",
    # TRL's objects rather than data: the run's TrainerState and the two logging functions
    "trainer_state",
    "log_metric",
    "log_extra",
)


# Roles the chat templates of transformers models know; anything else is a typo a template would drop or reject.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class Rows(list):
    """Rows read from a file: a list of dicts that remembers where it came from, for error messages."""

    def __init__(self, rows: list[dict[str, Any]], source: str, lines: list[int] | None = None):
        super().__init__(rows)
        self.source, self.lines = source, lines


def where(rows: list[dict[str, Any]], i: int, source: str) -> str:
    """`SOURCE, row I` (rows count from 0, as in `datasets`), with the line of a JSONL file."""
    line = f" (line {rows.lines[i]})" if isinstance(rows, Rows) and rows.lines else ""
    return f"{getattr(rows, 'source', source)}, row {i}{line}"


def load_rows(path: str | Path, *, field: str = "train_data") -> list[dict[str, Any]]:
    """A JSONL file (one JSON object per line) or a JSON array of objects, a .parquet or .csv file, or a folder
    written by `datasets.Dataset.save_to_disk`."""
    from grpokit.model.loading import is_hub_id

    if is_hub_id(path):
        return _hub_rows(str(path), field)
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"config field `{field}`: {path} does not exist (a JSONL file, a `datasets` folder, or org/name)"
        )
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise DataError(f"config field `{field}`: {path} is not a `datasets` folder ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            raise DataError(f"{path} holds splits {list(data)}; point `{field}` at one split's folder")
        return Rows([dict(row) for row in data], f"{field} {path}")
    if path.suffix.lower() in TABLE_READERS:
        return _table_rows(path, field)
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"config field `{field}`: {path} is UTF-16 (its byte-order mark says so); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as err:
        raise DataError(
            f"config field `{field}`: {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
            "train and eval data are JSONL, a JSON array, .parquet, .csv or a `datasets` folder"
        ) from None
    if text.lstrip().startswith("["):  # a JSON array of rows, as `datasets` reads .json too; not a line per row
        return _array_rows(text, path, field)
    rows, lines = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = _strict_json(line, path, line_no)
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
        lines.append(line_no)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return Rows(rows, f"{field} {path}", lines)


# Tables read with pyarrow (what `datasets` reads them with), straight into rows: no `datasets` cache folder.
TABLE_READERS = {".parquet": "pyarrow.parquet:read_table", ".csv": "pyarrow.csv:read_csv"}


def _table_rows(path: Path, field: str) -> Rows:
    """A .parquet / .csv file's rows (row numbers count from 0, as in `datasets`), checked as any other rows."""
    import importlib

    module, function = TABLE_READERS[path.suffix.lower()].split(":")
    try:
        if path.suffix.lower() == ".csv":
            table = _csv_as_text(path)
        else:
            table = getattr(importlib.import_module(module), function)(str(path))
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError: a damaged or mis-named file
        raise DataError(f"config field `{field}`: {path} could not be read as {path.suffix[1:]} ({err})") from None
    twice = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
    if twice:  # rows are dicts: one of the two columns would be dropped
        raise DataError(f"config field `{field}`: {path} has the column {twice[0]!r} twice: rename one")
    if table.num_rows == 0:
        raise DataError(f"{path} holds no rows")
    return Rows(table.to_pylist(), f"{field} {path}")


def _csv_as_text(path: Path) -> Any:
    """A CSV file's cells as the text written in it: a type guessed from the cells would turn the answer `060` into
    the number 60 (which no longer equals a completion's "060") or `1e3` into 1000.0. Empty cells are empty text."""
    import pyarrow as pa
    import pyarrow.csv

    with pyarrow.csv.open_csv(str(path)) as reader:  # the header (the first block is read to find it)
        names = reader.schema.names
    text = pyarrow.csv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=False)
    return pyarrow.csv.read_csv(str(path), convert_options=text)


def _array_rows(text: str, path: Path, field: str) -> Rows:
    """A JSON array of objects: the same refusals as JSONL (a key twice, NaN), rows named by their index."""
    rows = _strict_json(text, path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object per row of the array, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{path} holds no rows")
    return Rows(rows, f"{field} {path}")


def _strict_json(text: str, path: Path, line_no: int | None = None) -> Any:
    """JSON that refuses a key given twice and NaN / Infinity; errors name the file and the line (`line_no`: the
    JSONL line `text` is; None: the whole file, the parser's line for a syntax error)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no or err.lineno}: not valid JSON ({err.msg})") from None
    except ValueError as err:  # a duplicate key, or NaN / Infinity
        raise DataError(f"{path}{f':{line_no}' if line_no else ''}: {err}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose key repeats is an error (json.loads would keep the last value without a word)."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise ValueError(f"the key {key!r} is given twice")
        row[key] = value
    return row


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use null, or a number)")


def _hub_rows(name: str, field: str) -> Rows:
    """A data set named on the hub, through `datasets.load_dataset`: its `train` split for `train_data`, `test`
    for `eval_data`. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), `datasets` reads its cache."""
    import os

    import datasets

    from grpokit.model.loading import hub_reachable

    offline = any(os.environ.get(v, "").lower() in ("1", "true") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:
        try:
            hub_reachable(name, f"config field `{field}`: the data set")
        except FileNotFoundError as err:
            raise DataError(str(err)) from None
    split = "train" if field == "train_data" else "test"
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub's own words: not found, gated, no such split
        raise DataError(f"config field `{field}`: {name} (split {split!r}) could not be loaded: {err}") from None
    return Rows([dict(row) for row in data], f"{field} {name}")


def dataset_rows(data: Any, field: str) -> list[dict[str, Any]]:
    """The rows of a `datasets.Dataset`, a list of dicts, or a path / hub name (`load_rows`). `field` is the
    argument's name as the caller wrote it (`train_dataset`), for the errors."""
    if isinstance(data, (str, Path)):
        return load_rows(data, field=field)
    if isinstance(data, dict):  # a DatasetDict is a dict of splits; its columns would read as its split names
        splits = list(data)
        if splits and all(hasattr(split, "column_names") for split in data.values()):
            raise DataError(
                f"`{field}` is a {type(data).__name__} of the splits {splits}: pass one split, e.g. "
                f"{field}=data[{splits[0]!r}]"
            )
        raise DataError(
            f"`{field}` is a dict (keys {splits[:5]}); expected a list of rows, each a dict of columns, or a "
            "datasets.Dataset (datasets.Dataset.from_dict(columns) turns a dict of columns into one)"
        )
    if isinstance(data, (list, tuple)):
        for i, row in enumerate(data):
            if not isinstance(row, dict):  # a str row would have its characters read as column names
                raise DataError(
                    f"`{field}`[{i}] is of type {type(row).__name__} ({row!r:.60}); each row is a dict of columns, "
                    "e.g. {'prompt': ..., 'answer': ...}"
                )
        return data if isinstance(data, list) else list(data)
    if hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # a datasets.Dataset, not imported for this
        return Rows([dict(row) for row in data], field)
    raise DataError(f"`{field}` is a {type(data).__name__}; expected a datasets.Dataset, a list of dicts or a path")


def check_columns(rows: list[dict[str, Any]], required: list[str], source: str) -> None:
    """Every row must have every required column; reserved names may not be used as columns."""
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise DataError(f"{where(rows, i, source)} has no column {missing[0]!r} (its columns: {sorted(row)})")
    for name in RESERVED_COLUMNS:
        if rows and name in rows[0]:
            raise DataError(f"{source}: column {name!r} is reserved for what grpokit passes to reward functions")


def check_rows(rows: list[dict[str, Any]], prompt_column: str, source: str) -> None:
    """Every row, before any work: a dict, the same columns as row 0 (reward functions get every column for
    every completion), and a prompt that is non-empty text or a list of chat messages {role, content}."""
    columns = set(rows[0]) if rows else set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where(rows, i, source)}: expected a dict of columns, got {type(row).__name__}")
        if set(row) != columns:
            missing, extra = sorted(columns - set(row)), sorted(set(row) - columns)
            differs = ", ".join([*(f"lacks {c!r}" for c in missing), *(f"has the extra column {c!r}" for c in extra)])
            raise DataError(
                f"{where(rows, i, source)} {differs}; row 0 has {sorted(columns)}: every row needs the same columns"
            )
        check_prompt(row.get(prompt_column), f"{where(rows, i, source)}, column {prompt_column!r}")


def answer_problem(answer: Any) -> str | None:
    """Why the gold checker cannot compare a completion with `answer` as text (None: it can): it is text that is
    not blank or a whole number. Anything else would be compared as its repr ("None", "12.0", "['a', 'b']") and
    silently score 0."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        return f"is {type(answer).__name__} {answer!r:.40}"
    if isinstance(answer, str) and not answer.strip():
        return "is empty: no completion could match it"
    return None


def answer_check(is_correct: Callable[[str, str], bool]) -> Callable[[str, dict[str, Any]], bool | None]:
    """A gold check of a completion against its row (what held-out accuracy calls) from `is_correct(completion,
    answer)`: the row's `answer` as text; None (the row left out of accuracy) where it cannot be compared as text
    (`answer_problem`: no answer, or a list a reward of the user's reads)."""

    def check(completion: str, row: dict[str, Any]) -> bool | None:
        if answer_problem(row.get("answer")) is not None:
            return None
        return is_correct(completion, str(row["answer"]))

    return check


def check_answers(rows: list[dict[str, Any]], source: str, column: str = "answer") -> None:
    """The gold answers that the `accuracy` reward compares as text: each is text or a whole number
    (`answer_problem`)."""
    for i, row in enumerate(rows):
        problem = answer_problem(row[column])
        if problem:
            raise DataError(
                f"{where(rows, i, source)}: column {column!r} {problem}; the gold checker compares the completion "
                "with the answer as text: write it as text or a whole number"
            )


def check_eval_answers(rows: list[dict[str, Any]], *, gold_reward_used: bool, column: str = "answer") -> None:
    """The held-out rows' answers. Where the `accuracy` reward (the gold checker) scores them, each must be text or
    a whole number (`check_answers`). Otherwise the column may be the user's own (a list of accepted answers, for a
    reward of theirs): rows the gold checker cannot compare are left out of held-out accuracy, said once
    (InputWarning), rather than refused."""
    if not rows or column not in rows[0]:
        return
    if gold_reward_used:
        check_answers(rows, "eval data (the `accuracy` reward compares its `answer`)", column)
        return
    left_out = [i for i, row in enumerate(rows) if answer_problem(row.get(column)) is not None]
    if left_out:
        first = left_out[0]
        warnings.warn(
            f"{where(rows, first, 'eval data')}: column {column!r} {answer_problem(rows[first][column])}, which the "
            f"gold checker cannot compare as text: {len(left_out)} of {len(rows)} held-out rows are left out of "
            "eval/accuracy (reward functions still get the column)",
            InputWarning,
            stacklevel=3,
        )


def check_prompt(prompt: Any, place: str) -> None:
    """A prompt is text that is not blank, or a non-empty list of {role, content} messages with known roles whose
    content is text or a list of text parts, not all of it blank."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{place}: the prompt is {'empty' if not prompt else f'only whitespace ({prompt!r:.20})'}")
        return
    if not isinstance(prompt, list) or not prompt:
        raise DataError(
            f"{place}: a prompt must be text or a list of {{role, content}} messages, got "
            f"{type(prompt).__name__} {prompt!r:.60}"
        )
    for j, message in enumerate(prompt):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{place}: message {j} must be a dict with `role` and `content`, got {message!r:.80}")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{place}: message {j} has role {message['role']!r}; expected one of {list(CHAT_ROLES)}")
        try:
            message_text(message["content"])
        except DataError as err:
            raise DataError(f"{place}: message {j} {err}") from None
    if not any(message_text(message["content"]).strip() for message in prompt):
        raise DataError(f"{place}: every message of the prompt is empty or only whitespace")


def message_text(content: Any) -> str:
    """A chat message's content as text. Content given as a list of parts (the OpenAI / TRL multimodal form,
    [{"type": "text", "text": ...}, ...]) is its text parts joined by newlines, as vLLM joins them for a text-only
    model: a text-only chat template would print the list itself. A part of another type (an image) is an error:
    grpokit trains text-only causal LMs."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"has content of type {type(content).__name__}; expected text or a list of text parts")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(
                f"has content part {k} of type {kind!r} ({part!r:.60}); grpokit trains text-only models: a part "
                'must be {"type": "text", "text": ...}'
            )
        texts.append(part["text"])
    return "\n".join(texts)


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion, plain or conversational ([{"role": "assistant", "content": ...}])."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def text_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with every content as text (`message_text`), as a text-only chat template needs them."""
    return [{**m, "content": message_text(m["content"])} for m in messages]


def render_prompt(
    tokenizer: Any, prompt: str | list[dict[str, str]], template_kwargs: dict[str, Any] | None = None
) -> str:
    """Plain text stays as it is; chat messages go through the tokenizer's chat template, with `template_kwargs` as
    its variables (a config's `chat_template_kwargs`: Qwen3's enable_thinking, say)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("prompts are chat messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            text_messages(prompt), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )
    raise DataError(f"a prompt must be text or a list of {{role, content}} messages, got {prompt!r:.80}")


class EncodedPrompts(NamedTuple):
    texts: list[str]  # as rendered (chat template applied), whole
    ids: list[list[int]]  # what the model sees: the last max_length tokens
    cut: int  # how many prompts were longer than max_length
    seen: list[str]  # the text of `ids`: the rendered text, or the decoded kept tokens of a cut prompt


def encode_prompts(
    tokenizer: Any, prompts: list[Any], max_length: int, template_kwargs: dict[str, Any] | None = None
) -> EncodedPrompts:
    """Render (`render_prompt`, with the chat template's `template_kwargs`) and tokenize prompts. Long prompts keep
    their LAST tokens, where the question usually is. A chat template already holds any BOS, so it gets no special
    tokens added."""
    texts, ids, cut, seen = [], [], 0, []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt, template_kwargs)
        tokens = list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])
        if not tokens:
            raise DataError(f"prompt {prompt!r:.80} encodes to no tokens")
        texts.append(text)
        if len(tokens) > max_length:
            tokens, cut = tokens[-max_length:], cut + 1
            seen.append(tokenizer.decode(tokens))
        else:
            seen.append(text)
        ids.append(tokens)
    return EncodedPrompts(texts, ids, cut, seen)


class PromptScan(NamedTuple):
    warnings: list[str]
    longest: int  # tokens of the longest prompt as the model will see it (after the cut)


def scan_prompts(
    tokenizer: Any,
    rows: list[dict[str, Any]],
    prompt_column: str,
    max_length: int,
    source: str,
    template_kwargs: dict[str, Any] | None = None,
) -> PromptScan:
    """Every prompt rendered and tokenized once, before the first step: a prompt that cannot be rendered or
    encodes to nothing is an error naming its row; warnings, with counts, say what grpokit will change: prompts
    longer than `max_length` (cut from the left) and characters the tokenizer reads as its unknown token."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    lengths, unknown = [], {}  # unknown: row -> the first unknown text
    ends_as_assistant = [i for i, row in enumerate(rows) if _last_role(row[prompt_column]) == "assistant"]
    messages_as_text = [i for i, row in enumerate(rows) if _reads_as_messages(row[prompt_column])]
    no_user = [
        i
        for i, row in enumerate(rows)
        if isinstance(row[prompt_column], list) and not any(m.get("role") == "user" for m in row[prompt_column])
    ]
    for i, row in enumerate(rows):
        prompt = row[prompt_column]
        try:
            text = render_prompt(tokenizer, prompt, template_kwargs)
        except DataError as err:
            raise DataError(f"{where(rows, i, source)}: {err}") from None
        except Exception as err:  # a chat template raising (roles it does not allow, say)
            raise DataError(
                f"{where(rows, i, source)}: the chat template failed: {type(err).__name__}: {err}"
            ) from None
        tokens = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
        if not tokens:
            raise DataError(f"{where(rows, i, source)}: the prompt encodes to no tokens")
        lengths.append(len(tokens))
        if unk_id is not None and unk_id in tokens and (span := _unknown_text(tokenizer, text, unk_id)) is not None:
            unknown[i] = span
    warnings = []
    cut = sum(n > max_length for n in lengths)
    if cut:
        warnings.append(
            f"{source}: {cut} of {len(rows)} prompts are longer than max_prompt_length = {max_length} tokens "
            f"(longest {max(lengths)}): each keeps its last {max_length} tokens (raise max_prompt_length to keep them "
            "whole); completions.jsonl logs the cut text"
        )
    if unknown:
        i, text = next(iter(unknown.items()))
        warnings.append(
            f"{source}: {len(unknown)} of {len(rows)} prompts hold text the tokenizer does not know, read as "
            f"{tokenizer.unk_token} (first: {text!r} in row {i}): the model never sees it"
        )
    if ends_as_assistant:
        warnings.append(
            f"{source}: {len(ends_as_assistant)} of {len(rows)} chat prompts end with an assistant message (first: row "
            f"{ends_as_assistant[0]}): the template still opens a new assistant turn after it"
        )
    if no_user:
        warnings.append(
            f"{source}: {len(no_user)} of {len(rows)} chat prompts have no user message (first: row {no_user[0]}): "
            "the model is asked nothing but what the other messages say"
        )
    if messages_as_text:
        warnings.append(
            f"{source}: {len(messages_as_text)} of {len(rows)} prompts are text that reads as chat messages in JSON "
            f"(first: row {messages_as_text[0]}; a .csv cell holds text): the model sees that JSON text, not a chat; "
            "JSONL or a JSON array keep messages as a list"
        )
    return PromptScan(warnings, min(max(lengths, default=0), max_length))


def _reads_as_messages(prompt: Any) -> bool:
    """A text prompt that is a JSON list of {role, content} messages (written into a text column)."""
    if not isinstance(prompt, str) or not prompt.lstrip().startswith("[{"):
        return False
    try:
        value = json.loads(prompt)
    except ValueError:
        return False
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _last_role(prompt: Any) -> str | None:
    return prompt[-1].get("role") if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) else None


def scan_all_prompts(
    tokenizer: Any,
    train_rows: list[dict],
    eval_rows: list[dict],
    *,
    prompt_column: str,
    max_prompt_length: int,
    prompts_per_step: int,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[str], int]:
    """`scan_prompts` over the train and eval rows (chat prompts rendered with `chat_template_kwargs`), and
    `prompts_per_step` against the training rows; each warning is also issued as an InputWarning. -> (warnings,
    tokens of the longest prompt as the model will see it)."""
    scans = [
        scan_prompts(tokenizer, rows, prompt_column, max_prompt_length, source, chat_template_kwargs)
        for rows, source in ((train_rows, "train data"), (eval_rows, "eval data"))
    ]
    messages = [message for scan in scans for message in scan.warnings]
    if eval_rows and "answer" not in eval_rows[0]:
        messages.append("eval data has no `answer` column: held-out accuracy is not computed for it")
    if prompts_per_step > len(train_rows):
        messages.append(
            f"prompts_per_step = {prompts_per_step} is more than the {len(train_rows)} training prompts: a step "
            "samples some prompts twice"
        )
    for message in messages:
        warnings.warn(message, InputWarning, stacklevel=3)
    return messages, max(scan.longest for scan in scans)


def _unknown_text(tokenizer: Any, text: str, unk_id: int) -> str | None:
    """The first span of `text` that the tokenizer reads as its unknown token although it is not that token
    written out (a prompt may hold `<unk>` on purpose; it must not hide an unknown character elsewhere). None
    when every unknown token is the written-out one."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # a slow tokenizer has no offsets: compare counts instead
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return "?" if ids.count(unk_id) > text.count(tokenizer.unk_token) else None
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token == unk_id and text[start:end] != tokenizer.unk_token:
            return text[start:end]
    return None


def pad_batch(seqs: list[list[int]], pad_id: int, *, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids (B, T), mask (B, T)) padded on the `left` (prompts) or `right` (completions)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def grpo_rows(
    task: Any,
    train_rows: list[dict] | None,
    eval_rows: list[dict] | None,
    *,
    train_data: str | None,
    eval_data: str | None,
    num_train_prompts: int,
    num_eval_prompts: int,
    seed: int,
    prompt_column: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) of a GRPO run: the rows passed in, else the files `train_data` / `eval_data`,
    else the built-in task's splits (`num_train_prompts`, `num_eval_prompts` rows drawn under `seed`); the first
    `num_eval_prompts` held-out rows are kept. Checked here, before any model loads: every row has the
    `prompt_column` and the columns of the first row (reward functions get every column for every completion)."""
    given = train_rows is not None
    train_rows = dataset_rows(train_rows, "train_dataset") if given else None
    eval_rows = dataset_rows(eval_rows, "eval_dataset") if eval_rows is not None else None
    if train_rows is None:
        if task is not None:
            train_rows = task.rows(num_train_prompts, split="train", seed=seed)
        else:
            train_rows = load_rows(train_data, field="train_data")
    if not train_rows:
        raise DataError("`train_dataset` holds no rows" if given else "the training rows are empty")
    if eval_rows is None:
        if eval_data is not None:
            eval_rows = load_rows(eval_data, field="eval_data")
        elif task is not None:
            eval_rows = task.rows(num_eval_prompts, split="eval", seed=seed)
        else:
            eval_rows = []
    if len(eval_rows) > num_eval_prompts:
        warnings.warn(
            f"eval data holds {len(eval_rows)} rows; num_eval_prompts = {num_eval_prompts} of them (the first) are "
            "evaluated: raise num_eval_prompts to evaluate them all",
            InputWarning,
            stacklevel=3,
        )
    if isinstance(eval_rows, Rows):  # a slice of Rows is a plain list: keep the file's name and lines
        eval_rows = Rows(eval_rows[:num_eval_prompts], eval_rows.source, (eval_rows.lines or [])[:num_eval_prompts])
    else:
        eval_rows = eval_rows[:num_eval_prompts]
    check_columns(train_rows, [prompt_column], "train data")
    check_rows(train_rows, prompt_column, "train data")
    check_columns(eval_rows, [prompt_column], "eval data")
    check_rows(eval_rows, prompt_column, "eval data")
    return train_rows, eval_rows


class ShuffledEpochs:
    """Indices of a seeded shuffle of range(n), reshuffled whenever an epoch runs out."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def state_dict(self) -> dict[str, Any]:
        """Where the walk stands: the shuffler's state and what is left of this epoch's order."""
        return {"n": self.n, "rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise DataError(f"the checkpoint walked {state['n']} rows but the data now holds {self.n}")
        from grpokit.runtime.checkpoint import python_random_state

        self.rng.setstate(python_random_state(state["rng"]))
        self.order = list(state["order"])

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out
