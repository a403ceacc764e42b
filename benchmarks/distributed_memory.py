"""Peak memory per rank under `distributed: ddp` and `distributed: fsdp`, beside one process: a record, not a test.

    python benchmarks/distributed_memory.py                     # the 33.6M workload, 2 ranks, 2 repeats
    python benchmarks/distributed_memory.py --workload tiny-qwen2-6m --repeats 1

The same GRPO workload as benchmarks/vs_trl.py (the 33.6M Qwen2: 8 prompts x 8 completions, <= 64 tokens, beta 0.04,
so a reference model is held too) runs as one process, then as `torchrun --nproc_per_node 2` under ddp and under
fsdp, in turn, each launch fresh, under glibc's default allocator and with MALLOC_MMAP_THRESHOLD_=131072 (see
ALLOCATORS). Every process reports its high-water RSS (loading included), its step times (the first is a warm-up)
and the bytes its model state holds (weights, reference, AdamW moments, gradients; its shards under fsdp). On a
CPU every rank's RSS also holds its own copy of the PyTorch runtime, so the saving shows as a difference, not a
ratio of totals. It prints the figures and writes benchmarks/results/distributed-memory-WORKLOAD.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import vs_trl  # noqa: E402

MODES = ("one-process", "ddp", "fsdp")
# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a process's RSS stays at its
# high-water mark of freed-and-reusable memory; FSDP gathers and frees every layer's weights and gradients at
# each forward and backward, which that inflates. With a fixed threshold of 128 KiB every large block is its
# own mapping, returned when freed: RSS then follows the memory actually held.
ALLOCATORS = {"glibc-default": {}, "mmap-128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def worker(workload: str, steps: int, mode: str, out: str, report: str) -> None:
    """One process of a launch: train, then write this rank's peak RSS and step times to REPORT-RANK.json."""
    distributed = "fsdp" if mode == "fsdp" else "ddp"
    trainer, starts = vs_trl.clocked_grpokit(
        workload, steps, out, save_every=0, tensorboard=False, distributed=distributed
    )
    trainer.train()
    rank = trainer.cluster.rank
    state = model_state_mb(trainer.policy)
    trainer.cluster.close()
    result = {
        "rank": rank,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
        "step_times": [b - a for a, b in zip(starts, starts[1:])],
        "model_state_mb": state,
    }
    Path(f"{report}-{rank}.json").write_text(json.dumps(result))


def model_state_mb(policy) -> dict[str, float]:
    """What this rank's tensors of the model state hold (its shards under fsdp): `Policy.memory_mb`."""
    held = policy.memory_mb()
    out = {"weights": held["weights"], "reference": held["reference"], "adamw": held["optimizer"]}
    out["gradients"] = held["gradients"]
    out["total"] = sum(out.values())
    return out


def launch(workload: str, steps: int, mode: str, allocator: str) -> list[dict]:
    """One fresh launch of `mode` under `allocator`; the reports of its processes, by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        report = f"{tmp}/report"
        args = [__file__, "--worker", "--mode", mode, "--workload", workload, "--steps", str(steps)]
        args += ["--out", f"{tmp}/run", "--report", report]
        env = {**os.environ, **ALLOCATORS[allocator]}
        if mode == "one-process":
            cmd = [sys.executable, *args]
        else:  # one thread per rank: two ranks share the two cores
            env["OMP_NUM_THREADS"] = "1"
            cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", *args]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("report-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="qwen2-34m", choices=list(vs_trl.WORKLOADS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.workload, args.steps, args.mode, args.out, args.report)
        return

    vs_trl.prepare(args.workload)  # built once, before any launch
    keys = [(allocator, mode) for allocator in ALLOCATORS for mode in MODES]
    runs: dict[tuple[str, str], list[list[dict]]] = {key: [] for key in keys}
    for repeat in range(args.repeats):
        for allocator, mode in keys:  # in turn, so machine drift hits every mode alike
            runs[allocator, mode].append(launch(args.workload, args.steps, mode, allocator))
            peaks = [round(r["peak_rss_gb"], 3) for r in runs[allocator, mode][-1]]
            print(f"repeat {repeat + 1}, {allocator}, {mode}: peak RSS per process {peaks} GB", flush=True)
    figures: dict[str, dict] = {allocator: {} for allocator in ALLOCATORS}
    for (allocator, mode), launches in runs.items():
        per_rank = [r["peak_rss_gb"] for reports in launches for r in reports]
        times = [t for reports in launches for t in reports[0]["step_times"][1:]]
        figures[allocator][mode] = {
            "model_state_mb_per_process": launches[0][0]["model_state_mb"],
            "median_peak_rss_gb_per_process": statistics.median(per_rank),
            "peak_rss_gb_each": per_rank,
            "median_step_s": statistics.median(times),
            "processes": len(launches[0]),
        }
    spec = vs_trl.WORKLOADS[args.workload]
    record = {
        "what": "peak RSS per process, one process vs 2 ranks under ddp and fsdp (torchrun, gloo, CPU)",
        "workload": args.workload,
        "config": {**spec, "beta": vs_trl.BETA, "steps_timed": args.steps - 1, "repeats": args.repeats},
        "commit": vs_trl.commit(),
        "date": datetime.date.today().isoformat(),
        "machine": vs_trl.machine(),
        "figures": figures,
        "allocators": ALLOCATORS,
        "fsdp_vs_ddp_peak_rss_gb": {
            a: f["fsdp"]["median_peak_rss_gb_per_process"] - f["ddp"]["median_peak_rss_gb_per_process"]
            for a, f in figures.items()
        },
        "fsdp_vs_ddp_model_state": figures["mmap-128k"]["fsdp"]["model_state_mb_per_process"]["total"]
        / figures["mmap-128k"]["ddp"]["model_state_mb_per_process"]["total"],
    }
    print(json.dumps(record, indent=2))
    path = ROOT / "benchmarks" / "results" / f"distributed-memory-{args.workload}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
