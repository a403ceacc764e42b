"""The `code_tests` reward: the completion's Python run against the row's test cases in the sandbox
(`grpokit.runtime.sandbox`), paid the fraction of the tests that pass.

Data: a `tests` column, per row a non-empty list of Python statements, each one test, typically one assert:

    {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}

The harness (`HARNESS`) runs the completion's code as `__main__` and then each test in the namespace the code left;
a test passes when it runs to its end. It reports the count on stdout after a random token it read from stdin
before the code ran, then leaves through `os._exit`, so:
- a program that only exits (`sys.exit(0)` before the tests could run, or `os._exit(0)`) is not paid: SystemExit
  ends the code, and the tests still run against what it defined (nothing); `os._exit` ends the process before
  the report, which scores 0;
- printing a count does not pay without the token; the program's own atexit handlers never run after the report;
- `exec`, `compile`, `os.write` and `os._exit` are held by the harness before the code runs: replacing them in
  `builtins` or `os` neither skips the tests nor edits the report;
- a program that raises (a SyntaxError, an exception at import time) scores 0, as does one that passes any limit
  (the wall-clock or CPU limit, memory, its output cap).
What it cannot stop: code in the same process can find the token (gc, frames) or return objects that equal
everything (`__eq__` always True). Read the completions when the reward climbs fast; `report.monitor` watches for
a reward that outruns the gold checker.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from grpokit.data.rows import completion_text
from grpokit.runtime.sandbox import DEFAULT_LIMITS, SandboxLimits, SandboxResult, run

__all__ = ["HARNESS", "TestOutcome", "code_tests_reward", "extract_code", "run_tests"]

# A fenced block: its language tag and its body; an unclosed last fence (a completion cut at its length limit) runs
# to the end of the text. Matched left to right, so a block's closing fence never opens another.
FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
PYTHON_TAGS = ("python", "python3", "py", "")  # "": a bare ``` fence

# The program `run_tests` runs: this, then `_grpokit_harness(solution, tests)` with both as literals (repr); the token
# comes on stdin. Names start with _grpokit_ so that they stay out of the solution's way.
HARNESS = """\
import os as _grpokit_os, sys as _grpokit_sys


def _grpokit_harness(solution, tests):
    import builtins, traceback

    # held here before the solution runs: patching builtins.exec or os.write cannot skip the tests or edit the report
    run, compile_, write, leave, flush = exec, compile, _grpokit_os.write, _grpokit_os._exit, _grpokit_sys.stdout.flush
    token = _grpokit_sys.stdin.readline().strip()
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    passed = 0
    try:
        run(compile_(solution, "solution.py", "exec"), namespace)
    except SystemExit:
        pass  # the program ended: the tests still run against what it defined
    except BaseException:
        traceback.print_exc()
        tests = []
    for i, test in enumerate(tests):
        try:
            run(compile_(test, "test_%d" % i, "exec"), namespace)
            passed += 1
        except BaseException:
            traceback.print_exc(limit=1)
    try:
        flush()
    except BaseException:
        pass
    write(1, ("\\n%s %d\\n" % (token, passed)).encode())
    leave(0)
"""


def extract_code(completion: str) -> str:
    """The code of a completion: its last ```python (```py, ```python3 or bare ```) fenced block, else the whole
    text."""
    blocks = [body for tag, body in FENCE.findall(completion) if tag.lower() in PYTHON_TAGS]
    return blocks[-1] if blocks else completion


@dataclass(frozen=True)
class TestOutcome:
    """How a solution did against its tests."""

    __test__ = False  # not a pytest test class, whatever its name

    passed: int
    total: int
    result: SandboxResult

    @property
    def score(self) -> float:
        """The fraction of the tests that passed; 0 when the run did not end cleanly within its limits."""
        if self.result.timed_out or self.result.output_truncated or self.result.killed_by:
            return 0.0
        return self.passed / self.total


def run_tests(
    code: str,
    tests: Sequence[str],
    *,
    limits: SandboxLimits = DEFAULT_LIMITS,
    trusted: bool = False,
    interpreter: str | None = None,
    bwrap: str | None = None,
) -> TestOutcome:
    """Run `code` and then each statement of `tests` in the sandbox (`HARNESS`); a missing sandbox raises."""
    token = secrets.token_hex(16)
    program = f"{HARNESS}\n\n_grpokit_harness({code!r}, {list(tests)!r})\n"
    result = run(program, stdin=token + "\n", limits=limits, trusted=trusted, interpreter=interpreter, bwrap=bwrap)
    found = re.findall(rf"^{token} (\d+)$", result.stdout, flags=re.M)
    passed = int(found[-1]) if found else 0
    return TestOutcome(min(passed, len(tests)), len(tests), result)


def _checked_tests(tests: Any, row: int) -> list[str]:
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence) or not tests:
        raise ValueError(
            f"row {row}: the `tests` column is {tests!r:.80}; the `code_tests` reward needs a non-empty list of Python "
            "statements, e.g. ['assert add(1, 2) == 3', 'assert add(0, 0) == 0']"
        )
    for i, test in enumerate(tests):
        if not isinstance(test, str) or not test.strip():
            raise ValueError(f"row {row}: tests[{i}] is {test!r:.80}; each test is a Python statement (text)")
    return list(tests)


def code_tests_reward(
    *,
    limits: SandboxLimits = DEFAULT_LIMITS,
    trusted: bool = False,
    interpreter: str | None = None,
    bwrap: str | None = None,
    workers: int | None = None,
) -> Callable[..., list[float]]:
    """The `code_tests` reward with these sandbox settings: per completion, the fraction of its row's `tests` that
    pass (`run_tests` on `extract_code`), 0 for a run that timed out or passed a limit. The rows of a batch run
    `workers` at a time (threads, each run its own sandboxed process; None: as many as the batch, at most 8)."""

    def code_tests(completions: list[Any], tests: list[Any], **_: Any) -> list[float]:
        cases = [_checked_tests(t, row) for row, t in enumerate(tests)]
        codes = [extract_code(completion_text(c)) for c in completions]

        def one(i: int) -> float:
            kwargs = {"limits": limits, "trusted": trusted, "interpreter": interpreter, "bwrap": bwrap}
            return run_tests(codes[i], cases[i], **kwargs).score

        with ThreadPoolExecutor(max_workers=workers or min(8, max(1, len(codes)))) as pool:
            return list(pool.map(one, range(len(codes))))

    return code_tests
