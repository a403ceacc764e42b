"""`grpokit demo`: GRPO makes a model better than the teacher it was fine-tuned on.

The teacher (the imperfect demonstrator) adds numbers column by column but forgets carries; SFT copies
its habit; GRPO with the gold checker as the only reward removes it. Every number in the table is
measured on held-out problems that neither stage trained on.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from grpokit.config import DemoConfig, GRPOConfig, SFTConfig
from grpokit.modeling import resolve_device
from grpokit.sft import sft_rows, train_sft
from grpokit.tasks import AdditionTask, build_char_tokenizer, tiny_model
from grpokit.trainer import GRPOTrainer, seed_everything


def run_demo(cfg: DemoConfig) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    task = AdditionTask(num_digits=cfg.num_digits, forget_carry=cfg.forget_carry)
    max_len = task.max_completion_chars + 1  # digits + EOS
    eval_rows = task.rows(cfg.num_eval_prompts, split="eval", seed=cfg.seed)
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed).to(
        device
    )
    print(
        f"grpokit demo: {cfg.num_digits}-digit addition; the teacher forgets each carry with p={cfg.forget_carry}; "
        f"tiny {cfg.arch} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}"
    )

    teacher = task.demonstrator_accuracy(eval_rows, random.Random(cfg.seed))
    table = {"demonstrator": {"greedy": teacher, "sampled": teacher}}

    sft_cfg = SFTConfig(
        output_dir=str(out / "sft"),
        task="addition",
        task_num_digits=cfg.num_digits,
        forget_carry=cfg.forget_carry,
        max_steps=cfg.sft_steps,
        num_train_prompts=cfg.sft_examples,
        learning_rate=cfg.sft_learning_rate,
        max_completion_length=max_len,
        seed=cfg.seed,
        device=cfg.device,
        progress=cfg.progress,
    )
    train_sft(sft_cfg, model=model, tokenizer=tokenizer, rows=sft_rows(sft_cfg))

    grpo_cfg = GRPOConfig(
        output_dir=str(out / "grpo"),
        task="addition",
        task_num_digits=cfg.num_digits,
        max_steps=cfg.grpo_steps,
        learning_rate=cfg.grpo_learning_rate,
        prompts_per_step=cfg.prompts_per_step,
        num_generations=cfg.num_generations,
        max_completion_length=max_len,
        reward_funcs=["accuracy"],
        num_eval_prompts=cfg.num_eval_prompts,
        eval_every=cfg.grpo_steps // 4,
        eval_temperature=1.0,
        seed=cfg.seed,
        device=cfg.device,
        progress=cfg.progress,
    )
    # The trainer scores the held-out rows before its first step (the SFT model) and after its last.
    result = GRPOTrainer(grpo_cfg, model=model, tokenizer=tokenizer, eval_rows=eval_rows).train()
    for name, row in (
        ("SFT on demonstrator", result.eval_history[0]),
        ("SFT + GRPO (gold reward)", result.eval_history[-1]),
    ):
        table[name] = {"greedy": row["eval/accuracy_greedy"], "sampled": row["eval/accuracy_sampled"]}

    print(f"\nheld-out accuracy on {len(eval_rows)} problems (seed {cfg.seed}):")
    print(f"{'':28s} {'greedy':>8s} {'sampled T=1':>12s}")
    for name, row in table.items():
        print(f"{name:28s} {row['greedy']:8.1%} {row['sampled']:12.1%}")
    print(f"\nplot:  {result.plot_path}\nmodel: {result.model_dir}\ntime:  {time.perf_counter() - start:.0f} s")
    if result.warnings:
        print("warnings raised during the GRPO run:")
    for warning in result.warnings:
        print(f"  {warning}")
    return table
