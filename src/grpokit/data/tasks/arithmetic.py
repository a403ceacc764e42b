"""The addition task: "47+85=" -> "132", with an exact gold checker and an imperfect demonstrator.

Operands and answers are zero-padded to a fixed width ("04+05=" -> "009"), so every digit of a given
column sits at the same position in every problem: a tiny model then learns the task in a minute on a
CPU, and the only hard part left is the one the demonstrator gets wrong, the carries.

The demonstrator makes one systematic, human-like error: at a column that produces a carry it forgets
to propagate that carry with probability `forget_carry`. Supervised fine-tuning on its outputs gives a
policy that is good but wrong on carries; GRPO against the gold checker can then fix exactly that,
which is what the demo measures.

Demonstrator rule (exact): column addition from the units column up, carry-in 0. At each column
s = a_i + b_i + carry_in; the digit s % 10 is always written correctly. When s >= 10 the carry is
forgotten (carry_in of the next column = 0) with probability forget_carry, else kept (= 1). After the
last column a kept carry is written as a leading "1", a forgotten one as "0", so the final carry-out
is one more chance to forget. Examples with forget_carry = 1: 47+85 -> "022", 95+05 -> "090",
50+50 -> "000"; forgetting only the units carry of 47+85 gives "122".

Every forgotten carry changes a written digit (or drops the leading 1), and until the first forgotten
carry the demonstrator follows the true carry chain, so P(correct) = (1 - forget_carry) ** c where c
is the number of carries of the true sum, final carry-out included (`count_carries`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

SPLITS = ("train", "eval")
EVAL_BUCKETS = 10  # one bucket in EVAL_BUCKETS of the operand pairs is held out for eval (~10%)


def count_carries(a: int, b: int) -> int:
    """Number of columns of a + b that carry into the next column, the final carry-out included."""
    carries, carry = 0, 0
    while a or b or carry:
        carry = int(a % 10 + b % 10 + carry >= 10)
        carries += carry
        a, b = a // 10, b // 10
    return carries


def is_eval_pair(a: int, b: int) -> bool:
    """Whether the operand pair belongs to the held-out eval split.

    The pair is hashed unordered, so a + b and b + a are on the same side: the eval split never
    contains a commuted copy of a training problem. blake2b, not hash(), so the split is the same in
    every process.
    """
    lo, hi = sorted((a, b))
    digest = hashlib.blake2b(f"{lo},{hi}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % EVAL_BUCKETS == 0


def check_answer(completion: str, answer: str) -> bool:
    """Gold checker: the completion, stripped of surrounding whitespace, is the answer's number
    (leading zeros optional: "089" and "89" both answer 04+85)."""
    text = completion.strip()
    return text.isascii() and text.isdigit() and int(text) == int(answer)


def _completion_text(completion: Any) -> str:
    """Plain text of a completion given as a string or as a list of chat messages (last one wins)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def accuracy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **columns: Any
) -> list[float]:
    """Reward 1.0 for a completion the gold checker accepts, else 0.0 (never None: every row is scorable).

    Follows the reward contract fn(prompts, completions, **columns) -> list[float | None]; `answer` is
    the dataset column of the same name, one entry per completion.
    """
    if len(completions) != len(answer):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} answers")
    return [float(check_answer(_completion_text(c), a)) for c, a in zip(completions, answer)]


