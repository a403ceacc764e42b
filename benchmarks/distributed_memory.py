"""Peak memory per rank while loading and while training, one process vs 2 ranks under `distributed: ddp` and
`distributed: fsdp` (the sharded load and today's load-everything path): a record, not a test.

    python benchmarks/distributed_memory.py                     # the 33.6M workload, 2 ranks, 2 repeats
    python benchmarks/distributed_memory.py --workload smollm2-135m --model-path /path/to/SmolLM2-135M-Instruct
    python benchmarks/distributed_memory.py --workload tiny-qwen2-6m --repeats 1 --no-record   # the code path

The same GRPO workload as benchmarks/vs_trl.py (the 33.6M Qwen2: 8 prompts x 8 completions, <= 64 tokens, beta 0.04,
so a reference model is held too; SmolLM2-135M: 4 x 8 chat word problems) runs in four modes, each launch fresh:

- `one-process`: `python`, the model given by its folder;
- `ddp`: `torchrun --nproc_per_node 2`, the model given by its folder (every rank loads it whole);
- `fsdp`: the same launch under `distributed: fsdp`, the model given by its folder: grpokit's own FSDP load (with
  the sharded load, each rank builds the model on the meta device and reads only its shards from the files);
- `fsdp-load-whole`: the same launch under fsdp, but every rank loads the whole model itself (`load_model`, float32,
  on the CPU) and hands the object to GRPOTrainer: the whole-then-shard path (the reference a copy of the whole).

each under glibc's default allocator and with MALLOC_MMAP_THRESHOLD_=131072 (see ALLOCATORS). Every process reports:
its RSS before the trainer is built (the PyTorch runtime, grpokit imported); its high-water RSS when the trainer is
built, before the first step (`ru_maxrss` read then: the peak while loading); its high-water RSS during training
alone (the kernel's mark reset through /proc/self/clear_refs after the build, `VmHWM` read after the last step; where
that reset is refused, the whole run's high-water mark, and the record says so); its step times (the first is a
warm-up); and the bytes its model state holds after training (`Policy.memory_mb`: weights, reference, AdamW
moments, gradients; its shards under fsdp). The final weights of the first launch of each mode are compared with
one process's, tensor by tensor (max |a - b| / max |b|, the worst tensors named). On a CPU every rank's RSS also
holds its own copy of the PyTorch runtime, so the saving shows as a difference, not a ratio of totals. It prints the
figures and writes benchmarks/results/distributed-memory-WORKLOAD.json (`--no-record`: prints only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import vs_trl  # noqa: E402

MODES = ("one-process", "ddp", "fsdp", "fsdp-load-whole")
# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a process's RSS stays at its
# high-water mark of freed-and-reusable memory; FSDP gathers and frees every layer's weights and gradients at
# each forward and backward, which that inflates. With a fixed threshold of 128 KiB every large block is its
# own mapping, returned when freed: RSS then follows the memory actually held.
ALLOCATORS = {"glibc-default": {}, "mmap-128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
GB = 2**20  # KiB per GB (GiB): ru_maxrss and /proc/self/status count KiB on Linux


def status_kib(field: str) -> int:
    """A `/proc/self/status` figure in KiB (VmRSS: resident now; VmHWM: the high-water mark)."""
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(found.group(1))


def reset_high_water() -> bool:
    """Reset this process's RSS high-water mark to its RSS now (Linux >= 4.0: `5` to /proc/self/clear_refs), so a
    later VmHWM is the peak since; False where the kernel or the sandbox refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(workload: str, steps: int, mode: str, out: str, report: str, model_path: str | None) -> None:
    """One process of a launch: build the trainer, train, then write this rank's memory figures and step times to
    REPORT-RANK.json."""
    import torch

    from grpokit.model.loading import load_model
    from grpokit.stages.grpo import GRPOTrainer  # noqa: F401  (imported before the baseline RSS: the runtime's)

    distributed = "fsdp" if mode.startswith("fsdp") else "ddp"
    start_rss = status_kib("VmRSS") / GB
    t0 = time.perf_counter()
    model_dir, _ = vs_trl.prepare(workload, model_path)  # (built by the launcher: only the paths here)
    model = load_model(model_dir, torch.device("cpu"), torch.float32) if mode == "fsdp-load-whole" else None
    trainer, starts = vs_trl.clocked_grpokit(
        workload, steps, out, model_dir=model_dir, model=model, save_every=0, tensorboard=False,
        distributed=distributed, device="cpu",
    )  # fmt: skip
    del model  # (the trainer holds it now, sharded or not)
    load_s = time.perf_counter() - t0
    loading_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB  # Linux: KiB
    reset = reset_high_water()
    expected = {"one-process": (1, False), "ddp": (2, False), "fsdp": (2, True), "fsdp-load-whole": (2, True)}[mode]
    got = (trainer.cluster.world_size, trainer.cluster.sharded)
    if got != expected:
        raise RuntimeError(f"mode {mode}: the trainer runs (world size, sharded) = {got}, expected {expected}")
    trainer.train()
    training_peak = (status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / GB
    rank = trainer.cluster.rank
    state = model_state_mb(trainer.policy)
    trainer.cluster.close()
    result = {
        "rank": rank,
        "start_rss_gb": start_rss,
        "load_s": load_s,
        "loading_peak_rss_gb": loading_peak,
        "training_peak_rss_gb": training_peak,
        "training_peak_alone": reset,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB,
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


def launch(args, mode: str, allocator: str, keep: Path | None = None) -> list[dict]:
    """One fresh launch of `mode` under `allocator`; the reports of its processes, by rank. `keep`: where the
    run's final model folder is moved (for the weights' comparison)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = f"{tmp}/report"
        cmd = [__file__, "--worker", "--mode", mode, "--workload", args.workload, "--steps", str(args.steps)]
        cmd += ["--out", f"{tmp}/run", "--report", report]
        cmd += ["--model-path", str(args.model_path)] if args.model_path else []
        env = {**os.environ, **ALLOCATORS[allocator]}
        if mode == "one-process":
            cmd = [sys.executable, *cmd]
        else:  # one thread per rank: two ranks share the two cores
            env["OMP_NUM_THREADS"] = "1"
            cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", *cmd]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        if keep is not None:
            shutil.move(f"{tmp}/run/model", keep)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("report-*.json"))]


def safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, over every *.safetensors file of a model folder (one file or shards)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    if not where:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    return where


def weights_difference(run: Path, reference: Path, worst: int = 3) -> dict:
    """max |a - b| / max |b| over every tensor of two saved models (b: `reference`'s), read one tensor at a time;
    the `worst` tensors by that figure."""
    from safetensors import safe_open

    a_at, b_at = safetensors_index(run), safetensors_index(reference)
    if a_at.keys() != b_at.keys():
        raise ValueError(f"{run} and {reference} hold different tensors: {sorted(a_at.keys() ^ b_at.keys())[:5]}")
    by_tensor = {}
    for name in sorted(a_at):
        with safe_open(a_at[name], framework="pt") as fa, safe_open(b_at[name], framework="pt") as fb:
            a, b = fa.get_tensor(name).double(), fb.get_tensor(name).double()
        by_tensor[name] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
    ranked = sorted(by_tensor.items(), key=lambda kv: -kv[1])
    # Qwen2's attention biases: the key bias's gradient is 0 in exact arithmetic (a softmax ignores a shift all its
    # keys share), so AdamW turns rounding noise that differs between summation orders into learning-rate-sized
    # steps (tests/test_distributed.py, `llama_path`); the figure without biases isolates that
    matrices = [v for k, v in ranked if not k.endswith(".bias")]
    return {
        "max_relative_difference": ranked[0][1],
        "max_relative_difference_without_biases": matrices[0] if matrices else None,
        "worst_tensors": ranked[:worst],
        "tensors": len(ranked),
    }


def describe_model(folder: Path) -> dict:
    """The model a record names: its folder, the config's name and type, its parameter count (from the files)."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    count = 0
    for name, path in safetensors_index(folder).items():
        with safe_open(path, framework="pt") as f:
            shape = f.get_slice(name).get_shape()
        count += math.prod(shape)
    return {
        "path": str(folder),
        "name": config.get("_name_or_path") or folder.name,
        "model_type": config.get("model_type"),
        "parameters": count,
        "tied_embeddings": config.get("tie_word_embeddings"),
    }


def summarize(launches: list[list[dict]]) -> dict:
    """One mode's figures over its launches (medians over every process of every launch)."""
    every = [r for reports in launches for r in reports]

    def each(key: str) -> list[float]:
        return [r[key] for r in every]

    times = [t for reports in launches for t in reports[0]["step_times"][1:]]
    return {
        "model_state_mb_per_process": launches[0][0]["model_state_mb"],
        "model_state_mb_each_rank": [r["model_state_mb"]["total"] for r in launches[0]],
        "median_start_rss_gb_per_process": statistics.median(each("start_rss_gb")),
        "median_loading_peak_rss_gb_per_process": statistics.median(each("loading_peak_rss_gb")),
        "loading_peak_rss_gb_each": each("loading_peak_rss_gb"),
        "median_training_peak_rss_gb_per_process": statistics.median(each("training_peak_rss_gb")),
        "training_peak_rss_gb_each": each("training_peak_rss_gb"),
        "training_peak_alone": all(each("training_peak_alone")),
        "median_peak_rss_gb_per_process": statistics.median(each("peak_rss_gb")),
        "peak_rss_gb_each": each("peak_rss_gb"),
        "median_load_s": statistics.median(each("load_s")),
        "median_step_s": statistics.median(times) if times else None,
        "processes": len(launches[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="qwen2-34m", choices=list(vs_trl.WORKLOADS))
    parser.add_argument("--model-path", type=Path, help="the workload's model folder (default: built or fetched)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    parser.add_argument("--no-record", action="store_true", help="print the record, write no file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.workload, args.steps, args.mode, args.out, args.report, args.model_path)
        return
    if args.model_path:
        args.model_path = args.model_path.resolve()

    model_dir, _ = vs_trl.prepare(args.workload, args.model_path)  # built once, before any launch
    keys = [(allocator, mode) for allocator in args.allocators for mode in args.modes]
    runs: dict[tuple[str, str], list[list[dict]]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory() as kept:
        finals: dict[str, Path] = {}  # mode -> the final model of its first launch
        for repeat in range(args.repeats):
            for allocator, mode in keys:  # in turn, so machine drift hits every mode alike
                keep = None if mode in finals else Path(kept) / mode
                runs[allocator, mode].append(launch(args, mode, allocator, keep))
                finals[mode] = finals.get(mode) or keep
                last = runs[allocator, mode][-1]
                peaks = ", ".join(
                    f"rank {r['rank']}: loading {r['loading_peak_rss_gb']:.3f}, "
                    f"training {r['training_peak_rss_gb']:.3f}"
                    for r in last
                )
                print(f"repeat {repeat + 1}, {allocator}, {mode}: peak RSS GB {peaks}", flush=True)
        weights = {}
        if "one-process" in finals:
            for mode, folder in finals.items():
                if mode != "one-process":
                    weights[mode] = weights_difference(folder, finals["one-process"])
                    print(f"final weights, {mode} vs one process: {weights[mode]}", flush=True)
    figures = {a: {m: summarize(runs[a, m]) for m in args.modes} for a in args.allocators}

    def ratio(numerator: str, denominator: str) -> float | None:
        """Model state per process of one mode over another's (counted from the tensors: any allocator's)."""
        held = {m: f["model_state_mb_per_process"]["total"] for m, f in figures[args.allocators[0]].items()}
        return held[numerator] / held[denominator] if numerator in held and denominator in held else None

    spec = vs_trl.WORKLOADS[args.workload]
    record = {
        "what": "peak RSS per process while loading and while training, one process vs 2 ranks under ddp, fsdp "
        "(the model given by its folder) and fsdp with the model loaded whole and handed in (torchrun, gloo, CPU)",
        "workload": args.workload,
        "model": describe_model(model_dir),
        "config": {**spec, "beta": vs_trl.BETA, "steps_timed": args.steps - 1, "repeats": args.repeats},
        "commit": vs_trl.commit(),
        "date": datetime.date.today().isoformat(),
        "machine": vs_trl.machine(),
        "modes": {
            "one-process": "python, the model given by its folder",
            "ddp": "torchrun 2 ranks, distributed: ddp, the model given by its folder",
            "fsdp": "torchrun 2 ranks, distributed: fsdp, the model given by its folder (grpokit's FSDP load)",
            "fsdp-load-whole": "torchrun 2 ranks, distributed: fsdp, every rank loads the whole model (load_model, "
            "float32) and hands it to GRPOTrainer: whole, then sharded",
        },
        "figures": figures,
        "allocators": {a: ALLOCATORS[a] for a in args.allocators},
        "final_weights_vs_one_process": weights,
        "fsdp_vs_ddp_peak_rss_gb": {
            a: f["fsdp"]["median_peak_rss_gb_per_process"] - f["ddp"]["median_peak_rss_gb_per_process"]
            for a, f in figures.items()
            if "fsdp" in f and "ddp" in f
        },
        "fsdp_vs_ddp_model_state": ratio("fsdp", "ddp"),
        "fsdp_vs_one_process_model_state": ratio("fsdp", "one-process"),
    }
    print(json.dumps(record, indent=2))
    if args.no_record:
        return
    path = ROOT / "benchmarks" / "results" / f"distributed-memory-{args.workload}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
