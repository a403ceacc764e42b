"""grpokit on one CUDA GPU: the in-process sampler and a full GRPO step, bfloat16, a Qwen2-0.5B-shaped model.

Run on one NVIDIA H200 (torch 2.11, CUDA 13.0) on 2026-12-04 at commit e293ab4: the record is
benchmarks/results/gpu-step-qwen2-0.5b.json, its table in docs/benchmarks.md. `--smoke` (tiny sizes, float32, on a
CPU) exercises every code path below.

How to run, from the repository root, on a machine with one CUDA GPU (torch with CUDA, transformers, peft, safetensors,
tokenizers, numpy, pyyaml, tqdm, tensorboard, matplotlib: grpokit's imports; it never imports vllm, trl, datasets or
tyro, and downloads nothing):

    python benchmarks/gpu_step.py                       # grpokit installed (pip install -e .)
    PYTHONPATH=src python benchmarks/gpu_step.py        # grpokit not installed: its source on the path
    PYTHONPATH=src python benchmarks/gpu_step.py --smoke   # tiny sizes, float32, on the CPU (about a minute)

On this workplace's device tool: run(command="PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_step.py",
timeout_s=600); the record comes back from $OUT. It is sized to finish within about 8 minutes on an H200 (`--budget-s`,
default 420, stops starting new rounds past that and says so in the record; the model build, CUDA start-up and
warm-ups come first).

What it measures (no file travels: the model is built from a config with random weights, the tokenizer is grpokit's
character tokenizer widened to the model's 151,936 ids, so decoding any sampled id works):
- the model: `transformers.Qwen2Config` shaped like Qwen2-0.5B (24 layers, hidden 896, 14 heads, 2 KV heads, MLP
  4864, vocabulary 151,936, tied embeddings; ~494M parameters), float32 weights, run under bfloat16 autocast, as a
  grpokit run with `dtype: bfloat16` does (weights and optimizer state stay float32);
- sampling: `KVCacheSampler.generate` of `--prompts` x `--generations` rows (default 4 x 8 = 32), `--new-tokens`
  (default 256) in every row (the tokenizer is given no EOS id, so no row ends early; the tokens are counted), one
  warm-up call, then `--rounds` timed calls (CUDA synchronized around each); median time, tokens/s, and the peak GPU
  memory of sampling alone (`torch.cuda.max_memory_allocated`, reset before);
- a GRPO step: `GRPOTrainer.step()` on the same workload (beta 0.04, so a reference copy is held; a cheap reward
  function of the completion's code points), one warm-up step, then `--steps` timed steps, for each micro-batch
  setting in turn (grpokit's default of at most 512 positions per forward/backward, then no budget: the whole batch in
  one forward), each trainer built, measured and freed before the next; median wall time of `trainer.step()` and of its
  `time/*` parts, and the peak GPU memory of that trainer's steps (reset after it is built).

It writes gpu-step-qwen2-0.5b.json (`--smoke`: gpu-step-smoke.json) to $OUT when that is set, else to
benchmarks/results/ (`--smoke`: the system's temporary folder), and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
QWEN2_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_layers": 24,
    "num_heads": 14,
    "num_kv_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
SMOKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
}
INSTRUCTION = "Add the two numbers below and write the sum as digits only, with no other words. Here they are: "
FORBIDDEN = ("vllm", "trl", "datasets", "tyro")


def commit() -> str:
    """The grpokit commit (GRPOKIT_COMMIT if set: a copy without .git), '-dirty' if src/ has changes."""
    if os.environ.get("GRPOKIT_COMMIT"):
        return os.environ["GRPOKIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine(device: torch.device) -> dict:
    import transformers

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    info = {
        "cpu": next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor()),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def wide_char_tokenizer(vocab_size: int):
    """grpokit's character tokenizer with exactly `vocab_size` ids (extra code points as extra characters), so that
    every id a random model samples decodes to something."""
    from grpokit.data.tasks.tokenizer import DEFAULT_CHARS, build_char_tokenizer

    base = len(build_char_tokenizer())
    if vocab_size < base:
        raise ValueError(f"vocab_size {vocab_size} is below the character tokenizer's {base} ids")
    filler = "".join(chr(0x20000 + i) for i in range(vocab_size - base))  # (planes 2-4: no surrogates)
    tokenizer = build_char_tokenizer(DEFAULT_CHARS + filler)
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def without_eos(tokenizer):
    """A shallow copy of `tokenizer` whose `eos_token_id` is the empty list: the sampler's `torch.isin` against no
    id, so every row writes the full `max_new_tokens` (equal work in every call)."""
    twin = copy.copy(tokenizer)
    no_eos = property(lambda self: [])
    twin.__class__ = type(f"NoEos{type(tokenizer).__name__}", (type(tokenizer),), {"eos_token_id": no_eos})
    return twin


def build_model(shape: dict, tokenizer, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A Qwen2 causal LM of `shape` with random weights (seeded), float32, on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["rms_norm_eps"],
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.float().eval()


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 1000), rng.randrange(10, 1000)
        rows.append({"prompt": f"{INSTRUCTION}{a}+{b}=", "answer": str(a + b)})
    return rows


def code_point_reward(prompts, completions, **_):
    """Cheap, and it differs inside a group of a random model's completions (digits are 10 ids in 151,936, so a
    digit-counting reward would be 0 everywhere), so the advantages are not all 0."""
    return [sum(map(ord, c)) % 101 / 100 for c in completions]


def fmt(x: float | None, unit: str, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f} {unit}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def record_path(out: str | None, name: str, smoke: bool) -> Path:
    """Where a GPU benchmark writes its record: `--out`, else $OUT (the device tool's folder), else
    benchmarks/results/ (a smoke run's: the system's temporary folder)."""
    if out:
        return Path(out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return (Path(tempfile.gettempdir()) if smoke else ROOT / "benchmarks" / "results") / name


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds
        self.cut: list[str] = []

    def left(self, what: str) -> bool:
        if time.perf_counter() - self.start < self.seconds:
            return True
        self.cut.append(what)
        return False


def timed_rounds(call, rounds: int, device: torch.device, budget: Budget, label: str) -> tuple[float, list, list]:
    """(the warm-up call's seconds, each timed call's seconds, each timed call's result): `call(0)` once untimed as
    a warm-up, then `call(1..rounds)` while the budget lasts, each between device syncs."""
    t0 = time.perf_counter()
    call(0)
    sync(device)
    warmup, times, results = time.perf_counter() - t0, [], []
    for r in range(rounds):
        if not budget.left(f"{label} {r + 1}"):
            break
        sync(device)
        t0 = time.perf_counter()
        result = call(r + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
        results.append(result)
    return warmup, times, results


def time_sampler(args, model, tokenizer, rows, device, dtype, budget: Budget) -> dict:
    from grpokit.data.rows import encode_prompts
    from grpokit.rollout.sampler import KVCacheSampler, SamplingParams, prompt_seeds

    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows[: args.prompts]], 256).ids
    sampler = KVCacheSampler(tokenizer, compute_dtype=dtype)
    sampler.update_weights(model)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    places = list(range(len(prompts)))

    def call(step: int) -> int:
        rollout = sampler.generate(prompts, num_generations=args.generations, params=params,
                                   seeds=prompt_seeds(0, step, places))  # fmt: skip
        return int(rollout.completion_mask.sum())

    reset_peak(device)
    warmup, times, tokens = timed_rounds(call, args.rounds, device, budget, "sampler round")
    rows_n = len(prompts) * args.generations
    if any(t != rows_n * args.new_tokens for t in tokens):
        print(f"note: some rows ended early ({tokens} tokens vs {rows_n * args.new_tokens})", flush=True)
    median = statistics.median(times) if times else None
    return {
        "rows": rows_n,
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "warmup_s": warmup,
        "times_s": times,
        "tokens": tokens,
        "median_s": median,
        "tokens_per_s": statistics.median(tokens) / median if times else None,
        "peak_gpu_gib": peak_gib(device),
    }


def time_steps(args, model, tokenizer, rows, device, dtype_name: str, micro: int | None, budget: Budget) -> dict:
    from grpokit.config import GRPOConfig
    from grpokit.stages.grpo import GRPOTrainer

    parts = ("time/rollout", "time/reward", "time/reference", "time/update", "time/step")
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, device=str(device), dtype=dtype_name, max_steps=args.steps + 1,
            prompts_per_step=args.prompts, num_generations=args.generations, max_completion_length=args.new_tokens,
            beta=0.04, num_eval_prompts=0, progress=False, seed=0, save_every=10**6,
            max_tokens_per_micro_batch=micro,
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer = GRPOTrainer(cfg, model=model, tokenizer=tokenizer, reward_funcs=[("code_points", code_point_reward)],
                              train_dataset=rows)  # fmt: skip
        built = time.perf_counter() - t0
        reset_peak(device)
        label = f"step (micro-batch budget {micro})"
        warmup, walls, steps = timed_rounds(lambda _, step=trainer.step: step()[0], args.steps, device, budget, label)
        figures: dict[str, list[float]] = {"wall_s": walls, **{k: [m[k] for m in steps] for k in parts}}
        figures["mean_length"] = [m["completions/mean_length"] for m in steps]
        peak = peak_gib(device)
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    done = bool(figures["wall_s"])
    return {
        "max_tokens_per_micro_batch": micro,
        "build_s": built,
        "warmup_s": warmup,
        "median_step_s": statistics.median(figures["wall_s"]) if done else None,
        "median_parts_s": {k: statistics.median(figures[k]) for k in parts} if done else None,
        "peak_gpu_gib": peak,
        "raw": figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, float32, on the CPU: the code path only")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default 4; smoke 2)")
    parser.add_argument("--generations", type=int, default=None, help="G (default 8; smoke 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default 256; smoke 16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed sampler calls (default 5; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed GRPO steps per setting (default 4; smoke 1)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new round after this many seconds")
    parser.add_argument("--out", help="the record's path (default: $OUT, else benchmarks/results/)")
    args = parser.parse_args()
    smoke = args.smoke
    defaults = {"prompts": (4, 2), "generations": (8, 4), "new_tokens": (256, 16), "rounds": (5, 1), "steps": (4, 1)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)

    if smoke:
        device, dtype, dtype_name, shape = torch.device("cpu"), torch.float32, "float32", SMOKE
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: this benchmark is for a GPU (use --smoke to check the code path on a CPU)")
        device, dtype, dtype_name, shape = torch.device("cuda"), torch.bfloat16, "bfloat16", QWEN2_05B
    path = record_path(args.out, "gpu-step-smoke.json" if smoke else "gpu-step-qwen2-0.5b.json", smoke)
    budget = Budget(args.budget_s)

    t0 = time.perf_counter()
    tokenizer = wide_char_tokenizer(shape["vocab_size"])
    model = build_model(shape, tokenizer, device)
    sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    no_eos = without_eos(tokenizer)
    rows = prompt_rows(64)
    record = {
        "benchmark": "gpu_step",
        "smoke": smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(device),
        "workload": {
            "model": "random Qwen2, Qwen2-0.5B's shape" if not smoke else "random tiny Qwen2 (smoke)",
            "shape": shape,
            "parameters": n_params,
            "prompts": args.prompts,
            "generations": args.generations,
            "new_tokens": args.new_tokens,
            "dtype": dtype_name,
            "weights_dtype": "float32",
            "device": str(device),
            "beta": 0.04,
            "equal_work": "the tokenizer has no EOS id (eos_token_id = []): every row writes new_tokens tokens",
        },
        "model_build_s": build_s,
    }
    print(json.dumps({k: record[k] for k in ("commit", "machine", "workload")}), flush=True)
    record["sampler"] = time_sampler(args, model, no_eos, rows, device, dtype, budget)
    s = record["sampler"]
    print(f"sampler: {s['rows']} rows x {s['new_tokens']} tokens: median {fmt(s['median_s'], 's')}, "
          f"{fmt(s['tokens_per_s'], 'tokens/s', 0)}, peak GPU memory {fmt(s['peak_gpu_gib'], 'GiB')}",
          flush=True)  # fmt: skip
    record["grpo_step"] = {}
    for micro in (512, None):
        key = f"micro_tokens_{micro or 'none'}"
        if not budget.left(f"GRPO steps, micro-batch budget {micro}"):
            break
        # a fresh model for each trainer (an optimizer step changes the weights in place)
        model = build_model(shape, tokenizer, device) if record["grpo_step"] else model
        record["grpo_step"][key] = time_steps(args, model, no_eos, rows, device, dtype_name, micro, budget)
        del model
        gc.collect()
        f = record["grpo_step"][key]
        parts = ", ".join(f"{k[5:]} {v:.2f} s" for k, v in (f["median_parts_s"] or {}).items())
        print(f"GRPO step ({key}): median {fmt(f['median_step_s'], 's')} ({parts}), "
              f"peak GPU memory {fmt(f['peak_gpu_gib'], 'GiB')}", flush=True)  # fmt: skip
    record["stopped_early"] = budget.cut
    record["wall_s"] = time.perf_counter() - budget.start
    record["peak_rss_gib"] = rss_gib()
    imported = [m for m in FORBIDDEN if m in sys.modules]
    record["forbidden_imports"] = imported
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wall {record['wall_s']:.0f} s; imported of {FORBIDDEN}: {imported or 'none'} -> {path}", flush=True)
    if imported:
        sys.exit(f"imported {imported}: the GPU image has none of them")


if __name__ == "__main__":
    main()
