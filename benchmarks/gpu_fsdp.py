"""grpokit on one CUDA GPU, 0.5B and 1.5B Qwen2-shaped models: bfloat16 GRPO steps with and without FSDP, peak GPU
memory (loading and training) and step time.

Not run on a GPU yet. `--smoke` (tiny sizes, float32, on a CPU, gloo) exercises every code path below. It reuses
benchmarks/gpu_step.py's pieces (tokenizer, model config, reward, timing), so the two records measure alike.

How to run, from the repository root, on a machine with one CUDA GPU (grpokit's imports only: torch with CUDA,
transformers, peft, safetensors, tokenizers, ...; never vllm, trl, datasets or tyro; it downloads nothing):

    PYTHONPATH=src python benchmarks/gpu_fsdp.py            # ~6 min on an H200, estimated (see --budget-s)
    PYTHONPATH=src python benchmarks/gpu_fsdp.py --smoke    # tiny sizes, float32, on the CPU (~10 s on 2 cores)

On this workplace's device tool: run(command="PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_fsdp.py",
timeout_s=600); the record comes back from $OUT (gpu-fsdp-qwen2.json). `--budget-s` (default 360) starts no new
setting or timed step past that many seconds and says so in the record (`stopped_early`): a setting started just
before the mark ends within ~2 minutes on an H200, so the run fits the device's 10 minutes with CUDA's start-up.

What it measures, for each model size (`--sizes`: qwen2-0.5b, qwen2-1.5b), each setting (`--modes`) in turn:
- the model: a `transformers.Qwen2Config` of the size's shape (Qwen2-0.5B: 24 layers, hidden 896, 14 heads, 2 KV
  heads, MLP 4864; Qwen2-1.5B: 28 layers, hidden 1536, 12 heads, 2 KV heads, MLP 8960; both vocabulary 151,936,
  tied embeddings) with random weights (seeded), written with `save_pretrained` in bfloat16 (as the hub's Qwen2
  checkpoints are) to a temporary folder on the machine at run time: nothing travels, and the trainer gets the
  folder's path through the config, the input a user gives (so under fsdp grpokit's own FSDP load runs: with the
  sharded load, the model built on the meta device and filled from the files). The tokenizer is gpu_step's
  character tokenizer widened to 151,936 ids, handed in as an object with no EOS id, so every row writes
  `--new-tokens` tokens (equal work in every step);
- `none`: one process, `distributed` at its default (no process group: grpokit's single-process path);
- `fsdp`: the same process inside a 1-rank process group (NCCL; gloo in smoke) with `distributed: fsdp`, which
  grpokit runs as FSDP over one rank (as under `torchrun --nproc_per_node 1`), so every FSDP code path runs
  (fully_shard, the whole-model gather per rollout, the gathers
  per forward and backward, the reduce-scatter of the gradients, AdamW on DTensor shards) with one rank holding
  every shard: the figures are FSDP's overhead on one GPU, not a saving (that needs more ranks). It is checked:
  the trainer must report sharded, else the script stops;
- per setting: the trainer's construction (load from the folder, reference, sharding): its seconds and the peak
  GPU memory during it (`torch.cuda.max_memory_allocated`, reset before), the GPU memory held after it, the host's
  RSS high-water mark during it (reset through /proc/self/clear_refs where allowed); `Policy.memory_mb` (weights,
  reference, AdamW moments, gradients); then one warm-up `trainer.step()` and `--steps` timed ones (CUDA
  synchronized around each): median step time and its `time/*` parts, the peak GPU memory of the steps (reset
  after the build), and the warm-up step's metrics (loss, rewards: none and fsdp start from the same weights and
  seeds, so they should agree to bf16 rounding). beta 0.04 (a reference is held), grpokit's default micro-batch
  budget (512 positions; `--micro-tokens`), float32 weights under bfloat16 autocast (`dtype: bfloat16`), as a
  grpokit run does.

It writes gpu-fsdp-qwen2.json (`--smoke`: gpu-fsdp-smoke.json) to $OUT when that is set, else to
benchmarks/results/ (`--smoke`: the system's temporary folder), and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import re
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402

ROOT = gpu_step.ROOT
QWEN2_15B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_layers": 28,
    "num_heads": 12,
    "num_kv_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,  # (as gpu_step's 0.5B: the rotary tables are computed per forward anyway)
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
SHAPES = {"qwen2-0.5b": gpu_step.QWEN2_05B, "qwen2-1.5b": QWEN2_15B}
# smoke: two tiny shapes of different depth and width, so the two sizes' code paths differ as the real ones do
SMOKE_SHAPES = {
    "qwen2-0.5b": gpu_step.SMOKE,
    "qwen2-1.5b": {**gpu_step.SMOKE, "hidden_size": 96, "intermediate_size": 192, "num_layers": 3, "num_heads": 6},
}
MODES = ("none", "fsdp")
PARTS = ("time/rollout", "time/reward", "time/reference", "time/update", "time/step")
KIB_PER_GIB = 2**20


# ---------------------------------------------------------------- FSDP on one rank


@contextlib.contextmanager
def one_rank_fsdp(device: torch.device):
    """Inside: a 1-rank process group (NCCL on a GPU, gloo on a CPU), which `Cluster.from_env` joins under
    `distributed: fsdp` as FSDP over one rank (what `torchrun --nproc_per_node 1` gives)."""
    import torch.distributed as dist

    with socket.socket() as s:  # a free port for the group's store (loopback: nothing leaves the machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the host's memory


def host_high_water_reset() -> bool:
    """Reset this process's RSS high-water mark to its RSS now (Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def host_high_water_gib() -> float:
    """VmHWM (the RSS high-water mark since start or the last reset); ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    found = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE) if status.exists() else None
    kib = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / KIB_PER_GIB


def held_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the models on disk


def save_random_model(shape: dict, tokenizer, folder: Path, device: torch.device) -> dict:
    """A random Qwen2 of `shape` (gpu_step.build_model: seeded, built on `device`), written to `folder` in bfloat16
    with `save_pretrained` (the tokenizer beside it); its parameter count and the seconds it took."""
    t0 = time.perf_counter()
    model = gpu_step.build_model(shape, tokenizer, device)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    free(device)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
    return {"parameters": n_params, "files": files, "gib_on_disk": size, "save_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- one setting


def measure(args, size: str, folder: Path, tokenizer, rows, device, dtype_name: str, mode: str, budget) -> dict:
    """Build a GRPOTrainer on the model folder under `mode`, one warm-up step and `args.steps` timed ones."""
    from grpokit.config import GRPOConfig
    from grpokit.stages.grpo import GRPOTrainer

    held_before = held_gib(device)
    with tempfile.TemporaryDirectory() as out, one_rank_fsdp(device) if mode == "fsdp" else contextlib.nullcontext():
        cfg = GRPOConfig(
            model=str(folder), output_dir=out, device=str(device), dtype=dtype_name, max_steps=args.steps + 1,
            prompts_per_step=args.prompts, num_generations=args.generations, max_completion_length=args.new_tokens,
            beta=0.04, num_eval_prompts=0, progress=False, seed=0, save_every=10**6, tensorboard=False,
            distributed="fsdp" if mode == "fsdp" else "ddp", max_tokens_per_micro_batch=args.micro_tokens or None,
        )  # fmt: skip
        gpu_step.reset_peak(device)
        host_reset = host_high_water_reset()
        t0 = time.perf_counter()
        trainer = GRPOTrainer(cfg, tokenizer=tokenizer, reward_funcs=[("code_points", gpu_step.code_point_reward)],
                              train_dataset=rows)  # fmt: skip
        gpu_step.sync(device)
        build_s = time.perf_counter() - t0
        sharded = bool(trainer.cluster.sharded and trainer.policy.fsdp_roots)
        if sharded != (mode == "fsdp"):
            raise RuntimeError(f"setting {mode}: the trainer's model is {'' if sharded else 'not '}sharded")
        loading = {
            "build_s": build_s,
            "peak_gpu_gib": gpu_step.peak_gib(device),
            "held_gpu_gib_after": held_gib(device),
            "host_rss_high_water_gib": host_high_water_gib(),
            "host_high_water_reset": host_reset,
        }
        state = trainer.policy.memory_mb()
        gpu_step.reset_peak(device)
        seen: list[dict] = []  # every step's metrics, the warm-up's first

        def step(_: int, run=trainer.step) -> dict:
            seen.append(run()[0])
            return seen[-1]

        warmup, walls, steps = gpu_step.timed_rounds(step, args.steps, device, budget, f"{size} {mode} step")
        peak = gpu_step.peak_gib(device)
        del trainer, step  # (the step function holds the trainer's bound method)
    free(device)
    figures = {"wall_s": walls, **{k: [m[k] for m in steps] for k in PARTS}}
    done = bool(walls)
    return {
        "mode": mode,
        "sharded": sharded,
        "gpu_held_before_gib": held_before,
        "loading": loading,
        "model_state_mb": state,
        "warmup_s": warmup,
        "warmup_metrics": {k: v for k, v in seen[0].items() if isinstance(v, (int, float))},
        "median_step_s": statistics.median(walls) if done else None,
        "median_parts_s": {k: statistics.median(figures[k]) for k in PARTS} if done else None,
        "peak_gpu_gib": peak,
        "gpu_held_after_gib": held_gib(device),
        "raw": figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, float32, on the CPU: the code path only")
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default 4; smoke 2)")
    parser.add_argument("--generations", type=int, default=None, help="G (default 8; smoke 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default 256; smoke 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed GRPO steps per setting (default 2; smoke 1)")
    parser.add_argument("--micro-tokens", type=int, default=512, help="max_tokens_per_micro_batch (0: no bound)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no new setting or step after this")
    parser.add_argument("--out", help="the record's path (default: $OUT, else benchmarks/results/)")
    args = parser.parse_args()
    smoke = args.smoke
    defaults = {"prompts": (4, 2), "generations": (8, 4), "new_tokens": (256, 16), "steps": (2, 1)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    if smoke:
        device, dtype_name, shapes = torch.device("cpu"), "float32", SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: this benchmark is for a GPU (use --smoke to check the code path on a CPU)")
        device, dtype_name, shapes = torch.device("cuda", 0), "bfloat16", SHAPES
    path = gpu_step.record_path(args.out, "gpu-fsdp-smoke.json" if smoke else "gpu-fsdp-qwen2.json", smoke)
    budget = gpu_step.Budget(args.budget_s)

    tokenizer = gpu_step.wide_char_tokenizer(shapes["qwen2-0.5b"]["vocab_size"])  # (every size's vocabulary)
    no_eos = gpu_step.without_eos(tokenizer)
    rows = gpu_step.prompt_rows(64)
    record = {
        "benchmark": "gpu_fsdp",
        "smoke": smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": gpu_step.commit(),
        "machine": gpu_step.machine(device),
        "workload": {
            "prompts": args.prompts,
            "generations": args.generations,
            "new_tokens": args.new_tokens,
            "dtype": dtype_name,
            "weights_dtype": "float32",
            "saved_dtype": "bfloat16",
            "device": str(device),
            "beta": 0.04,
            "max_tokens_per_micro_batch": args.micro_tokens or None,
            "fsdp": "a 1-rank process group, distributed: fsdp (FSDP over one rank)",
            "equal_work": "the tokenizer has no EOS id (eos_token_id = []): every row writes new_tokens tokens",
        },
        "models": {},
        "settings": {},
    }
    print(json.dumps({k: record[k] for k in ("commit", "machine", "workload")}), flush=True)
    with tempfile.TemporaryDirectory() as models:
        for size in args.sizes:
            if not budget.left(f"{size}: saving the model"):
                continue
            shape = shapes[size]
            if shape["vocab_size"] != len(tokenizer):
                raise ValueError(f"{size}: vocabulary {shape['vocab_size']} but the tokenizer has {len(tokenizer)}")
            folder = Path(models) / size
            record["models"][size] = {"shape": shape, **save_random_model(shape, tokenizer, folder, device)}
            m = record["models"][size]
            print(f"{size}: {m['parameters']:,} parameters, {m['gib_on_disk']:.2f} GiB in {m['files']} "
                  f"({m['save_s']:.0f} s)", flush=True)  # fmt: skip
            for mode in args.modes:
                if not budget.left(f"{size} {mode}"):
                    continue
                f = measure(args, size, folder, no_eos, rows, device, dtype_name, mode, budget)
                record["settings"][f"{size}/{mode}"] = f
                parts = ", ".join(f"{k[5:]} {v:.2f} s" for k, v in (f["median_parts_s"] or {}).items())
                load = f["loading"]
                gpu = gpu_step.fmt
                print(f"{size} {mode}: built in {load['build_s']:.1f} s (peak GPU {gpu(load['peak_gpu_gib'], 'GiB')}, "
                      f"host high-water {load['host_rss_high_water_gib']:.2f} GiB); step median "
                      f"{gpu(f['median_step_s'], 's')} ({parts}), peak GPU {gpu(f['peak_gpu_gib'], 'GiB')}; "
                      f"model state {sum(f['model_state_mb'].values()):.0f} MiB", flush=True)  # fmt: skip
            shutil.rmtree(folder)  # (disk: the 1.5B's weights are 3 GiB)
    record["stopped_early"] = budget.cut
    record["wall_s"] = time.perf_counter() - budget.start
    record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_GIB
    imported = [m for m in gpu_step.FORBIDDEN if m in sys.modules]
    record["forbidden_imports"] = imported
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    said = imported or "none"
    print(f"wall {record['wall_s']:.0f} s; imported of {gpu_step.FORBIDDEN}: {said} -> {path}", flush=True)
    if imported:
        sys.exit(f"imported {imported}: the GPU image has none of them")


if __name__ == "__main__":
    main()
