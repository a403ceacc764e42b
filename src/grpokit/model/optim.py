"""AdamW with linear warm-up then a constant, linear, cosine or floored cosine schedule: shared by every stage."""

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
    """After warm-up: `constant`, `linear`, `cosine` or `cosine_with_min_lr` (`lr_factor`)."""
    max_grad_norm: float
    """Gradients are clipped to this global L2 norm before each step (0: no clipping)."""
    adam_epsilon: float = 1e-8
    """Added to the root of AdamW's second moment (torch's default)."""
    min_lr_rate: float = 0.0
    """`cosine_with_min_lr`: the floor the cosine ends at, as a fraction of `learning_rate`."""


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_rate: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    `cosine_with_min_lr` is transformers' schedule of that name: the cosine's half wave scaled into
    [min_lr_rate, 1], min_lr_rate + (1 - min_lr_rate) * (1 + cos(pi * progress)) / 2; `cosine` is it with a floor
    of 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "cosine_with_min_lr":
        return min_lr_rate + (1.0 - min_lr_rate) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"lr_schedule {schedule!r}: use constant, linear, cosine or cosine_with_min_lr")


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
        eps=settings.adam_epsilon,
        weight_decay=settings.weight_decay,
        fused=fused or None,
    )
    warmup, schedule, floor = settings.warmup_steps, settings.lr_schedule, settings.min_lr_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total_steps, schedule=schedule, min_lr_rate=floor),
    )
    return optimizer, scheduler
