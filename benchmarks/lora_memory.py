"""Peak memory of one GRPO config trained fully vs with LoRA, each in its own process.

    python benchmarks/lora_memory.py [--steps 3] [--rank 8] [--micro-batch-size 16] ...

With beta > 0 a full fine-tune holds the policy, a frozen reference copy, the gradients and AdamW's two
moments: about 5 model-sized buffers. LoRA holds one model (its reference is the same weights with the
adapters off) plus adapter-sized gradients and moments. Each run is a fresh subprocess so that its peak
RSS (getrusage ru_maxrss) is its own; a tiny model is built and saved locally, nothing is downloaded.

Peak RSS is what the OS sees, allocator included: with glibc's default malloc settings the freed
temporaries of peft's LoRA layers (base output, adapter output, their sum) can stay in the heap, which
shows when activations dominate (large micro-batches). `--mmap-threshold 131072` measures closer to the
memory the tensors themselves hold.
Prints the config, the git commit, the machine and the figures (a record, per STYLE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "RESULT "
TIMES = ("time/rollout", "time/reference", "time/update")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="GRPO steps per run")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--intermediate-size", type=int, default=1536)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the LoRA run")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: a reference is needed)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=16, help="completions per forward/backward")
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each run")
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="bytes; > 0 sets MALLOC_MMAP_THRESHOLD_ in each run, so glibc returns freed large tensors to the OS "
        "(0: glibc's default, whose growing heap can hold freed temporaries and inflate the peak RSS)",
    )
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mib() -> float:
    """Resident set size now (import-time peaks are transient, so the baseline is the current RSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(args: argparse.Namespace) -> None:
    """One run: load, `steps` GRPO steps, then the final save; peak RSS after each phase."""
    import torch

    from grpokit.config import GRPOConfig, LoRAConfig
    from grpokit.model.lora import uses_lora
    from grpokit.model.saving import save_trained
    from grpokit.stages.grpo import GRPOTrainer

    torch.set_num_threads(args.threads)
    rss_imports = rss_mib()
    out = Path(args.model).parent / args.child
    cfg = GRPOConfig(
        model=args.model,
        output_dir=str(out),
        task="addition",
        max_steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.num_generations,
        micro_batch_size=args.micro_batch_size,
        max_completion_length=args.max_completion_length,
        beta=args.beta,
        learning_rate=1e-4,
        num_train_prompts=512,
        num_eval_prompts=0,
        lora=LoRAConfig(r=args.rank if args.child == "lora" else 0, alpha=2.0 * args.rank),
        progress=False,
        tensorboard=False,
        device="cpu",
        dtype="float32",
        overwrite_output_dir=True,
    )
    trainer = GRPOTrainer(cfg, reward_funcs=[("digits", digit_share)])
    rss_loaded = rss_mib()
    t0 = time.perf_counter()
    steps = [trainer.step()[0] for _ in range(args.steps)]
    step_s = (time.perf_counter() - t0) / args.steps
    rss_train = peak_rss_mib()
    save_trained(trainer.policy, out / "model", trainer.tokenizer, lora_form=cfg.lora.save)
    rss_save = peak_rss_mib()

    unique = {p.untyped_storage().data_ptr(): p for p in trainer.policy.model.parameters()}  # tied weights once
    if trainer.policy.ref_model is not None:
        reference = "frozen copy"
    else:
        reference = "adapters off" if uses_lora(trainer.policy.model) else "none"
    optimizer_state = [t for state in trainer.policy.optimizer.state.values() for t in state.values() if t.dim() > 0]
    result = {
        "mode": args.child,
        "params_total": sum(p.numel() for p in unique.values()),
        "params_trainable": sum(p.numel() for p in unique.values() if p.requires_grad),
        "model_copies": 1 + (trainer.policy.ref_model is not None),
        "reference": reference,
        "optimizer_state_elems": sum(t.numel() for t in optimizer_state),
        "rss_imports_mib": rss_imports,
        "rss_loaded_mib": rss_loaded,
        "peak_train_mib": rss_train,
        "peak_with_save_mib": rss_save,
        "step_s": step_s,
        **{key: sum(m[key] for m in steps) / len(steps) for key in TIMES},
        "completions/mean_length": sum(m["completions/mean_length"] for m in steps) / len(steps),
    }
    print(MARK + json.dumps(result), flush=True)


def digit_share(prompts, completions, **_):
    """A graded reward that differs inside each group, so every step has non-zero advantages and gradients."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.05 * len(c) for c in completions]


def git_commit() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + (" (working tree has uncommitted changes)" if git("status", "--porcelain") else "")


def machine() -> str:
    import peft
    import torch
    import transformers

    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return (
        f"{platform.node()} | {cpu} | {os.cpu_count()} CPUs | {mem_kib / 2**20:.1f} GiB RAM | "
        f"Python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"peft {peft.__version__}"
    )


def build_model(args: argparse.Namespace, path: Path) -> None:
    from grpokit.data.tasks import build_char_tokenizer, tiny_model

    tokenizer = build_char_tokenizer()
    model = tiny_model(
        tokenizer,
        "llama",
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seed=0,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def run(args: argparse.Namespace, mode: str, model_dir: Path, argv) -> dict:
    """One child process; its run directory lives beside the model, in the parent's temporary folder."""
    shared = sys.argv[1:] if argv is None else list(argv)
    cmd = [sys.executable, __file__, *shared, "--child", mode, "--model", str(model_dir)]
    env = dict(os.environ)
    if args.mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as root:
        model_dir = Path(root) / "model"
        build_model(args, model_dir)
        results = {mode: run(args, mode, model_dir, argv) for mode in ("full", "lora")}

    print("# GRPO peak memory: full fine-tune vs LoRA (benchmarks/lora_memory.py)")
    config = {k: v for k, v in vars(args).items() if k not in ("child", "model")}
    print(f"config : llama tiny model, fp32, CPU; {json.dumps(config)}")
    print(f"commit : {git_commit()}")
    print(f"machine: {machine()}")
    print()
    rows = [
        ("parameters (total)", "params_total", "{:,}"),
        ("parameters (trainable)", "params_trainable", "{:,}"),
        ("reference", "reference", "{}"),
        ("model copies in memory", "model_copies", "{}"),
        ("AdamW state elements", "optimizer_state_elems", "{:,}"),
        ("RSS after imports (MiB)", "rss_imports_mib", "{:.0f}"),
        ("RSS after load (MiB)", "rss_loaded_mib", "{:.0f}"),
        ("peak RSS, training (MiB)", "peak_train_mib", "{:.0f}"),
        ("peak RSS, with final save (MiB)", "peak_with_save_mib", "{:.0f}"),
        ("seconds per step", "step_s", "{:.2f}"),
        ("  rollout", "time/rollout", "{:.2f}"),
        ("  reference logprobs", "time/reference", "{:.2f}"),
        ("  update", "time/update", "{:.2f}"),
        ("mean completion length", "completions/mean_length", "{:.1f}"),
    ]
    print(f"| {'':32} | {'full fine-tune':>16} | {'LoRA r=' + str(args.rank):>16} |")
    print(f"| {'-' * 32} | {'-' * 16}:| {'-' * 16}:|")
    for label, key, fmt in rows:
        print(f"| {label:32} | {fmt.format(results['full'][key]):>16} | {fmt.format(results['lora'][key]):>16} |")
    full, lora = results["full"], results["lora"]
    above_full = full["peak_train_mib"] - full["rss_imports_mib"]
    above_lora = lora["peak_train_mib"] - lora["rss_imports_mib"]
    print()
    print(f"peak RSS ratio, training, full / LoRA: {full['peak_train_mib'] / lora['peak_train_mib']:.2f}x")
    print(f"above the import baseline, full / LoRA: {above_full:.0f} / {above_lora:.0f} MiB", end=" ")
    print(f"= {above_full / above_lora:.2f}x")


if __name__ == "__main__":
    main()
