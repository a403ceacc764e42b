"""SmolLM2-135M-Instruct learns reasoning-gym's chain_sum with GRPO on a CPU: the record of
examples/grpo_smollm2_reasoning_gym.yaml at several seeds, run side by side (one torch thread each), held-out accuracy
(200 problems the training split never holds) before, during and after, wall time and peak RSS of each run.

    grpokit fetch-model smollm2 runs/smollm2
    python benchmarks/smollm2_reasoning_gym.py [--seeds 0 1] [--out benchmarks/results] [--runs runs/rg]
        [--name smollm2-chain-sum] [-- FLAGS for grpokit train, e.g. --dynamic-sampling]

Writes OUT/NAME.json (the figures of every run, the flags, the machine, commit, date) and OUT/NAME.png (reward and
held-out accuracy per step, a curve per seed), and prints a table."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
import yaml

from grpokit.config import GRPOConfig, load_yaml
from grpokit.demo import plot_runs
from grpokit.report.runlog import read_metrics

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "grpo_smollm2_reasoning_gym.yaml"
HELD_OUT = ("eval/accuracy_greedy", "eval/accuracy_sampled")


def run_seeds(seeds: list[int], runs: Path, flags: list[str]) -> dict[int, dict]:
    """One `grpokit train` process per seed, all at once; -> per seed its wall seconds and peak RSS (os.wait4)."""
    started, procs = {}, {}
    for seed in seeds:
        out = runs / f"seed{seed}"
        cmd = [sys.executable, "-m", "grpokit.cli", "train", str(CONFIG), "--seed", str(seed), "--output-dir", str(out),
               "--overwrite-output-dir", *flags]  # fmt: skip
        log = open(runs / f"seed{seed}.log", "w")  # noqa: SIM115 (closed with the process)
        procs[seed] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        started[seed] = time.perf_counter()
    done = {}
    by_pid = {p.pid: s for s, p in procs.items()}
    while by_pid:
        pid, status, usage = os.wait4(-1, 0)
        seed = by_pid.pop(pid, None)
        if seed is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"seed {seed}: grpokit train exited {code}; see {runs / f'seed{seed}.log'}")
        done[seed] = {"wall_s": round(time.perf_counter() - started[seed], 1), "peak_rss_gb": usage.ru_maxrss / 1e6,
                      "load_average_at_end": os.getloadavg()}  # fmt: skip
    return done


def summarize(folder: Path, process: dict) -> dict:
    """A run's figures from its metrics.jsonl: held-out accuracy at each evaluation, the reward per step, the time
    spent training (the steps' own clocks, evaluations left out)."""
    records = read_metrics(folder / "metrics.jsonl")
    evals = {r["step"]: {k: r[k] for k in HELD_OUT} for r in records if HELD_OUT[0] in r}
    steps = [r for r in records if "time/step" in r]
    train_s, minutes_at = 0.0, {}
    for r in steps:
        train_s += r["time/step"]
        minutes_at[r["step"]] = train_s / 60
    first, last = min(evals), max(evals)
    return {
        "held_out": {str(k): v for k, v in sorted(evals.items())},
        "gain_greedy_points": round(100 * (evals[last][HELD_OUT[0]] - evals[first][HELD_OUT[0]]), 1),
        "gain_sampled_points": round(100 * (evals[last][HELD_OUT[1]] - evals[first][HELD_OUT[1]]), 1),
        "training_minutes_at_eval": {str(k): round(minutes_at.get(k, 0.0), 1) for k in sorted(evals)},
        "reward_per_step": [round(r["reward"], 4) for r in steps],
        "median_step_s": round(sorted(r["time/step"] for r in steps)[len(steps) // 2], 2),
        "training_s": round(train_s, 1),
        **process,
    }


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "rg")
    parser.add_argument("--name", default="smollm2-chain-sum", help="the record's file name (without .json/.png)")
    parser.add_argument("--summarize-only", action="store_true", help="read finished runs in --runs, train nothing")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (kept in the record)")
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(flags) - (1 if "--" in argv else 0)])
    name = args.name
    script = "python benchmarks/smollm2_reasoning_gym.py --seeds"
    command = " ".join([script, *map(str, args.seeds), *(["--", *flags] if flags else [])])
    args.runs.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    if args.summarize_only:
        process = {s: json.loads((args.runs / f"seed{s}.process.json").read_text()) for s in args.seeds}
    else:
        process = run_seeds(args.seeds, args.runs, flags)
        for s, p in process.items():  # the commit the runs trained at, for a record made later (--summarize-only)
            (args.runs / f"seed{s}.process.json").write_text(json.dumps({**p, "commit": commit.strip()}))
    commit = process[args.seeds[0]].pop("commit", commit)  # (each seed's is the same)
    for p in process.values():
        p.pop("commit", None)
    runs = {s: summarize(args.runs / f"seed{s}", process[s]) for s in args.seeds}
    cfg = load_yaml(GRPOConfig, CONFIG)
    fields = yaml.safe_load(CONFIG.read_text())  # the fields the example sets (each seed's own `seed` aside)
    record = {
        "name": name,
        "what": "examples/grpo_smollm2_reasoning_gym.yaml: GRPO with LoRA on SmolLM2-135M-Instruct, reasoning-gym "
        "chain_sum, seeds side by side on one CPU",
        "command": command,
        "flags": flags,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields},
        "runs": {str(s): r for s, r in runs.items()},
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "shared": args.note,
        },  # fmt: skip
        "commit": commit.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    results = {f"seed {s}": SimpleNamespace(output_dir=args.runs / f"seed{s}") for s in args.seeds}
    panels = (("reward", "reward (training samples)"), (HELD_OUT[0], "held-out accuracy, greedy"),
              (HELD_OUT[1], "held-out accuracy, sampled at 0.7"))  # fmt: skip
    plot_runs(results, panels, args.out / f"{name}.png", title="SmolLM2-135M-Instruct, GRPO on reasoning-gym chain_sum")
    print(f"{'seed':>4} {'greedy before':>13} {'after':>6} {'sampled before':>14} {'after':>6} {'train min':>9} "
          f"{'wall min':>8} {'RSS GB':>6}")  # fmt: skip
    for s, r in runs.items():
        h = r["held_out"]
        a, b = h[min(h, key=int)], h[max(h, key=int)]
        print(
            f"{s:>4} {a[HELD_OUT[0]]:>13.3f} {b[HELD_OUT[0]]:>6.3f} {a[HELD_OUT[1]]:>14.3f} {b[HELD_OUT[1]]:>6.3f} "
            f"{r['training_s'] / 60:>9.1f} {r['wall_s'] / 60:>8.1f} {r['peak_rss_gb']:>6.2f}"
        )


if __name__ == "__main__":
    main()
