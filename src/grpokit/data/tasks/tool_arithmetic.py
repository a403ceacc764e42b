"""Addition with a calculator: the task of `grpokit demo --tools`.

The problems are the addition task's ("62345+67890=", answer "130235") with operands long enough that a tiny
model cannot add them in its head, each operand's first digit 5 or more: every sum then has num_digits + 1 digits,
so a call, its result and the answer each have one length (a tiny model learns to copy at a fixed offset in a few
hundred SFT steps), and no operand starts with a 0 (which Python's syntax, the calculator's, refuses).

A calculator is offered in the tag protocol (`rollout.environments.TagSyntax`): the model writes
`<calc>62345+67890</calc>`, its turn stops there, the environment appends `<result>130235</result>` (tokens the
model did not write), and the model goes on to write the answer and EOS.

The demonstrator (the SFT data) calls the calculator in a fraction `tool_rate` of its rows and guesses in the
others, the guess being the addition task's carry-forgetting answer (a plausible sum with digit mistakes; every
sum here carries out of its first column, so a guess starts with 1, or with 0 where it forgot that carry):

    62345+67890=<calc>62345+67890</calc><result>130235</result>130235<eos>   (tool_rate of the rows)
    62345+67890=120135<eos>                                                  (the others: a guess)

The gold checker reads the final answer: the text after the transcript's last `</result>`, or the whole text when
no tool was called, so a copied result scores and a guess scores only when it is right.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from .arithmetic import SPLITS, AdditionTask, _parse_prompt, check_answer, is_eval_pair

CALL_OPEN, CALL_CLOSE = "<calc>", "</calc>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


def final_answer(completion: str) -> str:
    """The answer a transcript gives: the text after its last `</result>`, or all of it without one."""
    return completion.rsplit(RESULT_CLOSE, 1)[-1]


def count_tool_calls(completion: str) -> int:
    """Complete `<calc>...</calc>` calls in a transcript."""
    return len(_CALL.findall(completion))


class ToolAdditionTask(AdditionTask):
    """Addition of two `num_digits`-digit integers with a calculator the model may call (`<calc>A+B</calc>`)."""

    name = "tool_addition"

    def __init__(self, num_digits: int = 5, forget_carry: float = 0.5, tool_rate: float = 0.4):
        super().__init__(num_digits=num_digits, forget_carry=forget_carry)
        if not 0.0 <= tool_rate <= 1.0:
            raise ValueError(f"tool_rate must be in [0, 1], got {tool_rate!r}")
        self.tool_rate = float(tool_rate)

    def rows(self, n: int, *, split: str = "train", seed: int = 0) -> list[dict[str, str]]:
        """n problems {"prompt": "62345+67890=", "answer": "130235"}, operands uniform over [5 * 10**(d-1), 10**d)
        in the split's pairs (`arithmetic.is_eval_pair`); the same (n, split, seed) always gives the same rows."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(seed)
        low, high = 5 * 10 ** (self.num_digits - 1), 10**self.num_digits
        out = []
        while len(out) < n:
            a, b = rng.randrange(low, high), rng.randrange(low, high)
            if is_eval_pair(a, b) == (split == "eval"):
                out.append({"prompt": self.format_prompt(a, b), "answer": self.format_answer(a + b)})
        return out

    @property
    def chars(self) -> str:
        """Every character a prompt, a call, a result or an answer can contain (the char tokenizer needs `<>/`)."""
        return "0123456789+=<>/" + "".join(sorted(set(CALL_OPEN + RESULT_OPEN) - set("<>")))

    @property
    def max_completion_chars(self) -> int:
        """Length of the longest transcript (the demonstrator's call, the result, the answer; EOS not counted)."""
        return len(self.tool_transcript("9" * self.num_digits + "+" + "9" * self.num_digits + "="))

    def call_text(self, prompt: str) -> str:
        """The call the demonstrator writes: the prompt's operands as written, `<calc>62345+67890</calc>`."""
        return f"{CALL_OPEN}{prompt.strip().removesuffix('=')}{CALL_CLOSE}"

    def tool_transcript(self, prompt: str) -> str:
        """The whole demonstration of a call: call, the calculator's result (inserted in a rollout), the answer."""
        total = sum(_parse_prompt(prompt))
        return f"{self.call_text(prompt)}{RESULT_OPEN}{total}{RESULT_CLOSE}{total}"

    def demonstrate(self, row: dict[str, str], rng: random.Random) -> str:
        """A call with its result and the answer copied from it (probability `tool_rate`), else a guess: the addition
        task's carry-forgetting answer. One draw decides, then the guess draws its own."""
        if rng.random() < self.tool_rate:
            return self.tool_transcript(row["prompt"])
        return super().demonstrate(row, rng)

    def turn_rows(self, rows: Sequence[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
        """SFT rows of the demonstrator, one per model turn (`prompt`, `completion`): a call is two rows, the call
        (after the problem) and the answer (after the problem, the call and the calculator's result), so the result
        is context and never a target, as in a rollout, where it is inserted and masked; a guess is one row. (SFT
        ends every completion with EOS; in a rollout the call's turn ends at the stop string `</calc>`, before it.)
        Trained on whole transcripts instead, the tiny model also learns to predict the result's digits from the
        call, which it cannot, and at 2 of 4 seeds it then wrote a sum of its own after `</result>` instead of copying
        the result (0% of its sampled calls right after 300 SFT steps, tool_rate 0.35-0.45); with one row per turn
        64-71% at each of 4 seeds."""
        out = []
        for row in rows:
            text = self.demonstrate(row, rng)
            if not text.startswith(CALL_OPEN):
                out.append({**row, "completion": text})
                continue
            call = text.index(CALL_CLOSE) + len(CALL_CLOSE)
            answer = text.rindex(RESULT_CLOSE) + len(RESULT_CLOSE)
            out.append({**row, "completion": text[:call]})
            out.append({**row, "prompt": row["prompt"] + text[:answer], "completion": text[answer:]})
        return out

    def is_correct(self, completion: str, answer: str) -> bool:
        """Gold checker on the final answer (`final_answer`; see `arithmetic.check_answer`)."""
        return check_answer(final_answer(completion), answer)

    def tool_call_rate(self, completions: Sequence[Any]) -> float:
        """Fraction of transcripts with at least one complete call."""
        if not completions:
            raise ValueError("tool_call_rate needs at least one completion")
        return sum(count_tool_calls(c) > 0 for c in completions) / len(completions)
