"""Rows in, token ids out: loading JSONL files and `datasets` folders, checking columns, encoding prompts.

A row is a dict. Its `prompt_column` holds plain text or chat messages; every other column rides
along to the reward functions untouched.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Names the trainer passes to every reward function; a data set column may not shadow them.
RESERVED_COLUMNS = ("completion_lengths", "truncated", "raw_prompts")


class DataError(ValueError):
    """The data set is missing, malformed, or lacks a column; the message names the file and the row."""


def load_rows(path: str | Path, *, field: str = "train_data") -> list[dict[str, Any]]:
    """A JSONL file (one JSON object per line) or a folder written by `datasets.Dataset.save_to_disk`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"config field `{field}`: {path} does not exist")
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            raise DataError(f"{path} holds splits {list(data)}; point `{field}` at one split's folder")
        return [dict(row) for row in data]
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def check_columns(rows: list[dict[str, Any]], required: list[str], source: str) -> None:
    """Every row must have every required column; reserved names may not be used as columns."""
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise DataError(f"{source}: row {i} has no column {missing[0]!r} (its columns: {sorted(row)})")
    for name in RESERVED_COLUMNS:
        if rows and name in rows[0]:
            raise DataError(f"{source}: column {name!r} is reserved for what grpokit passes to reward functions")


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """Plain text stays as it is; chat messages go through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("prompts are chat messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    raise DataError(f"a prompt must be text or a list of {{role, content}} messages, got {prompt!r:.80}")


def encode_prompts(tokenizer: Any, prompts: list[Any], max_length: int) -> tuple[list[str], list[list[int]], int]:
    """-> (rendered texts, token ids, how many were cut). Long prompts keep their LAST tokens, where the
    question usually is. A chat template already holds any BOS, so it gets no special tokens added."""
    texts, ids, cut = [], [], 0
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt)
        tokens = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
        if len(tokens) > max_length:
            tokens, cut = tokens[-max_length:], cut + 1
        if not tokens:
            raise DataError(f"prompt {prompt!r:.80} encodes to no tokens")
        texts.append(text)
        ids.append(list(tokens))
    return texts, ids, cut


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
    cfg: Any, task: Any, train_rows: list[dict] | None, eval_rows: list[dict] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) of a GRPO run: the rows passed in, else `train_data` / `eval_data`, else the
    built-in task's splits. Checked here, before any model loads: every row has the prompt column and the
    columns of the first row (reward functions get every column for every completion)."""
    if train_rows is None:
        if task is not None:
            train_rows = task.rows(cfg.num_train_prompts, split="train", seed=cfg.seed)
        else:
            train_rows = load_rows(cfg.train_data, field="train_data")
    if not train_rows:
        raise DataError("the training rows are empty")
    if eval_rows is None:
        if cfg.eval_data is not None:
            eval_rows = load_rows(cfg.eval_data, field="eval_data")
        elif task is not None:
            eval_rows = task.rows(cfg.num_eval_prompts, split="eval", seed=cfg.seed)
        else:
            eval_rows = []
    check_columns(train_rows, [cfg.prompt_column, *train_rows[0]], "train data")
    check_columns(eval_rows, [cfg.prompt_column], "eval data")
    return train_rows, eval_rows[: cfg.num_eval_prompts]


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
        from grpokit.checkpoint import python_random_state

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
