"""`math_accuracy`: a completion's final answer checked against the row's `answer` by math-verify.

math-verify (`pip install 'grpokit[math]'`, the verifier of TRL's and open-r1's accuracy rewards) parses both sides
into sympy and compares them as mathematics: `\\boxed{0.5}` equals 1/2, `(x+1)^2` equals `x^2+2x+1`. The gold answer is
parsed as written, and when that finds nothing and it looks like math, as LaTeX between `$...$` (so `x^2+2x+1` parses
too). The completion's answer is its last `\\boxed{}` (inside its last `<answer>...</answer>` when it has them), else
the text inside those tags (as LaTeX between `$...$` when bare parsing finds nothing), else the whole completion,
where math-verify finds the expression (`completion_answer`). A gold answer that does not parse gives None, not 0:
the row is left out of its group rather than rewarded for nothing (as TRL's accuracy reward does), and a warning and
the metric `math_accuracy/unparsable_gold` (their share of the batch) say so.

math-verify stops a slow parse or comparison with SIGALRM, which works in the main thread only: grpokit calls reward
functions in the main thread (`functions.call_with_timeout`), so its timeouts hold; called from another thread the
reward runs without them (as TRL's does) and grpokit's `reward_timeout` is what bounds it.
"""

from __future__ import annotations

import re
import threading
import warnings
from typing import Any

INSTALL = "pip install 'grpokit[math]'"
_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def import_math_verify() -> Any:
    """The math_verify package; missing: an ImportError saying how to install it."""
    try:
        import math_verify
    except ImportError as err:
        raise ImportError(f"the `math_accuracy` reward needs the math-verify package ({err}): {INSTALL}") from err
    return math_verify


def tagged_answer(text: str) -> str | None:
    """The text inside the last `<answer>...</answer>` of `text`, stripped; None without one."""
    found = _ANSWER_TAGS.findall(text)
    return found[-1].strip() if found else None


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` of `text`, braces balanced (math-verify alone reads several boxes as one set: a model
    that corrects itself, `\\boxed{1} no, \\boxed{2}`, would answer {1, 2}); None without a whole one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for end in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start : end + 1]
    return None


def completion_answer(text: str) -> tuple[str, bool]:
    """What of a completion is its answer, and whether it is bare math (to be read as LaTeX between `$...$` when
    parsing it as it is finds nothing): the last `\\boxed{}` of the text inside its last `<answer>` tags (or of the
    whole text), else the text inside the tags (bare), else the whole completion (prose: math-verify finds the
    expression in it)."""
    tagged = tagged_answer(text)
    inner = tagged if tagged is not None else text
    boxed = last_boxed(inner)
    if boxed is not None:
        return boxed, False
    return inner, tagged is not None


def looks_like_math(text: str) -> bool:
    """Whether a gold answer that math-verify finds nothing in is worth reading as LaTeX between `$...$`: it holds a
    digit, a LaTeX command or an operator (`x^2+2x+1`); words alone (`yes`, `hello world`) would read as products of
    symbols."""
    return any(c.isdigit() or c in "\\^_+-*/=" for c in text)


def math_accuracy_reward(parsing_timeout: int | None = 5, verify_timeout: int | None = 5) -> Any:
    """The `math_accuracy` reward: 1.0 when math-verify finds the completion's answer equal to the row's `answer`,
    0.0 when not (or when the completion has no answer it can parse), None when the gold answer does not parse.
    `parsing_timeout` / `verify_timeout`: seconds math-verify may spend on one parse / one comparison (whole seconds,
    SIGALRM; None: no limit), past which that parse finds nothing / the comparison is false."""
    mv = import_math_verify()
    from grpokit.core.types import InputWarning
    from grpokit.data.rows import completion_text

    warned: list[bool] = []  # the first unparsable gold answer of the run is said once

    def timeouts() -> tuple[int | None, int | None]:
        """math-verify's timeouts where SIGALRM can be set (math-verify says once that they are off elsewhere)."""
        if threading.current_thread() is threading.main_thread():
            return parsing_timeout, verify_timeout
        return None, None

    def parse(text: str, seconds: int | None, *, latex_fallback: bool) -> list:
        parsed = mv.parse(text, parsing_timeout=seconds)
        if not parsed and latex_fallback and looks_like_math(text):
            parsed = mv.parse(f"${text}$", parsing_timeout=seconds)
        return parsed

    def math_accuracy(
        completions: list[Any], answer: list[Any], log_metric: Any = None, final_turns: list[str] | None = None,
        **_: Any,
    ) -> list[float | None]:  # fmt: skip
        """(A multi-turn row is checked on its final turn, `final_turns`.)"""
        parse_seconds, verify_seconds = timeouts()
        texts = final_turns if final_turns is not None else [completion_text(c) for c in completions]
        golds: dict[str, list] = {}  # a group's G completions share one gold answer: parsed once
        out: list[float | None] = []
        for i, (text, gold_answer) in enumerate(zip(texts, answer)):
            key = "" if gold_answer is None else str(gold_answer).strip()
            if key not in golds:
                golds[key] = parse(key, parse_seconds, latex_fallback=True) if key else []
            gold = golds[key]
            if not gold:
                out.append(None)
                if not warned:
                    warned.append(True)
                    warnings.warn(
                        f"math_accuracy: the gold answer {gold_answer!r:.80} (sample {i}) does not parse as "
                        "mathematics: its rows get no reward (None: left out of their groups), here and wherever "
                        "a gold answer does not parse; the metric math_accuracy/unparsable_gold counts them",
                        InputWarning,
                        stacklevel=2,
                    )
                continue
            said, bare = completion_answer(text)
            pred = parse(said, parse_seconds, latex_fallback=bare)
            out.append(float(bool(pred) and mv.verify(gold, pred, timeout_seconds=verify_seconds)))
        if log_metric is not None and out:
            log_metric("math_accuracy/unparsable_gold", sum(v is None for v in out) / len(out))
        return out

    return math_accuracy
