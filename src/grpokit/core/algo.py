"""The GRPO and PPO math as pure functions of tensors: log-probs, advantages, KL estimators, losses, GAE and
the value loss.

N = P * G rows (prompt p owns rows p*G .. p*G + G - 1), T = padded completion length.
References: GRPO (Shao et al. 2024, DeepSeekMath), DAPO (Yu et al. 2025), Dr. GRPO (Liu et al. 2025,
"Understanding R1-Zero-Like Training"), GSPO (Zheng et al. 2025), RLOO (Ahmadian et al. 2024),
k1/k2/k3 (Schulman 2020, "Approximating KL divergence"), PPO (Schulman et al. 2017), GAE (Schulman et al.
2016), the per-token KL reward of InstructGPT (Ouyang et al. 2022); the policy losses beyond the clipped surrogate:
CISPO (MiniMax-M1, arXiv 2506.13585), SAPO (arXiv 2511.20347), LUSPO (arXiv 2602.05261), VESPO (arXiv 2602.10693),
INTELLECT-2's two-sided clip (arXiv 2505.07291) and DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

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
        # clamped: a token of probability 0 (logit -inf) adds 0 to the entropy, not 0 x -inf = NaN
        log_probs = torch.log_softmax(logits, dim=-1).clamp(min=torch.finfo(logits.dtype).min)  # (m, V)
        return logp, -(log_probs.exp() * log_probs).sum(-1)  # (m,), (m,)
    if not wants_entropy["now"]:
        return logp, None
    wants_entropy["now"] = False  # a backward that recomputes this chunk needs no metric
    with torch.no_grad():  # entropy is a metric only: H = lse - sum_v p_v * logit_v
        lse = torch.logsumexp(logits, dim=-1)  # (m,)
        probs = (logits - lse[:, None]).exp_()  # (m, V)
        entropy = lse - (probs * logits).nan_to_num_(nan=0.0).sum(-1)  # (m,) (0 x -inf: a token of probability 0)
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
            # nan_to_num_: a token of probability 0 (logit -inf) adds 0, not 0 x -inf = NaN
            entropy = -log_probs.exp().mul_(log_probs).nan_to_num_(nan=0.0).sum(-1)  # (m,)
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
            grad = grad.mul_(probs).nan_to_num_(nan=0.0).mul_(-1 / T)  # (m, V) (p = 0: no gradient, not NaN)
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


def signal_free_groups(
    rewards: torch.Tensor, weights: torch.Tensor, *, group_size: int, aggregation: str
) -> torch.Tensor:
    """(P,) bool: the groups whose advantages are all 0 under `aggregation`, from the reward columns (N, K) (NaN
    where a function returned None) and their weights (K,): what dynamic sampling drops.

    sum_then_normalize: the combined reward has no spread (`flat_groups`). normalize_then_sum: every weighted column
    is flat on its own rows -- a group whose weighted total is constant can still have advantages there (rewards
    (2, 0) and (0, 1) with weights 1 and 2 both total 2, yet each column's z-scores are not 0)."""
    if aggregation == "sum_then_normalize":
        total, scorable = combine_rewards(rewards, weights)  # (N,), (N,)
        return flat_groups(total, scorable, group_size=group_size)
    if aggregation == "normalize_then_sum":
        flat = torch.ones(rewards.shape[0] // group_size, dtype=torch.bool, device=rewards.device)  # (P,)
        for column, weight in zip(rewards.unbind(-1), weights.tolist()):
            if weight != 0:
                flat &= flat_groups(torch.nan_to_num(column, nan=0.0), ~torch.isnan(column), group_size=group_size)
        return flat
    raise _unknown("reward_aggregation", aggregation, REWARD_AGGREGATIONS)


def kept_groups(flat: torch.Tensor, keep: int) -> torch.Tensor:
    """DAPO's dynamic sampling (Yu et al. 2025, section 3.2): the `keep` groups a step trains out of the groups
    sampled for it so far, `flat` (M,) bool in sampling order (`flat_groups`, M >= keep).

    The first `keep` groups with reward spread, in sampling order (a surplus is left out, as verl keeps exactly the
    batch); when fewer were sampled (the cap on generation rounds was reached), the earliest flat groups fill the
    rest, so that the step keeps its shape (their advantages are 0). -> (keep,) long indices, ascending.
    """
    if flat.dim() != 1 or flat.numel() < keep:
        raise ValueError(f"{keep} groups to keep out of {tuple(flat.shape)} flags; expected at least {keep} groups")
    spread = (~flat).nonzero().squeeze(-1)[:keep]  # (<= keep,)
    fill = flat.nonzero().squeeze(-1)[: keep - len(spread)]  # (keep - spread,)
    return torch.cat([spread, fill]).sort().values  # (keep,)


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


# ---------------------------------------------------------------- the policy term of each loss type


def clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, *, epsilon_low: float, epsilon_high: float, delta: float | None = None
) -> torch.Tensor:
    """PPO's clipped surrogate as GRPO takes it: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    `delta`, INTELLECT-2's two-sided clip (arXiv 2505.07291): -min(min(rho, delta) A, clip(rho) A). With A < 0 the plain
    surrogate keeps the unclipped term once rho > 1 - eps_low, so a token whose probability rose far since it was
    sampled weighs without bound; the cap holds it at delta (and stops its gradient there). For A > 0 and
    delta > 1 + eps_high nothing changes. The loss of grpo, bnpo, dapo, dr_grpo and luspo.

    ratio: (N, T); adv: (N, 1) or (N, T). -> (N, T)
    """
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)  # (N, T)
    unclipped = ratio if delta is None else ratio.clamp(max=delta)  # (N, T)
    return -torch.minimum(unclipped * adv, clipped * adv)  # (N, T)


