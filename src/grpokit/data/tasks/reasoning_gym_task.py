"""`task: reasoning_gym:NAME`: a procedural task of the reasoning-gym package (its seeded generator, its scorer).

reasoning-gym (`pip install 'grpokit[reasoning]'`) makes problems of about a hundred kinds offline, each an entry
{question, answer, metadata} drawn from a seeded generator, and scores an answer against its entry
(`dataset.score_answer(answer, entry)`, a number in [0, 1]). Its scorer gives partial credit when the gold answer
appears inside a longer one ("The answer is 2248" scores 4/18 for 2248), so the answer is extracted first: the text
inside the completion's last `<answer>...</answer>` (reasoning_gym.utils.extract_answer); a completion without the
tags scores 0. Every row's prompt says so: a system message (`INSTRUCTION`) and the question as the user's message,
rendered by the tokenizer's chat template. `task_settings: {answer_format: last_number}` (grpokit's own key, not
passed to reasoning-gym) is for models too small to follow that instruction (SmolLM2-135M-Instruct writes the tags
in none of 96 samples): the prompt is the question alone, as plain text the model continues, and the answer is the
last number of the completion (lm-evaluation-harness's "flexible-extract" for GSM8K).

Rows: {"prompt": [system, user], "question", "answer" (text, or None where the task accepts several answers and
scores from the metadata), "metadata"}: the entry, as the scorer reads it. Held-out rows never equal training rows:
a question belongs to the held-out split when a hash of its text falls in one bucket of `EVAL_BUCKETS`
(`is_eval_question`), and each split keeps only its own questions, so no question text is in both, whatever the
seeds or sizes; the splits are also drawn from different generator seeds (`split_seed`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

PREFIX = "reasoning_gym:"
INSTALL = "pip install 'grpokit[reasoning]'"
INSTRUCTION = "Solve the problem. Give only the final answer inside <answer></answer> tags, e.g. <answer>42</answer>."
EVAL_BUCKETS = 10  # one question text in EVAL_BUCKETS is held out
SPLITS = ("train", "eval")
# reasoning-gym seeds entry i of a generator with seed s by s + i (numpy's legacy seeding in some tasks: < 2**32):
# the training split's seeds are base + i, the held-out split's 2**30 + base + i, base < 2**29, so the two never share
# a generator seed while fewer than 2**29 entries are drawn (`MAX_DRAWS` bounds them far below)
_SEED_SPAN = 2**29
# settings the run itself decides: the rows are drawn from its `seed`, as many as num_train_prompts / num_eval_prompts
RUN_SETTINGS = ("seed", "size")
ANSWER_FORMATS = ("tags", "last_number")  # `answer_format` in task_settings: how the prompt asks and the answer is read
# a number: thousands grouped by commas (1,234) or not, a sign (ASCII or Unicode minus), decimals
_LAST_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def reasoning_gym_name(task: str | None) -> str | None:
    """NAME of a `reasoning_gym:NAME` task; None for any other task name."""
    if task is None or not task.startswith(PREFIX):
        return None
    return task[len(PREFIX) :]


def import_reasoning_gym() -> Any:
    """The reasoning_gym package; missing: an ImportError saying how to install it."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"`reasoning_gym:` tasks need the reasoning-gym package ({err}): {INSTALL}") from err
    return reasoning_gym


def is_eval_question(question: str) -> bool:
    """Whether a question belongs to the held-out split (blake2b of its text, not hash(): the same in every process)."""
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % EVAL_BUCKETS == 0


def split_seed(seed: int, split: str) -> int:
    """The generator seed of a run seed's split: the training split's in [0, 2**29), the held-out split's 2**30 above
    it (see `_SEED_SPAN`)."""
    base = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "big") % _SEED_SPAN
    return base if split == "train" else 2 * _SEED_SPAN + base