class AdditionTask:
    """Addition of two non-negative integers with up to `num_digits` digits each."""

    name = "addition"
    text_answers = True  # its rows' `answer` is text the `accuracy` reward compares (the rows' checks apply)

    def __init__(self, num_digits: int = 2, forget_carry: float = 0.5):
        if not isinstance(num_digits, int) or num_digits < 1:
            raise ValueError(f"num_digits must be an integer >= 1, got {num_digits!r}")
        if not 0.0 <= forget_carry <= 1.0:
            raise ValueError(f"forget_carry must be in [0, 1], got {forget_carry!r}")
        self.num_digits = num_digits
        self.forget_carry = float(forget_carry)

    @property
    def chars(self) -> str:
        """Every character a prompt or an answer can contain."""
        return "0123456789+="

    @property
    def max_completion_chars(self) -> int:
        """Length of the longest answer (the EOS token not counted)."""
        return self.num_digits + 1

    def rows(self, n: int, *, split: str = "train", seed: int = 0) -> list[dict[str, str]]:
        """n problems {"prompt": "47+05=", "answer": "052"}, operands uniform over the split's pairs.

        Operands are drawn uniformly from [0, 10**num_digits) and redrawn until the pair falls in the
        requested split, so each split is uniform over its own pairs and the two never share a pair.
        The same (n, split, seed) always gives the same rows.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        want_eval = split == "eval"
        rng = random.Random(seed)
        high = 10**self.num_digits
        out = []
        while len(out) < n:
            a, b = rng.randrange(high), rng.randrange(high)
            if is_eval_pair(a, b) == want_eval:
                out.append({"prompt": self.format_prompt(a, b), "answer": self.format_answer(a + b)})
        return out

    def format_prompt(self, a: int, b: int) -> str:
        d = self.num_digits
        return f"{a:0{d}d}+{b:0{d}d}="

    def format_answer(self, total: int) -> str:
        return f"{total:0{self.num_digits + 1}d}"

    def is_correct(self, completion: str, answer: str) -> bool:
        """Gold checker (see `check_answer`)."""
        return check_answer(completion, answer)

    def check(self, completion: str, row: dict[str, Any]) -> bool | None:
        """Held-out accuracy's gold check of a completion against its row: `is_correct` on the row's `answer`."""
        from grpokit.data.rows import answer_check

        return answer_check(self.is_correct)(completion, row)

    def demonstrate(self, row: dict[str, str], rng: random.Random) -> str:
        """The imperfect demonstrator's answer text (no EOS) for `row`; the exact rule is in the module doc."""
        a, b = _parse_prompt(row["prompt"])
        total, carry = 0, 0
        for column in range(self.num_digits):
            s = a % 10 + b % 10 + carry
            total += (s % 10) * 10**column
            carry = int(s >= 10 and rng.random() >= self.forget_carry)
            a, b = a // 10, b // 10
        return self.format_answer(total + carry * 10**self.num_digits)

    def demonstrator_accuracy(self, rows: Sequence[dict[str, str]], rng: random.Random) -> float:
        """Measured fraction of `rows` the demonstrator answers correctly."""
        if not rows:
            raise ValueError("demonstrator_accuracy needs at least one row")
        hits = sum(self.is_correct(self.demonstrate(row, rng), row["answer"]) for row in rows)
        return hits / len(rows)

    def expected_demonstrator_accuracy(self, rows: Sequence[dict[str, str]] | None = None) -> float:
        """Analytic demonstrator accuracy E[(1 - forget_carry) ** carries].

        Over `rows` when given; otherwise exactly over all operand pairs in [0, 10**num_digits)^2, by a
        two-state recursion on the carry: a column with carry-in 0 carries with probability 45/100,
        with carry-in 1 with probability 55/100, and each carry multiplies the weight by (1 - f).
        """
        keep = 1.0 - self.forget_carry
        if rows is not None:
            return sum(keep ** count_carries(*_parse_prompt(r["prompt"])) for r in rows) / len(rows)
        no_carry, carry = 1.0, 0.0  # probability mass (weighted by keep**carries) in each carry state
        for _ in range(self.num_digits):
            no_carry, carry = 0.55 * no_carry + 0.45 * carry, keep * (0.45 * no_carry + 0.55 * carry)
        return no_carry + carry


def _parse_prompt(prompt: str) -> tuple[int, int]:
    """(a, b) from "a+b="."""
    left, right = prompt.strip().removesuffix("=").split("+")
    return int(left), int(right)