def cispo_surrogate(logp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, *, cap: float) -> torch.Tensor:
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(min(rho, cap)) A log pi, REINFORCE on every token weighed by its
    importance ratio, the weight capped and detached. PPO's clip drops the gradient of a token whose ratio left the
    trust region (often a rare, decisive token); CISPO keeps every token's gradient and bounds only its weight.

    The cap is the ratio's own bound (TRL passes epsilon_high itself, ScaleRL's epsilon_max, arXiv 2510.13786, which
    recommends 5), not 1 + epsilon_high: below 1 it makes every on-policy weight the cap.

    logp, ratio: (N, T); adv: (N, 1) or (N, T). -> (N, T)
    """
    return -ratio.clamp(max=cap).detach() * adv * logp  # (N, T)


def sapo_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, *, temperature_pos: float, temperature_neg: float
) -> torch.Tensor:
    """SAPO, Soft Adaptive Policy Optimization (arXiv 2511.20347): the hard clip replaced by a smooth gate,
    -f(rho) A with f(rho) = 4 / tau * sigmoid(tau (rho - 1)), tau = temperature_pos where A > 0, else temperature_neg.

    f'(rho) = 4 s (1 - s) with s the sigmoid: 1 at rho = 1, so on-policy the gradient is GRPO's, and it fades smoothly
    as rho leaves 1 instead of dropping to 0 at a clip edge; a larger tau fades faster (the paper's negative
    temperature is the larger: negative-advantage tokens destabilize more).

    ratio: (N, T); adv: (N, 1) or (N, T). -> (N, T)
    """
    tau = torch.where(adv > 0, adv.new_tensor(temperature_pos), adv.new_tensor(temperature_neg))  # like adv
    return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv  # (N, T)


_LOG_W_FLOOR = math.log(1e-8)  # VESPO's bounds on a log weight (TRL's): [ln 1e-8, 20]


def vespo_weights(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
    sampler_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """VESPO (arXiv 2602.10693): each sequence's gamma weight phi(w) = w^k exp(lambda (1 - w)) of its importance ratio
    w = prod_t pi / pi_old over its loss tokens (a product, not GSPO's geometric mean); phi(1) = 1, and phi fades both
    where w << 1 (w^k) and where w >> 1 (exp(-lambda w)) instead of clipping. k and lambda follow the advantage's sign
    (A >= 0: k_pos, lambda_pos). An engine-vs-trainer correction's token weights (`sampler_weight`, token modes) join
    w as factors pi_old / q. In log space, each log bounded as TRL does (a token's log ratio to [-20, 20], a correction
    weight's and the sum's to [ln 1e-8, 20]); a weight that overflows is 0. Detached: it scales the gradient of
    -phi A log pi and is never trained.

    log_ratio, mask, sampler_weight: (N, T); adv: (N, 1) or (N, T). -> (N, 1) (with per-token advantages (N, T))
    """
    on = mask.bool()
    with torch.no_grad():
        log_w = torch.where(on, log_ratio.clamp(-20.0, 20.0), 0.0).sum(-1, keepdim=True)  # (N, 1)
        if sampler_weight is not None:
            log_q = sampler_weight.to(log_ratio).log().clamp(_LOG_W_FLOOR, 20.0)  # (N, T); a dropped token: the floor
            log_w = log_w + torch.where(on, log_q, 0.0).sum(-1, keepdim=True)  # (N, 1)
        log_w = log_w.clamp(_LOG_W_FLOOR, 20.0)  # (N, 1)
        nonneg = adv >= 0  # (N, 1) or (N, T)
        k = torch.where(nonneg, adv.new_tensor(k_pos), adv.new_tensor(k_neg))
        lam = torch.where(nonneg, adv.new_tensor(lambda_pos), adv.new_tensor(lambda_neg))
        log_phi = lam + k * log_w - lam * log_w.exp()  # like adv
        return log_phi.exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_keep(
    adv: torch.Tensor, logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, *, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9): a sequence with A < 0 whose mean
    log(q / pi) over its loss tokens (an estimate of KL(q || pi), q the policy that sampled it, pi the one in training)
    exceeds `threshold` leaves the loss; sequences with A >= 0 or closer to the policy stay. Pushing down a sample the
    policy would no longer produce mostly adds noise.

    q is the sampler's own logprobs (rollout.sampling_logp), which a grpokit rollout always carries. TRL takes vLLM's
    when vLLM sampled and the old policy's otherwise, because only vLLM gives it sampling logprobs; the sampler's are
    the truer q in both cases (they see an engine's numerics and the drift of earlier optimizer steps), and those of
    grpokit's own sampler equal the old policy's to float rounding. A NaN sampling logprob (a token an engine could not
    score) is no evidence and counts 0, as in TRL.

    adv: (N, 1) or (N, T); logp, sampling_logp, mask: (N, T). -> float (N, 1): 1 keep, 0 drop (with per-token
    advantages (N, T))
    """
    gap = torch.where(mask.bool(), sampling_logp.to(logp) - logp.detach(), 0.0).nan_to_num(nan=0.0)  # (N, T)
    mean_kl = gap.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1).to(logp.dtype)  # (N, 1)
    return ((adv >= 0) | (mean_kl <= threshold)).to(logp.dtype)


CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "luspo")
"""The loss types whose policy term is the clipped surrogate (they differ in aggregation): the ones `delta` caps."""


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
    loss_type: str = "grpo",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    sampling_logp: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_it = policy term + beta KL_it, unmasked (N, T). The policy term is the loss type's: the clipped surrogate
    -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) (`clipped_surrogate`, with `delta`), or `cispo_surrogate`
    (its cap: epsilon_high), `sapo_surrogate`, or VESPO's -phi_i A_i log pi (`vespo_weights`).

    `kl_importance_weight`: the KL term is rho_it KL_it instead (rho unclipped, with its gradient), the unbiased
    reverse-KL gradient on samples of pi_old (DeepSeek-V3.2, arXiv 2512.02556; TRL's
    use_bias_correction_kl). The logged "kl" stays KL_it.

    `advantages`: one per completion (N,) as in GRPO, or one per token (N, T) as PPO's GAE gives.
    Asymmetric clipping ("clip-higher") is from DAPO (Yu et al. 2025). `sampler_weight` (N, T), when given, multiplies
    the policy term (not the KL) of each token: the engine-vs-trainer correction (`sampler_correction`), as TRL
    applies it (VESPO folds it into its sequence weight instead). `selected` (N, T) 0/1, when given, keeps the
    policy term of the selected tokens only and the KL term of every token (`high_entropy_mask`, as TRL's
    top_entropy_quantile does). `off_policy_mask_threshold`: the policy term of a
    sequence `off_policy_keep` drops (from `sampling_logp` (N, T), the sampler's logprobs) is 0. stats hold float
    (N, T) maps "kl", "clipped_low", "clipped_high" (0 for cispo, sapo, vespo: no hard clip), "ratio", and, where they
    apply, "cispo_clipped" (weight capped, A > 0), "vespo_phi" and "off_policy_dropped" (detached; the caller masks
    and sums).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise _unknown("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if importance_level not in IMPORTANCE_LEVELS:
        raise _unknown("importance_level", importance_level, IMPORTANCE_LEVELS)
    if loss_type not in _NORMALIZERS:
        raise _unknown("loss_type", loss_type, LOSS_TYPES)
    if delta is not None and loss_type not in CLIPPED_LOSS_TYPES:
        raise ValueError(f"delta={delta} caps the clipped surrogate's ratio; loss_type={loss_type!r} has none")
    if off_policy_mask_threshold is not None and sampling_logp is None:
        raise ValueError(f"off_policy_mask_threshold={off_policy_mask_threshold} needs sampling_logp")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp")
    if importance_level == "token":
        ratio = token_ratio(logp, old_logp)  # (N, T)
    else:
        ratio = sequence_ratio(logp, old_logp, mask).expand_as(logp)  # (N, T)
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # (N, 1) or (N, T)
    no_clip = torch.zeros_like(logp)
    stats = {"clipped_low": no_clip, "clipped_high": no_clip}
    if loss_type == "cispo":
        loss = cispo_surrogate(logp, ratio, adv, cap=epsilon_high)  # (N, T)
        stats["cispo_clipped"] = ((ratio > epsilon_high) & (adv > 0)).to(logp.dtype)
    elif loss_type == "sapo":
        loss = sapo_surrogate(ratio, adv, temperature_pos=sapo_temperature_pos, temperature_neg=sapo_temperature_neg)
    elif loss_type == "vespo":
        phi = vespo_weights(
            logp - old_logp, adv, mask, k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg,
            lambda_neg=vespo_lambda_neg, sampler_weight=sampler_weight,
        )  # fmt: skip
        loss = -phi * adv * logp  # (N, T)
        stats["vespo_phi"] = phi.expand_as(logp)
    else:
        loss = clipped_surrogate(ratio, adv, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta)
        stats["clipped_low"] = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(logp.dtype)
        stats["clipped_high"] = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(logp.dtype)
    if off_policy_mask_threshold is not None:
        keep = off_policy_keep(adv, logp, sampling_logp, mask, threshold=off_policy_mask_threshold)  # (N, 1)
        loss = loss * keep  # (N, T)
        stats["off_policy_dropped"] = (1.0 - keep).expand_as(logp)
    if sampler_weight is not None and loss_type != "vespo":
        loss = loss * sampler_weight.to(loss.dtype)  # (N, T)
    if selected is not None:
        loss = loss * selected.to(loss.dtype)  # (N, T)
    kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta != 0:
        loss = loss + beta * (kl * ratio if kl_importance_weight else kl)
    stats.update(kl=kl.detach(), ratio=ratio.detach())
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
    "cispo": _dapo_normalizer,  # TRL's: the tokens of the generation batch, as DAPO
    "sapo": _grpo_normalizer,  # TRL's: GRPO's mean of per-sequence means
    "luspo": _grpo_normalizer,  # LUSPO: each sequence's token SUM (its length weighs it), a mean over sequences
    "vespo": _dapo_normalizer,  # TRL's: the tokens of the generation batch, as DAPO
}
LOSS_TYPES = tuple(_NORMALIZERS)
_PER_SEQUENCE_MEAN = ("grpo", "sapo")  # a sequence's tokens are averaged before the sequences are summed


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

    grpo, sapo: sum_i (sum_t m L / max(sum_t m, 1)) / normalizer; the others (luspo included): sum m L / normalizer.
    """
    if loss_type not in _NORMALIZERS:
        raise _unknown("loss_type", loss_type, LOSS_TYPES)
    masked = torch.where(mask.bool(), loss, 0.0)  # (n, T); where, not *, so inf/NaN padding stays out
    if loss_type in _PER_SEQUENCE_MEAN:
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


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / std over the real tokens (N, T), the variance Bessel-corrected; 0 where masked. Fewer than
    two real tokens: the mean alone is removed (a std of one number is undefined). `total`: a sum (a 0-d tensor)
    over every process holding a share of the tokens, so that the mean and std are the whole step's (None: x holds
    all of them)."""
    total = total or (lambda t: t)
    m = mask.to(x.dtype)
    count = total(m.sum())
    mean = total((x * m).sum()) / count.clamp(min=1)
    var = (total(((x - mean) * m).pow(2).sum()) / (count - 1)).clamp(min=0) if count > 1 else None
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
