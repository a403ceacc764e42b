"""AdamW with linear warm-up then a constant, linear or cosine schedule: shared by every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW, its schedule and the gradient clip of each step, as a stage's config sets them
    (`run_setup.optimizer_settings`)."""

    learning_rate: float
    """Peak learning rate."""
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    warmup_steps: int
    """Optimizer steps of linear warm-up from 0 to `learning_rate`."""
    lr_schedule: str
    """After warm-up: `constant`, `linear` or `cosine` (`lr_factor`)."""
    max_grad_norm: float
    """Gradients are clipped to this global L2 norm before each step (0: no clipping)."""


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"lr_schedule {schedule!r}: use constant, linear or cosine")


def build_optimizer(model: torch.nn.Module, settings: OptimizerSettings, total_steps: int):
    """-> (AdamW over trainable parameters, LambdaLR)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over each parameter instead of one per AdamW operation (fused kernels exist for CPU and
    # CUDA float tensors); on a 135M model on a CPU the unfused step reads and writes its state ~6 times
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(
        params,
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.weight_decay,
        fused=fused or None,
    )
    warmup_steps, schedule = settings.warmup_steps, settings.lr_schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
    )
    return optimizer, scheduler
