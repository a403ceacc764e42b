"""The GRPO and PPO math as pure functions of tensors: log-probs, advantages, KL estimators, losses, GAE and
the value loss.

N = P * G rows (prompt p owns rows p*G .. p*G + G - 1), T = padded completion length.
References: GRPO (Shao et al. 2024, DeepSeekMath), DAPO (Yu et al. 2025), Dr. GRPO (Liu et al. 2025,
"Understanding R1-Zero-Like Training"), GSPO (Zheng et al. 2025), RLOO (Ahmadian et al. 2024),
k1/k2/k3 (Schulman 2020, "Approximating KL divergence"), PPO (Schulman et al. 2017), GAE (Schulman et al.
2016), the per-token KL reward of InstructGPT (Ouyang et al. 2022).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.utils.checkpoint

ADV_EPS = 1e-4


def _unknown(kind: str, value: object, allowed) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; expected one of {sorted(allowed)}")


# ---------------------------------------------------------------- log-probs


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[ids] without materializing the full (..., V) log_softmax."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (...)
        return picked - torch.logsumexp(logits, dim=-1)  # (...)
    # logsumexp in bf16/fp16 is too coarse; upcast one row at a time to keep the peak small
    flat_logits, flat_ids = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)  # (R, V), (R,)
    rows = [torch.log_softmax(row.float(), -1)[i] for row, i in zip(flat_logits, flat_ids)]
    return torch.stack(rows).reshape(ids.shape)  # (...)


def _chunk_logprobs(hidden, ids, lm_head, temperature, wants_entropy):
    logits = lm_head(hidden)  # (m, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (m, V)
    logp = selective_log_softmax(logits, ids)  # (m,)
    if wants_entropy["grad"]:  # a term of the loss: taped, and recomputed with the chunk in the backward
        log_probs = torch.log_softmax(logits, dim=-1)  # (m, V)
        return logp, -(log_probs.exp() * log_probs).sum(-1)  # (m,), (m,)
    if not wants_entropy["now"]:
        return logp, None
    wants_entropy["now"] = False  # a backward that recomputes this chunk needs no metric
    with torch.no_grad():  # entropy is a metric only: H = lse - sum_v p_v * logit_v
        lse = torch.logsumexp(logits, dim=-1)  # (m,)
        probs = (logits - lse[:, None]).exp_()  # (m, V)
        entropy = lse - (probs * logits).sum(-1)  # (m,)
    return logp, entropy  # (m,), (m,)


class _LinearLogprobs(torch.autograd.Function):
    """logp (m,) of `ids` under (hidden @ W^T + b) / T, with the gradient written out instead of taped.

    d logp_i / d logit_iv = [v = ids_i] - p_iv, so the backward needs only the (m,) log-normalizers: it
    recomputes the chunk's logits once and turns them into the gradient in place. autograd through
    log_softmax would keep or rebuild a dozen (m, V) temporaries per chunk (a tenth of a 135M model's
    update on a CPU); a frozen head (LoRA) gets no weight gradient at all.

    The entropy H_i = -sum_v p_iv log p_iv is a metric (no gradient) unless `entropy_grad`: then
    dH_i / d logit_iv = -p_iv (log p_iv + H_i), and the backward needs only the (m,) entropies beside the
    log-normalizers; no (m, V) tensor lives from the forward to the backward either way.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, with_entropy, entropy_grad):
        logits = torch.nn.functional.linear(hidden, weight, bias).div_(temperature)  # (m, V)
        lse = torch.logsumexp(logits, dim=-1)  # (m,)
        logp = logits.gather(-1, ids[:, None]).squeeze(-1) - lse  # (m,)
        entropy = None
        if with_entropy:  # H = -sum_v p_v log p_v
            log_probs = logits.sub_(lse[:, None])  # (m, V) in place: the logits are not needed any more
            entropy = -log_probs.exp().mul_(log_probs).sum(-1)  # (m,)
            if not entropy_grad:
                ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy if entropy_grad else None)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no (m, V) work for it
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
        if entropy is None:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        T = ctx.temperature
        log_probs = torch.nn.functional.linear(hidden, weight, bias).div_(T).sub_(lse[:, None])  # (m, V)
        if grad_entropy is None:
            # d loss / d logits = g_i ([v = ids_i] - p_iv) / T, built in the logits' memory
            grad = log_probs.exp_().mul_(-grad_logp[:, None] / T)  # (m, V)
        else:
            # d loss / d logits = (g_i [v = ids_i] - p_iv (g_i + gH_i (log p_iv + H_i))) / T
            g = grad_logp if grad_logp is not None else torch.zeros_like(lse)  # (m,)
            probs = log_probs.exp()  # (m, V)
            grad = log_probs.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(g[:, None])  # (m, V)
            grad = grad.mul_(probs).mul_(-1 / T)  # (m, V)
            del probs
            grad_logp = g
        grad.scatter_add_(-1, ids[:, None], grad_logp[:, None] / T)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad @ weight if need_hidden else None  # (m, H)
        grad_weight = grad.t() @ hidden if need_weight else None  # (V, H)
        grad_bias = grad.sum(0) if bias is not None and need_bias else None  # (V,)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    ids: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int = 512,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (M,) of `ids` under lm_head(hidden) / temperature, computed chunk by chunk; with `with_entropy`
    also the entropies (M,) of those distributions, a metric without gradient unless `entropy_grad` (an entropy
    term in the loss; implies `with_entropy`).

    Only one chunk's (chunk, V) float32 logits are alive at a time, in the forward and the backward. A plain
    `nn.Linear` head in float32 (or float64) without hooks goes through `_LinearLogprobs`; any other head, or a
    forward under autocast, through a checkpointed log_softmax per chunk (whose recompute skips a metric entropy).
    temperature <= 0 (greedy) counts as 1.
    """
    temperature = temperature if temperature > 0 else 1.0
    with_entropy = with_entropy or entropy_grad
    step = max(int(chunk_size), 1)
    fused = (
        type(lm_head) is torch.nn.Linear
        and not (lm_head._forward_hooks or lm_head._forward_pre_hooks)  # a hook must see the head's call
        and lm_head.weight.dtype == hidden.dtype
        and hidden.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(hidden.device.type)
    )
    outs = []
    for start in range(0, max(hidden.shape[0], 1), step):  # M == 0 still runs one empty chunk
        h, i = hidden[start : start + step], ids[start : start + step]  # (m, H), (m,)
        if fused:
            outs.append(
                _LinearLogprobs.apply(h, lm_head.weight, lm_head.bias, i, temperature, with_entropy, entropy_grad)
            )
            continue
        wants = {"now": with_entropy, "grad": entropy_grad and torch.is_grad_enabled()}
        fn = functools.partial(_chunk_logprobs, lm_head=lm_head, temperature=temperature, wants_entropy=wants)
        if torch.is_grad_enabled():
            outs.append(torch.utils.checkpoint.checkpoint(fn, h, i, use_reentrant=False))
        else:
            outs.append(fn(h, i))
    logp = torch.cat([o[0] for o in outs])  # (M,)
    return logp, (torch.cat([o[1] for o in outs]) if with_entropy else None)  # (M,), (M,) | None


def max_logp_gap(logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |trainer - sampler| logprob over real tokens (N, T): ~1e-6 in fp32; a large value means the
    sampler and the trainer do not see the same model (dtype, kernels, or a bug). No rows: 0."""
    if mask.numel() == 0:
        return 0.0
    return float(((logp - sampling_logp.to(logp.device)).abs() * mask.to(logp.dtype)).max())


