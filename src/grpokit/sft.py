"""Supervised fine-tuning: the warm start before GRPO.

Cross-entropy on completion tokens only (the EOS included, so the model learns to stop); the prompt is
context. It shares the tokenizer, prompt rendering and the chunked logprob code with the GRPO trainer,
so an SFT model and a GRPO model see their prompts byte for byte the same way.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from grpokit.checkpoint import save_model
from grpokit.config import SFTConfig
from grpokit.data import check_columns, encode_prompts, load_rows, pad_batch
from grpokit.modeling import completion_logprobs, load_model, load_tokenizer, resolve_device, resolve_dtype
from grpokit.optim import build_optimizer
from grpokit.runlog import RunLog
from grpokit.tasks import get_task


def sft_rows(cfg: SFTConfig) -> list[dict[str, Any]]:
    """Training rows with a completion: from a file, or the task's imperfect demonstrator (one
    demonstration per problem, drawn once, as a fixed data set would be)."""
    if cfg.train_data is not None:
        rows = load_rows(cfg.train_data, field="train_data")
    else:
        task = get_task(cfg.task, num_digits=cfg.task_num_digits, forget_carry=cfg.forget_carry)
        rng = random.Random(cfg.seed)
        rows = [
            {**row, cfg.completion_column: task.demonstrate(row, rng)}
            for row in task.rows(cfg.num_train_prompts, split="train", seed=cfg.seed)
        ]
    check_columns(rows, [cfg.prompt_column, cfg.completion_column], "SFT data")
    return rows


def encode_examples(tokenizer: Any, rows: list[dict[str, Any]], cfg: SFTConfig) -> list[tuple[list[int], list[int]]]:
    _, prompt_ids, _ = encode_prompts(tokenizer, [r[cfg.prompt_column] for r in rows], cfg.max_prompt_length)
    examples = []
    for i, (row, p_ids) in enumerate(zip(rows, prompt_ids)):
        completion = row[cfg.completion_column]
        if not isinstance(completion, str):
            raise ValueError(f"SFT data row {i}: column {cfg.completion_column!r} must be text, got {completion!r:.60}")
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"][: cfg.max_completion_length - 1]
        examples.append((p_ids, c_ids + [tokenizer.eos_token_id]))
    return examples


def sft_loss(model: Any, batch: list[tuple[list[int], list[int]]], pad_id: int, chunk_size: int) -> torch.Tensor:
    """Mean negative log-likelihood per completion token of the batch."""
    prompt_ids, prompt_mask = pad_batch([p for p, _ in batch], pad_id, side="left")  # (B, Tp)
    completion_ids, completion_mask = pad_batch([c for _, c in batch], pad_id, side="right")  # (B, Tc)
    device = model.device
    logp, _ = completion_logprobs(
        model,
        prompt_ids.to(device),
        prompt_mask.to(device),
        completion_ids.to(device),
        completion_mask.to(device),
        temperature=1.0,
        chunk_size=chunk_size,
    )
    mask = completion_mask.to(device).float()
    return -(logp * mask).sum() / mask.sum()


def train_sft(
    cfg: SFTConfig, *, model: Any = None, tokenizer: Any = None, rows: list[dict[str, Any]] | None = None
) -> Path:
    """Runs SFT and saves the model to OUTPUT_DIR/model; returns that folder."""
    from tqdm.auto import tqdm

    cfg.validate(model_given=model is not None)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = rows if rows is not None else sft_rows(cfg)
    device = resolve_device(cfg.device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    model = model if model is not None else load_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
    model.to(device).train()
    examples = encode_examples(tokenizer, rows, cfg)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps)
    out = Path(cfg.output_dir)
    log = RunLog(out, tensorboard=False, config=cfg)
    rng = random.Random(cfg.seed)
    bar = tqdm(range(1, cfg.max_steps + 1), desc="sft", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
        loss = sft_loss(model, batch, tokenizer.pad_token_id, cfg.logprob_chunk_size)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg.max_steps:
            log.log(step, {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    log.close()
    return save_model(model, tokenizer, out / "model")
