"""The demo's runs for the tests, in a process of their own: `python demo_runs.py ROOT [--warm-start-only]`.

conftest.py starts this process when the session holds a test that needs the demo (`demo_warm_start`,
`demo_runs`), before the first test, so that the demo trains on the core the suite leaves idle (the suite runs one
test at a time, nearly all on one thread, and CI's machine has two cores). It makes what the demo tests made in the
test process, with the same calls: the demo's warm start in ROOT/runs (`demo.warm_start`; its held-out rows to
ROOT/eval_rows.json), then, unless the session needs the SFT model only (--warm-start-only), `run_demo` and
`run_pipeline` on copies of it, each writing its runs into ROOT/runs and its table to ROOT/NAME.json. Each stage
seeds itself and pins its own thread count, so the figures do not depend on the process they are made in.

It says on stdout when each part is done (`warm`, `demo`, `pipeline`, a line each, in that order); what the demo
prints goes to ROOT/demo.log, beside its warnings and any traceback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
from pathlib import Path


def config(root: Path):
    """The demo's config the tests use: its defaults, its output in ROOT/runs."""
    from grpokit.config import DemoConfig

    return DemoConfig(output_dir=str(root / "runs"), progress=False)


def main(root: Path, tables: bool = True) -> None:
    from grpokit.demo import run_demo, run_pipeline, warm_start

    os.nice(10)  # the suite's own processes first: this one is meant for the core they leave idle
    die_with_parent()
    cfg, said = config(root), sys.stdout
    with open(root / "demo.log", "a") as log, contextlib.redirect_stdout(log):
        warm = warm_start(cfg, Path(cfg.output_dir))  # its model saved in ROOT/runs/sft/model
        (root / "eval_rows.json").write_text(json.dumps(warm.eval_rows))
        print("warm", file=said, flush=True)
        for name, run in (("demo", run_demo), ("pipeline", run_pipeline)) if tables else ():
            table = run(cfg, warm=dataclasses.replace(warm, model=copy.deepcopy(warm.model)))  # training changes it
            (root / f"{name}.json").write_text(json.dumps(table))
            print(name, file=said, flush=True)


def die_with_parent() -> None:
    """Linux: killed when the test process dies, however it dies (a CI runner's SIGKILL runs no teardown)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call: nobody waits for this process
        sys.exit(1)


# a guard against a hang, not a speed bound: the demo's runs take about 210 s on one free core
WAIT_LIMIT_S = 3600


class Background:
    """This process, seen from the test process (conftest's `demo_background`)."""

    def __init__(self, root: Path, tables: bool):
        import subprocess

        self.root, self.said, self.pending = root, set(), ""
        self.out = Path(config(root).output_dir)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        with open(root / "demo.log", "a") as log:  # appending, as the process's redirected stdout does
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(root), *([] if tables else ["--warm-start-only"])],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )

    def wait(self, part: str) -> None:
        """Blocks on the process's stdout (no polling) until it says `part` is done; its log if it ended first."""
        import select
        import time

        deadline, fd = time.monotonic() + WAIT_LIMIT_S, self.proc.stdout.fileno()
        while part not in self.said:  # raw reads of the pipe: a buffered readline could hide a line from select
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                self.proc.kill()
                log = (self.root / "demo.log").read_text()
                raise AssertionError(f"the demo's process said nothing for {WAIT_LIMIT_S} s (killed):\n{log[-5000:]}")
            data = os.read(fd, 4096)
            if not data:
                code = self.proc.wait()
                log = (self.root / "demo.log").read_text()
                raise AssertionError(f"the demo's process ended (exit {code}) before its {part!r}:\n{log[-5000:]}")
            self.pending += data.decode()
            *lines, self.pending = self.pending.split("\n")
            self.said.update(line.strip() for line in lines)

    def table(self, name: str) -> dict:
        """`run_demo`'s table (`demo`) or `run_pipeline`'s (`pipeline`), once made."""
        self.wait(name)
        return json.loads((self.root / f"{name}.json").read_text())

    def close(self) -> None:
        """At the session's end: a process still training (the session stopped early) is killed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), tables="--warm-start-only" not in sys.argv[2:])