# ---------------------------------------------------------------- rewards and advantages


def combine_rewards(rewards: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r_i = sum_k w_k r_ik over the functions that returned a number (NaN = returned None).

    A row where every function returned None is unscorable: total 0, scorable False.
    """
    present = ~torch.isnan(rewards)  # (N, K)
    weighted = torch.where(present, rewards, 0.0) * weights.to(rewards)  # (N, K)
    return weighted.sum(-1), present.any(-1)  # (N,), (N,)


def _group_stats(r: torch.Tensor, s: torch.Tensor):
    """Count, mean and Bessel-corrected std of the scorable entries along the last dim."""
    count = s.sum(-1, keepdim=True).to(r.dtype)  # (P, 1)
    mean = torch.where(s, r, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)  # (P, 1)
    sq = torch.where(s, r - mean, 0.0).pow(2).sum(-1, keepdim=True)  # (P, 1)
    return count, mean, (sq / (count - 1).clamp(min=1)).sqrt()


def group_scaled(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_g) / (std_g + eps)."""
    _, mean, std = _group_stats(r, s)
    return (r - mean) / (std + ADV_EPS)  # (P, G)


def batch_scaled(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Group mean, batch std: Lite PPO (Liu et al. 2025, "Tricks or Traps?"); robust to flat groups."""
    _, mean, _ = _group_stats(r, s)
    _, _, std = _group_stats(r.reshape(1, -1), s.reshape(1, -1))  # (1, 1)
    return (r - mean) / (std + ADV_EPS)  # (P, G)


def unscaled(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g; the std would up-weight near-flat groups."""
    _, mean, _ = _group_stats(r, s)
    return r - mean  # (P, G)


def rloo(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = c / (c - 1) * (r_i - mean_g)."""
    count, mean, _ = _group_stats(r, s)
    return (r - mean) * count / (count - 1).clamp(min=1)  # (P, G); c == 1 is zeroed by the caller


ADVANTAGE_SCALES = {"group": group_scaled, "batch": batch_scaled, "none": unscaled, "rloo": rloo}


def advantages(total: torch.Tensor, scorable: torch.Tensor, *, group_size: int, scale: str) -> torch.Tensor:
    """Per-row advantages (N,) from scalar rewards, normalized inside each group of `group_size`.

    Unscorable rows get 0 and are left out of their group's statistics. A group whose scorable
    rewards are all equal gets exactly 0: (r - mean) need not round to 0 (3 * 0.1 / 3 != 0.1).
    """
    if scale not in ADVANTAGE_SCALES:
        raise _unknown("scale", scale, ADVANTAGE_SCALES)
    if group_size < 1 or total.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {total.numel()} rows")
    if not total.is_floating_point():
        total = total.to(torch.get_default_dtype())
    r, s = total.reshape(-1, group_size), scorable.reshape(-1, group_size).bool()  # (P, G)
    adv = ADVANTAGE_SCALES[scale](r, s)  # (P, G)
    flat = flat_groups(total, scorable, group_size=group_size).unsqueeze(-1)  # (P, 1)
    return torch.where(s & ~flat, adv, 0.0).reshape(-1)  # (N,)


def flat_groups(total: torch.Tensor, scorable: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """(P,) bool: groups without reward spread, whose advantages are all 0 (no learning signal).

    The one definition of "no spread": fewer than two distinct rewards among the group's SCORABLE rows
    (an unscorable row is left out, not counted as a reward of 0).
    """
    r, s = total.reshape(-1, group_size), scorable.reshape(-1, group_size).bool()  # (P, G)
    hi = torch.where(s, r, -torch.inf).amax(-1)  # (P,)
    lo = torch.where(s, r, torch.inf).amin(-1)  # (P,)
    return ~(hi > lo)  # (P,); a group with no scorable row is flat too


REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def multi_reward_advantages(
    rewards: torch.Tensor, weights: torch.Tensor, *, group_size: int, scale: str, aggregation: str
) -> torch.Tensor:
    """Advantages (N,) from K reward columns (N, K), NaN where a function returned None.

    sum_then_normalize (GRPO): A = normalize_g(sum_k w_k r_k).
    normalize_then_sum: A = sum_k w_k normalize_g(r_k), each function normalized in its group over the
    rows where it returned a number, so a reward on a large scale (a reward model's logits) cannot
    drown a 0/1 rule, and a None leaves only that function's term at 0.
    """
    if aggregation == "sum_then_normalize":
        total, scorable = combine_rewards(rewards, weights)  # (N,), (N,)
        return advantages(total, scorable, group_size=group_size, scale=scale)
    if aggregation == "normalize_then_sum":
        per_function = [
            advantages(torch.nan_to_num(column, nan=0.0), ~torch.isnan(column), group_size=group_size, scale=scale)
            for column in rewards.unbind(-1)
        ]  # K x (N,)
        return (torch.stack(per_function, -1) * weights.to(rewards)).sum(-1)  # (N,)
    raise _unknown("reward_aggregation", aggregation, REWARD_AGGREGATIONS)


# ---------------------------------------------------------------- KL estimators (Schulman 2020)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = -d = log pi - log pi_ref: unbiased, high variance, can be negative."""
    return logp - ref_logp  # (N, T)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = d^2 / 2: biased, low variance, >= 0."""
    return 0.5 * (ref_logp - logp).pow(2)  # (N, T)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) - d - 1: unbiased and >= 0; the estimator of the GRPO paper."""
    d = ref_logp - logp  # (N, T)
    return torch.expm1(d) - d  # (N, T); expm1 keeps small d accurate


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# ---------------------------------------------------------------- ratios and the per-token loss


def token_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """PPO/GRPO per-token importance ratio rho_it = pi / pi_old."""
    return torch.exp(logp - old_logp)  # (N, T)


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025): rho_i = exp(mean_t of the masked log ratio), length-normalized."""
    m = mask.to(logp.dtype)  # (N, T)
    log_ratio = torch.where(mask.bool(), logp - old_logp, 0.0).sum(-1, keepdim=True)  # (N, 1)
    return torch.exp(log_ratio / m.sum(-1, keepdim=True).clamp(min=1))  # (N, 1)


SAMPLER_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_correction(
    trainer_logp: torch.Tensor,
    sampling_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> torch.Tensor:
    """Importance weights for the gap between the engine that sampled and the trainer (TRL's
    `vllm_importance_sampling_*`; Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"): w = pi_trainer / q_engine per token (`token_*`), or its product over the row's masked tokens
    (`sequence_*`); `*_truncate` clamps w to [clip_min, clip_max], `*_mask` sets to 0 a weight outside it (None: no
    bound on that side). Detached: a weight multiplies the policy-gradient term of each token, never trained.

    trainer_logp, sampling_logp, mask: (N, T), the trainer's old logprobs, the engine's, the tokens in the loss.
    -> (N, T) float weights (sequence modes: each row's weight on every column)."""
    if mode not in SAMPLER_CORRECTION_MODES:
        raise _unknown("vllm_importance_sampling_mode", mode, SAMPLER_CORRECTION_MODES)
    on = mask.bool()
    gap = torch.where(on, trainer_logp.detach().float() - sampling_logp.to(trainer_logp.device).float(), 0.0)  # (N, T)
    if mode.startswith("sequence"):
        gap = gap.sum(-1, keepdim=True).expand_as(gap)  # (N, T) the row's log ratio on every column
    weight = torch.exp(gap)  # (N, T)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return weight.clamp(min=clip_min, max=clip_max)  # (N, T)
    return torch.where((weight < low) | (weight > high), 0.0, weight)  # (N, T)


def correction_values(weight: torch.Tensor, mask: torch.Tensor, *, mode: str) -> torch.Tensor:
    """The weights the figures are over (1-D): one per token in the loss (`token_*`), one per row with one
    (`sequence_*`)."""
    on = mask.bool()
    if mode.startswith("sequence"):
        return weight[:, 0][on.any(-1)] if weight.shape[1] else weight.new_zeros(0)
    return weight[on]


IMPORTANCE_LEVELS = ("token", "sequence")


def per_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    kl_estimator: str = "k3",
    importance_level: str = "token",
    sampler_weight: torch.Tensor | None = None,
    kl_importance_weight: bool = False,
    selected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta KL_it, unmasked (N, T).

    `kl_importance_weight`: the KL term is rho_it KL_it instead (rho unclipped, with its gradient), the unbiased
    reverse-KL gradient on samples of pi_old (DeepSeek-V3.2, arXiv 2512.02556; TRL's
    use_bias_correction_kl). The logged "kl" stays KL_it.

    `advantages`: one per completion (N,) as in GRPO, or one per token (N, T) as PPO's GAE gives.
    Asymmetric clipping ("clip-higher") is from DAPO (Yu et al. 2025). `sampler_weight` (N, T), when given, multiplies
    the surrogate term (not the KL) of each token: the engine-vs-trainer correction (`sampler_correction`), as TRL
    applies it. `selected` (N, T) 0/1, when given, keeps the surrogate term of the selected tokens only and the KL
    term of every token (`high_entropy_mask`, as TRL's top_entropy_quantile does). stats hold float (N, T)
    maps "kl", "clipped_low", "clipped_high", "ratio" (detached; the caller masks and sums).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise _unknown("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if importance_level not in IMPORTANCE_LEVELS:
        raise _unknown("importance_level", importance_level, IMPORTANCE_LEVELS)
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp")
    if importance_level == "token":
        ratio = token_ratio(logp, old_logp)  # (N, T)
    else:
        ratio = sequence_ratio(logp, old_logp, mask).expand_as(logp)  # (N, T)
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # (N, 1) or (N, T)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)  # (N, T)
    loss = -torch.minimum(ratio * adv, clipped * adv)  # (N, T)
    if sampler_weight is not None:
        loss = loss * sampler_weight.to(loss.dtype)  # (N, T)
    if selected is not None:
        loss = loss * selected.to(loss.dtype)  # (N, T)
    kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta != 0:
        loss = loss + beta * (kl * ratio if kl_importance_weight else kl)
    stats = {
        "kl": kl.detach(),
        "clipped_low": ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(logp.dtype),
        "clipped_high": ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(logp.dtype),
        "ratio": ratio.detach(),
    }
    return loss, stats


# ---------------------------------------------------------------- high-entropy tokens and the entropy bonus


def entropy_threshold(entropies: torch.Tensor, keep: float) -> float:
    """The (1 - keep) quantile of `entropies` (1-D: every loss token of the optimizer step, all micro-batches and
    ranks), linearly interpolated between order statistics as torch.quantile's default (its size limit aside), in
    the entropies' dtype. Tokens at or above it are the top `keep` fraction of "Beyond the 80/20 Rule" (Wang et al.
    2025): keep = 0.2 trains the 20% highest-entropy "forking" tokens; keep = 0 gives the largest entropy (only its
    ties stay). No tokens: inf, so none is selected."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    if entropies.numel() == 0:
        return math.inf
    ordered = entropies.reshape(-1).sort().values  # (M,)
    rank = torch.tensor(1.0 - keep, dtype=ordered.dtype) * (ordered.numel() - 1)  # as torch.quantile: in the dtype
    below, above = int(rank.floor()), int(rank.ceil())
    return float(ordered[below].lerp(ordered[above], rank - below))


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, T) bool: the loss tokens (`mask`) whose entropy is at or above `threshold` (`entropy_threshold`); a tie
    with the threshold is kept, padding never is."""
    return (entropy >= threshold) & mask.bool()


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, *, normalizer: float) -> torch.Tensor:
    """This micro-batch's share of the step's mean token entropy: sum of H over `mask` / `normalizer`, where the
    normalizer counts the mask's tokens over the WHOLE optimizer step (every micro-batch and rank), so the shares of
    a step add up to its mean. The loss subtracts entropy_coef x it (an entropy bonus, as PPO's; TRL's entropy_coef,
    which divides each micro-batch's own mean by the accumulation steps instead: the same with one micro-batch).
    Gradient only as far as `entropy` has one (`logprobs_from_hidden(entropy_grad=True)`)."""
    return torch.where(mask.bool(), entropy, 0.0).sum() / max(normalizer, 1.0)


# ---------------------------------------------------------------- aggregation (loss_type)


def _grpo_normalizer(step_mask, generation_tokens, generation_sequences, max_completion_length):
    """GRPO (Shao et al. 2024): mean over sequences, so count the sequences with a valid token."""
    return float((step_mask.sum(-1) > 0).sum())


def _bnpo_normalizer(step_mask, generation_tokens, generation_sequences, max_completion_length):
    """BNPO: token-level mean over the optimizer step."""
    return float(step_mask.sum())


def _dapo_normalizer(step_mask, generation_tokens, generation_sequences, max_completion_length):
    """DAPO (Yu et al. 2025): token-level mean over the whole generation batch, this step's share."""
    return generation_tokens * step_mask.shape[0] / max(generation_sequences, 1)


def _dr_grpo_normalizer(step_mask, generation_tokens, generation_sequences, max_completion_length):
    """Dr. GRPO (Liu et al. 2025): a constant S * L_max, free of the length bias of 1 / |o_i|."""
    return float(step_mask.shape[0] * max_completion_length)


_NORMALIZERS = {
    "grpo": _grpo_normalizer,
    "bnpo": _bnpo_normalizer,
    "dapo": _dapo_normalizer,
    "dr_grpo": _dr_grpo_normalizer,
}
LOSS_TYPES = tuple(_NORMALIZERS)


def step_normalizer(
    loss_type: str,
    step_mask: torch.Tensor,
    *,
    generation_tokens: int,
    generation_sequences: int,
    max_completion_length: int,
) -> float:
    """The loss denominator of one optimizer step, counted over ALL its micro-batches and ranks."""
    if loss_type not in _NORMALIZERS:
        raise _unknown("loss_type", loss_type, LOSS_TYPES)
    fn = _NORMALIZERS[loss_type]
    return max(fn(step_mask, generation_tokens, generation_sequences, max_completion_length), 1.0)


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, *, loss_type: str, normalizer: float) -> torch.Tensor:
    """Sum of this micro-batch's share of the step loss; the shares of a step add up to its loss.

    grpo: sum_i (sum_t m L / max(sum_t m, 1)) / normalizer; the others: sum m L / normalizer.
    """
    if loss_type not in _NORMALIZERS:
        raise _unknown("loss_type", loss_type, LOSS_TYPES)
    masked = torch.where(mask.bool(), loss, 0.0)  # (n, T); where, not *, so inf/NaN padding stays out
    if loss_type == "grpo":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1).to(loss.dtype)  # (n,)
        return per_seq.sum() / normalizer
    return masked.sum() / normalizer


# ---------------------------------------------------------------- PPO with a critic (per-token advantages)


def token_rewards(
    scores: torch.Tensor, mask: torch.Tensor, *, kl: torch.Tensor | None = None, beta: float = 0.0
) -> torch.Tensor:
    """Per-token rewards (N, T): the completion's score (N,) on its last token in the loss (`mask`, which may have
    holes: tokens the model did not write), and with a `kl` (N, T) the InstructGPT penalty -beta * kl_t on every
    token in the loss. A row without tokens gets nothing."""
    m = mask.to(scores.dtype if scores.is_floating_point() else torch.float32)  # (N, T)
    place = torch.arange(1, m.shape[1] + 1, device=m.device, dtype=m.dtype)  # (T,) 1-based: 0 stays "none"
    last_index = (m * place).argmax(-1)  # (N,) the last position whose mask is 1 (0 for an empty row)
    last = torch.nn.functional.one_hot(last_index, m.shape[1]).to(m.dtype) * m  # (N, T)
    rewards = last * scores.to(m.dtype).unsqueeze(-1)  # (N, T)
    if kl is not None and beta != 0:
        rewards = rewards - beta * kl.to(m.dtype) * m
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over rows (N, T) whose `mask` marks the tokens in the loss -> (advantages,
    returns), 0 where masked.

    Over the masked tokens only: delta_t = r_t + gamma V_next - V_t and A_t = delta_t + gamma lam A_next, where
    "next" is the next token in the loss (V = 0 past the last one: the episode ends there). A token outside the
    loss (padding, or a tool's output inside a multi-turn completion) is no target and no step: the chain passes
    over a hole as one step. The value targets are R_t = A_t + V_t (lam = 1: the discounted return)."""
    m = mask.to(values.dtype)  # (N, T)
    values = values * m
    advantages = torch.zeros_like(values)  # (N, T)
    next_value = torch.zeros_like(values[:, 0])  # (N,) V of the next token in the loss
    next_advantage = torch.zeros_like(values[:, 0])  # (N,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (N,)
        advantage = delta + gamma * lam * next_advantage  # (N,)
        in_loss = m[:, t].bool()  # (N,)
        advantages[:, t] = torch.where(in_loss, advantage, 0.0)
        next_advantage = torch.where(in_loss, advantage, next_advantage)
        next_value = torch.where(in_loss, values[:, t], next_value)
    return advantages, (advantages + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens (N, T), the variance Bessel-corrected; 0 where masked. Fewer than
    two real tokens: the mean alone is removed (a std of one number is undefined)."""
    m = mask.to(x.dtype)
    count = m.sum()
    mean = (x * m).sum() / count.clamp(min=1)
    var = (((x - mean) * m).pow(2).sum() / (count - 1)).clamp(min=0) if count > 1 else None
    out = x - mean if shift_mean else x.clone()
    if var is not None:
        out = out * torch.rsqrt(var + eps)
    return out * m


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token, unmasked (N, T): 0.5 max((V - R)^2, (V_clip - R)^2) with
    V_clip = V_old + clip(V - V_old, -c, c), so that one update cannot move a value far from the one the
    advantages were computed with. -> (loss, clipped (N, T) float: the clipped term was the larger)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)  # (N, T)
    plain = (values - returns).pow(2)  # (N, T)
    clipped = (clipped_values - returns).pow(2)  # (N, T)
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).to(values.dtype).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the real tokens: 1 a perfect critic, 0 one that predicts the mean, < 0
    worse than that. NaN when the returns do not vary."""
    m = mask.bool()
    v, r = values[m].double(), returns[m].double()
    if r.numel() < 2 or float(r.var()) == 0:
        return float("nan")
    return float(1 - (r - v).var() / r.var())