class ReasoningGymTask:
    """reasoning-gym's task `name` with its `settings` (create_dataset's keywords: min_terms, max_digits, ...).

    `name` and `settings` are checked here (an unknown name, a setting the task does not take or refuses: a
    ValueError naming `task` or `task_settings`), so a config fails before any model loads."""

    text_answers = False  # its scorer reads each row's entry as it is (an answer may be None, scored from metadata)

    def __init__(self, name: str, settings: dict[str, Any] | None = None):
        self.rg = import_reasoning_gym()
        from reasoning_gym.factory import DATASETS

        if name not in DATASETS:
            raise ValueError(
                f"config field `task`: reasoning-gym has no task {name!r}; its tasks: {', '.join(sorted(DATASETS))}"
            )
        self.name, self.settings = f"{PREFIX}{name}", dict(settings or {})
        self.answer_format = self.settings.pop("answer_format", "tags")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"config field `task_settings`: answer_format is {self.answer_format!r}; expected one of "
                f"{list(ANSWER_FORMATS)} (tags: an instruction asks for <answer></answer>; last_number: the question "
                "alone, the completion's last number read)"
            )
        self.dataset_name = name
        fixed = [key for key in RUN_SETTINGS if key in self.settings]
        if fixed:
            raise ValueError(
                f"config field `task_settings` sets {fixed[0]!r}: the run draws the rows itself, from its `seed`, "
                "num_train_prompts of them for training and num_eval_prompts held out; leave it out"
            )
        self.scorer = self._dataset(seed=0, size=1)  # (its score_answer: the settings may shape the scoring)
        self.check_answer_format(self.scorer[0])  # (at config time; every drawn row is checked too)

    def _dataset(self, *, seed: int, size: int) -> Any:
        try:
            return self.rg.create_dataset(self.dataset_name, seed=seed, size=size, **self.settings)
        except (TypeError, ValueError, AssertionError, AttributeError, KeyError) as err:  # (composite's: dicts)
            import dataclasses

            config_class = self.rg.factory.DATASETS[self.dataset_name][1]
            known = [f.name for f in dataclasses.fields(config_class) if f.name not in RUN_SETTINGS]
            raise ValueError(
                f"config field `task_settings` ({self.settings}): reasoning-gym's {self.dataset_name} refuses them: "
                f"{type(err).__name__}: {err}; its settings: {', '.join(known)}"
            ) from None

    def rows(self, n: int, *, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
        """n rows of `split`, drawn in order from the split's generator (`split_seed`) and kept when their question is
        the split's (`is_eval_question`); the same (n, split, seed, settings) always give the same rows. A task whose
        settings leave a split no question within `max_draws(n)` entries is an error, not an endless loop."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        want_eval, start, out = split == "eval", split_seed(seed, split), []
        limit = max_draws(n)
        drawn = 0
        while len(out) < n:
            if drawn >= limit:
                raise ValueError(
                    f"config field `task_settings`: {self.name} gave {len(out)} {split} rows of the {n} asked for in "
                    f"{drawn} problems (a question is held out when its hash falls in 1 bucket of {EVAL_BUCKETS}): "
                    "its settings leave too few distinct questions; widen them"
                )
            # generator seeds continue where the last chunk stopped: entry i of a chunk at seed s is seeded s + i
            left = n - len(out)  # (the training split keeps 9 questions in 10, the held-out split 1)
            chunk = min(limit - drawn, (left * EVAL_BUCKETS if want_eval else left + left // 4) + 16)
            for entry in self._dataset(seed=start + drawn, size=chunk):
                self.check_answer_format(entry)
                if is_eval_question(entry["question"]) == want_eval and len(out) < n:
                    out.append(self.row(entry))
            drawn += chunk
        return out

    def row(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A reasoning-gym entry as a row: the prompt (the instruction, then the question; with answer_format
        last_number the question alone, as plain text) and the entry's fields."""
        prompt: Any = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": entry["question"]}]
        if self.answer_format == "last_number":
            prompt = entry["question"]
        return {"prompt": prompt, "question": entry["question"], "answer": entry["answer"],
                "metadata": entry["metadata"]}  # fmt: skip

    def check_answer_format(self, entry: dict[str, Any]) -> None:
        """answer_format last_number reads a number: a task whose answers are not numbers (spell_backward's words)
        could never be scored right, so it is refused before any model loads."""
        answer = entry.get("answer")
        if self.answer_format == "last_number" and (
            not isinstance(answer, str) or _LAST_NUMBER.fullmatch(answer.strip()) is None
        ):
            raise ValueError(
                f"config field `task_settings`: answer_format last_number reads the completion's last number, but "
                f"{self.name}'s answers are not all numbers ({answer!r} for {entry.get('question', '')!r:.80}); use "
                "answer_format: tags"
            )

    def extract(self, completion: str) -> str | None:
        """The answer a completion gives: the text inside its last `<answer>...</answer>`, stripped; None without.
        answer_format last_number: the completion's last number (None without one)."""
        if self.answer_format == "last_number":
            numbers = _LAST_NUMBER.findall(completion)
            return numbers[-1].replace(",", "").replace("\u2212", "-") if numbers else None
        from reasoning_gym.utils import extract_answer

        return extract_answer(completion)

    def score(self, completion: str, question: str, answer: Any, metadata: dict[str, Any]) -> float:
        """reasoning-gym's score in [0, 1] of the extracted answer against the entry (0 without `<answer>` tags)."""
        entry = {"question": question, "answer": answer, "metadata": metadata}
        value = self.scorer.score_answer(self.extract(completion), entry)
        if not 0.0 <= value <= 1.0:  # (NaN too)
            raise ValueError(f"{self.name}'s scorer gave {value!r} for {completion!r:.80}; expected a number in [0, 1]")
        return float(value)

    def check(self, completion: str, row: dict[str, Any]) -> bool:
        """Held-out accuracy's gold check: the extracted answer gets full marks (partial credit is not correct)."""
        return self.score(completion, row["question"], row["answer"], row["metadata"]) == 1.0

    def reward(self) -> Any:
        """The `accuracy` reward of this task: each completion's `score` against its row (a multi-turn row: its final
        turn), under the reward contract."""
        from grpokit.data.rows import completion_text

        def accuracy(completions: list[Any], question: list[str], answer: list[Any], metadata: list[dict],
                     final_turns: list[str] | None = None, **_: Any) -> list[float]:  # fmt: skip
            texts = final_turns if final_turns is not None else [completion_text(c) for c in completions]
            return [self.score(t, q, a, m) for t, q, a, m in zip(texts, question, answer, metadata)]

        return accuracy


def max_draws(n: int) -> int:
    """Entries a split may draw for n rows before its settings are called too narrow: 50 times what a held-out split
    needs on average."""
    return 50 * EVAL_BUCKETS * n + 1000
