"""The policy-gradient pass of one micro-batch and the figures of an update: the piece GRPO's update and PPO's
share (`GRPOTrainer._update`, `PPOTrainer._ppo_update`), which differ in their advantages (one per completion,
or one per token from GAE) and in what else a micro-batch trains (PPO's critic)."""

from __future__ import annotations

import math
from typing import Any

import torch

from grpokit import algo
from grpokit.policy import NumericsError, Policy

FIGURES = ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "tokens", "first_pass_tokens")
"""What `policy_pass` adds to an update's sums (its counts and sums of token figures)."""


def policy_pass(
    policy: Policy,
    cfg: Any,
    rollout: Any,
    idx: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    *,
    normalizer: float,
    beta: float,
    first_pass: bool,
    sums: dict[str, float],
) -> torch.Tensor:
    """Rows `idx`: the policy's forward, the clipped surrogate (+ beta KL), its share of the step loss (`normalizer`
    counted over the whole optimizer step), the backward; its figures added to `sums` (`FIGURES`, and with
    `old_logp` None, the one on-policy pass, the largest trainer-sampler logprob gap). `advantages`: (N,) one per
    completion or (N, T) one per token; `mask` (N, T) the tokens in the loss. -> the rows' mask (n, w)."""
    logp, entropy = policy.forward(rollout, idx, with_entropy=first_pass)  # (n, w)
    width = logp.shape[1]
    m = mask[idx, :width]  # (n, w)
    token_loss, tok_stats = algo.per_token_loss(
        logp,
        old_logp[idx, :width] if old_logp is not None else logp.detach(),
        advantages[idx] if advantages.dim() == 1 else advantages[idx, :width],  # (n,) or (n, w)
        m,
        ref_logp=ref_logp[idx, :width] if ref_logp is not None else None,
        beta=beta,
        **cfg.surrogate(),
    )
    loss = algo.aggregate_loss(token_loss, m, loss_type=cfg.loss_type, normalizer=normalizer)
    if not math.isfinite(loss_value := loss.item()):
        raise NumericsError(f"the loss is {loss_value}; the optimizer step was not applied")
    policy.backward(loss)
    n_tok = float(m.sum())
    sums["loss"] += loss_value
    sums["clip_ratio/low_mean"] += float((tok_stats["clipped_low"] * m).sum())
    sums["clip_ratio/high_mean"] += float((tok_stats["clipped_high"] * m).sum())
    sums["kl"] += float((tok_stats["kl"] * m).sum())
    sums["tokens"] += n_tok
    if first_pass:
        sums["entropy"] += float((entropy * m).sum())
        sums["first_pass_tokens"] += n_tok
    if old_logp is None:  # one pass, one optimizer step: logp is still the sampling policy's
        gap = algo.max_logp_gap(logp.detach(), rollout.sampling_logp[idx, :width], m)
        sums["sampler_logp_diff"] = max(sums["sampler_logp_diff"], gap)
    return m


def policy_figures(sums: dict[str, float], n_opt_steps: int, *, with_kl: bool) -> dict[str, float]:
    """An update's figures from its `sums` (over every rank): the mean loss and gradient norm of its optimizer
    steps, token means of entropy (first pass), clipping and KL (`with_kl`: a reference exists), the logprob gap."""
    tokens_seen, first_pass_tokens = max(sums["tokens"], 1.0), max(sums["first_pass_tokens"], 1.0)
    stats = {
        "loss": sums["loss"] / n_opt_steps,
        "grad_norm": sums["grad_norm"] / n_opt_steps,
        "entropy": sums["entropy"] / first_pass_tokens,
        "clip_ratio/low_mean": sums["clip_ratio/low_mean"] / tokens_seen,
        "clip_ratio/high_mean": sums["clip_ratio/high_mean"] / tokens_seen,
        "sampler_logp_diff": sums["sampler_logp_diff"],
    }
    stats["clip_ratio/region_mean"] = stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]
    if with_kl:
        stats["kl"] = sums["kl"] / tokens_seen
    return stats
