"""What a sandboxed run costs, and what each limit does: grpokit.sandbox measured on this machine.

    python benchmarks/sandbox_overhead.py            # 20 runs of each; writes benchmarks/results/sandbox-overhead.json

Overhead: the median wall time of `run("pass")` in bwrap, of the same with `trusted=True` (no bwrap; the wrapper
that sets the rlimits still starts), and of the bare interpreter (`python3 -I -c pass` through subprocess.run), each
`--repeats` times, interleaved. Limits: one run per limit at the tests' settings, with what it printed and how it
ended. It prints the config, commit, machine and figures (docs/sandbox.md quotes them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import RESULTS, commit  # noqa: E402

from grpokit.sandbox import SandboxLimits, default_interpreter, find_bwrap, run  # noqa: E402

LIMIT_CASES = {
    "infinite loop (cpu_seconds=1)": ("while True:\n    pass\n", SandboxLimits(cpu_seconds=1)),
    "2 GiB allocation (memory_bytes=256 MiB)": ("x = bytearray(2 * 1024**3)\n", SandboxLimits(memory_bytes=256 << 20)),
    "fork bomb (processes=16)": (
        "import os\nr, w = os.pipe()\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
        "            os.close(w)\n            os.read(r, 1)\n            os._exit(0)\n        n += 1\n"
        "except OSError as err:\n    print('stopped at', n, err.strerror)\n",
        SandboxLimits(processes=16),
    ),
    "200 MB of output (output_bytes=64 KiB)": (
        "import sys\nfor _ in range(200):\n    sys.stdout.buffer.write(b'x' * (1 << 20))\n",
        SandboxLimits(output_bytes=64 << 10),
    ),
    "sleep (wall_seconds=1)": ("import time\ntime.sleep(600)\n", SandboxLimits(wall_seconds=1.0)),
    "17 MiB file (file_bytes=16 MiB)": (
        "open('/tmp/big', 'wb').write(b'x' * (17 << 20))\n",
        SandboxLimits(file_bytes=16 << 20),
    ),
    "network (connect to 1.1.1.1:53)": (
        "import socket\ns = socket.socket()\ns.settimeout(5)\ns.connect(('1.1.1.1', 53))\n",
        SandboxLimits(),
    ),
    "write outside /tmp (/usr/x)": ("open('/usr/x', 'w')\n", SandboxLimits()),
}


def medians(repeats: int) -> dict[str, float]:
    python = default_interpreter()
    times: dict[str, list[float]] = {"sandboxed_ms": [], "trusted_ms": [], "bare_interpreter_ms": []}
    run("pass")  # the first sandboxed run also probes bwrap once (cached): not a run's cost
    for _ in range(repeats):
        for key, call in (
            ("sandboxed_ms", lambda: run("pass")),
            ("trusted_ms", lambda: run("pass", trusted=True)),
            ("bare_interpreter_ms", lambda: subprocess.run([python, "-I", "-c", "pass"], check=True)),
        ):
            start = time.perf_counter()
            call()
            times[key].append((time.perf_counter() - start) * 1000)
    return {key: round(statistics.median(values), 1) for key, values in times.items()}


def outcome(result) -> str:
    said = (result.stdout + result.stderr).strip().splitlines()
    end = (
        "timed out"
        if result.timed_out
        else "output cut at the cap"
        if result.output_truncated
        else f"killed by {result.killed_by}"
        if result.killed_by
        else f"exit {result.exit_code}"
    )
    kept = f", {len(result.stdout)} bytes of stdout kept" if result.output_truncated else ""
    return f"{end}{kept} after {result.wall_seconds:.2f} s" + (f"; last line: {said[-1][:100]}" if said else "")


CPUINFO = Path("/proc/cpuinfo").read_text().splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    record = {
        "benchmark": "sandbox-overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": {
            "cpu": next((ln.split(":", 1)[1].strip() for ln in CPUINFO if ln.startswith("model name")), "?"),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "euid": os.geteuid(),
        },
        "bwrap": find_bwrap(),
        "bwrap_version": subprocess.run([find_bwrap(), "--version"], capture_output=True, text=True).stdout.strip(),
        "interpreter": default_interpreter(),
        "repeats": args.repeats,
        "median_ms": medians(args.repeats),
        "limits": {name: outcome(run(code, limits=limits)) for name, (code, limits) in LIMIT_CASES.items()},
    }
    print(json.dumps(record, indent=1))
    (RESULTS / "sandbox-overhead.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
