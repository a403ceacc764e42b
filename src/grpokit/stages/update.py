"""One update of a generation batch, the loop GRPO and PPO share (`run_update`): mu passes over the batch's rows in
minibatches (one optimizer step each), micro-batched (one backward each), the policy-gradient pass of a micro-batch
(`policy_pass`) and the update's figures (`policy_figures`). GRPO and PPO differ in their advantages (one per
completion, or one per token from GAE) and in what else a micro-batch and an optimizer step train (PPO's critic,
passed in as `on_micro_batch` / `on_optimizer_step`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grpokit.core import algo
from grpokit.model.policy import NumericsError, Policy


@dataclass(frozen=True)
class SamplerCorrection:
    """The engine-vs-trainer importance correction (`algo.sampler_correction`) a GRPO update applies when another
    engine (vLLM) sampled: its mode and bounds (TRL's `vllm_importance_sampling_*`)."""

    mode: str = "sequence_mask"
    clip_min: float | None = None
    clip_max: float | None = 3.0


@dataclass(frozen=True)
class EntropyTerms:
    """The entropy terms of an update (TRL's names: `top_entropy_quantile`, `entropy_coef`): each optimizer step
    keeps in its policy-gradient term only the `top_quantile` fraction of its loss tokens of highest entropy (Wang
    et al. 2025, "Beyond the 80/20 Rule"; 1: all), and subtracts `coef` x the mean entropy of those tokens from its
    loss (an entropy bonus; 0: none)."""

    top_quantile: float = 1.0
    coef: float = 0.0


@dataclass(frozen=True)
class StepEntropy:
    """One optimizer step's entropy terms, fixed before its micro-batches run (`step_entropy`): `selected` (n, T)
    bool, the high-entropy tokens of this rank's rows (None: every loss token), the bonus's `coef`, and `tokens`,
    the bonus's tokens counted over the whole step (every micro-batch and rank)."""

    selected: torch.Tensor | None
    coef: float
    tokens: float


CORRECTION_SUMS = ("sampler_weight/sum", "sampler_weight/count", "sampler_weight/zeros")
"""What `policy_pass` adds up of the correction's weights (first pass); their min and max are kept beside."""

LOSS_FIGURES = {
    "cispo_clip_ratio": ("cispo/capped", "cispo/tokens"),
    "vespo/phi_seq_mean": ("vespo/phi", "vespo/sequences"),
    "off_policy_mask/masked_fraction": ("off_policy/dropped", "off_policy/sequences"),
}
"""The figures of a loss type or switch (TRL's names; the masked fraction is grpokit's): figure -> (the sum, its
count). cispo's is a token mean (weights capped where A > 0), the others means over sequences; logged when the count is
not 0, that is when the loss type or switch ran."""

LOSS_STATS = {"cispo_clipped": "cispo_clip_ratio", "vespo_phi": "vespo/phi_seq_mean",
              "off_policy_dropped": "off_policy_mask/masked_fraction"}  # fmt: skip
"""`algo.per_token_loss`'s stat -> the figure made of it."""

FIGURES = (
    "loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "tokens", "first_pass_tokens",
    *(key for pair in LOSS_FIGURES.values() for key in pair),
    "policy_loss", "entropy/bonus_passes", "entropy/threshold", "entropy/threshold_steps",
)  # fmt: skip
"""What `policy_pass` (and `step_entropy`) add to an update's sums (its counts and sums of token figures)."""


def run_update(
    policy: Policy,
    rollout: Any,
    *,
    mask: torch.Tensor,
    step_mask: torch.Tensor,
    first_row: int,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    loss_type: str,
    surrogate: dict[str, Any],
    beta: float,
    num_iterations: int,
    minibatch_size: int,
    max_completion_length: int,
    shuffle: torch.Generator,
    sums: dict[str, float],
    on_micro_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    on_optimizer_step: Callable[[], None] | None = None,
    correction: SamplerCorrection | None = None,
    entropy: EntropyTerms | None = None,
) -> int:
    """mu = `num_iterations` passes; each splits the step's N rows (`step_mask` (N, T): every rank's loss mask) into
    minibatches of `minibatch_size` (one optimizer step each; reshuffled with `shuffle` after the first pass, or from
    the first when there are several), and this rank's rows of a minibatch (`mask` (n, T), its rows start at
    `first_row` among the N) into the policy's micro-batches (one backward each). Every normalizer is counted over the
    whole minibatch. `on_micro_batch(idx, m, minibatch)` runs after a micro-batch's policy pass (PPO's critic;
    `minibatch`: the whole minibatch's rows among the N, every rank's, whose `step_mask` counts its normalizer), and
    `on_optimizer_step()` after the policy's optimizer step. `correction`: weigh each token by the engine-vs-trainer
    importance weight (`algo.sampler_correction`). `entropy`: the high-entropy token selection and the entropy
    bonus (`step_entropy`). Figures go to `sums`; -> the optimizer steps taken."""
    N, n_here = step_mask.shape[0], rollout.num_sequences
    n_opt_steps, generation_tokens = 0, int(step_mask.sum())
    for iteration in range(num_iterations):
        reshuffle = iteration > 0 or minibatch_size < N
        order = torch.randperm(N, generator=shuffle) if reshuffle else torch.arange(N)
        for mb_idx in order.split(minibatch_size):
            normalizer = algo.step_normalizer(
                loss_type,
                step_mask[mb_idx],
                generation_tokens=generation_tokens,
                generation_sequences=N,
                max_completion_length=max_completion_length,
            )
            here = mb_idx[(mb_idx >= first_row) & (mb_idx < first_row + n_here)] - first_row
            step_terms = step_entropy(policy, rollout, here, mask, step_mask[mb_idx], entropy, sums)
            for idx in policy.micro_batches(rollout, here):
                m = policy_pass(
                    policy, rollout, idx, mask, advantages, old_logp, ref_logp, loss_type=loss_type,
                    surrogate=surrogate, normalizer=normalizer, beta=beta, first_pass=iteration == 0, sums=sums,
                    correction=correction, entropy_terms=step_terms,
                )  # fmt: skip
                if on_micro_batch is not None:
                    on_micro_batch(idx, m, mb_idx)
            sums["grad_norm"] += policy.optimizer_step()
            if on_optimizer_step is not None:
                on_optimizer_step()
            n_opt_steps += 1
    return n_opt_steps


def policy_pass(
    policy: Policy,
    rollout: Any,
    idx: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    *,
    loss_type: str,
    surrogate: dict[str, Any],
    normalizer: float,
    beta: float,
    first_pass: bool,
    sums: dict[str, float],
    correction: SamplerCorrection | None = None,
    entropy_terms: StepEntropy | None = None,
) -> torch.Tensor:
    """Rows `idx`: the policy's forward, the clipped surrogate (`surrogate`: algo.per_token_loss's settings; + beta
    KL), its share of the step loss (`loss_type`'s, `normalizer` counted over the whole optimizer step), the
    backward; its figures added to `sums` (`FIGURES`, and with `old_logp` None, the one on-policy pass, the largest
    trainer-sampler logprob gap). `advantages`: (N,) one per completion or (N, T) one per token; `mask` (N, T) the
    tokens in the loss. `correction`: each token's surrogate weighed by pi_trainer(old) / q_sampler (its figures added
    to `sums` on the first pass). `entropy_terms`: the optimizer step's high-entropy tokens and entropy bonus
    (`step_entropy`). -> the rows' mask (n, w)."""
    bonus = entropy_terms is not None and entropy_terms.coef != 0  # then the entropy is a loss term, with a gradient
    logp, entropy = policy.forward(rollout, idx, with_entropy=first_pass, entropy_grad=bonus)  # (n, w)
    width = logp.shape[1]
    m = mask[idx, :width]  # (n, w)
    old = old_logp[idx, :width] if old_logp is not None else logp.detach()  # (n, w) the sampling policy's, as trained
    weight = None
    if correction is not None:
        weight = algo.sampler_correction(
            old, rollout.sampling_logp[idx, :width], m, mode=correction.mode, clip_min=correction.clip_min,
            clip_max=correction.clip_max,
        )  # fmt: skip
        if first_pass:
            add_correction_figures(sums, algo.correction_values(weight, m, mode=correction.mode))
    token_loss, tok_stats = algo.per_token_loss(
        logp,
        old,
        advantages[idx] if advantages.dim() == 1 else advantages[idx, :width],  # (n,) or (n, w)
        m,
        ref_logp=ref_logp[idx, :width] if ref_logp is not None else None,
        beta=beta,
        sampler_weight=weight,
        loss_type=loss_type,
        sampling_logp=rollout.sampling_logp[idx, :width],
        selected=selected_tokens(entropy_terms, idx, width),
        **surrogate,
    )
    loss = algo.aggregate_loss(token_loss, m, loss_type=loss_type, normalizer=normalizer)
    if bonus:
        loss = with_entropy_bonus(loss, entropy_terms, entropy, m, idx, sums)
    if not math.isfinite(loss_value := loss.item()):
        raise NumericsError(f"the loss is {loss_value}; the optimizer step was not applied")
    policy.backward(loss)
    n_tok = float(m.sum())
    sums["loss"] += loss_value
    sums["clip_ratio/low_mean"] += float((tok_stats["clipped_low"] * m).sum())
    sums["clip_ratio/high_mean"] += float((tok_stats["clipped_high"] * m).sum())
    sums["kl"] += float((tok_stats["kl"] * m).sum())
    sums["tokens"] += n_tok
    add_loss_figures(sums, tok_stats, m)
    if first_pass:
        sums["entropy"] += float((entropy.detach() * m).sum())
        sums["first_pass_tokens"] += n_tok
    if old_logp is None:  # one pass, one optimizer step: logp is still the sampling policy's
        gap = algo.max_logp_gap(logp.detach(), rollout.sampling_logp[idx, :width], m)
        sums["sampler_logp_diff"] = max(sums["sampler_logp_diff"], gap)
    return m


def add_loss_figures(sums: dict[str, float], stats: dict[str, torch.Tensor], m: torch.Tensor) -> None:
    """A micro-batch's figures of its loss type or switch (`LOSS_FIGURES`) into `sums`, from `algo.per_token_loss`'s
    stats (n, w) over the tokens in the loss `m` (n, w): cispo's capped tokens over its tokens; VESPO's weight and the
    off-policy mask's dropped share as a mean over the sequences with a token of each one's mean over its tokens (its
    value, with one advantage per completion)."""
    on = m.to(torch.float64)  # (n, w)
    has_tokens = on.sum(-1) > 0  # (n,)
    for stat, figure in LOSS_STATS.items():
        if stat not in stats:
            continue
        total, count = LOSS_FIGURES[figure]
        if stat == "cispo_clipped":
            value, n = float((stats[stat] * on).sum()), float(on.sum())
        else:
            row_means = (stats[stat] * on).sum(-1) / on.sum(-1).clamp(min=1)  # (n,)
            value, n = float(row_means[has_tokens].sum()), float(has_tokens.sum())
        sums[total] = sums.get(total, 0.0) + value
        sums[count] = sums.get(count, 0.0) + n


def step_entropy(
    policy: Policy,
    rollout: Any,
    rows: torch.Tensor,
    mask: torch.Tensor,
    step_mask: torch.Tensor,
    terms: EntropyTerms | None,
    sums: dict[str, float],
) -> StepEntropy | None:
    """An optimizer step's entropy terms, fixed before its micro-batches: with `terms.top_quantile` < 1, a forward
    without a graph over this rank's `rows` gives their tokens' entropies, the threshold is the quantile of every
    rank's loss-token entropies (`mask` (n, T) this rank's, gathered), so the selection is the one a single batch
    would make whatever the micro-batches and ranks; the bonus's normalizer counts the selected tokens, or with no
    selection the step's loss tokens (`step_mask`: every rank's). The threshold goes to `sums`. No terms: None."""
    if terms is None or (terms.top_quantile >= 1 and terms.coef == 0):
        return None
    if terms.top_quantile >= 1:
        return StepEntropy(None, terms.coef, float(step_mask.sum()))
    entropy = policy.entropies(rollout, rows).to(mask.device)[:, : mask.shape[1]]  # (n, T)
    in_step = torch.zeros_like(mask, dtype=torch.bool)  # (n, T): this step's loss tokens on this rank
    in_step[rows] = mask[rows].bool()
    step_entropies = policy.cluster.gather_uneven(entropy[in_step])  # every rank's loss tokens' entropies
    if not bool(torch.isfinite(step_entropies).all()):  # a NaN would make the threshold NaN and select no token
        raise NumericsError(
            f"top_entropy_quantile: {int((~torch.isfinite(step_entropies)).sum())} of the step's "
            f"{step_entropies.numel()} loss-token entropies are not finite; the optimizer step was not applied"
        )
    threshold = algo.entropy_threshold(step_entropies, terms.top_quantile)
    selected = algo.high_entropy_mask(entropy, in_step, threshold)  # (n, T)
    tokens = policy.cluster.sum({"selected": float(selected.sum())})["selected"]
    if math.isfinite(threshold):  # (a step without loss tokens has none)
        sums["entropy/threshold"] = sums.get("entropy/threshold", 0.0) + threshold
        sums["entropy/threshold_steps"] = sums.get("entropy/threshold_steps", 0.0) + 1.0
    return StepEntropy(selected, terms.coef, tokens)


def selected_tokens(terms: StepEntropy | None, idx: torch.Tensor, width: int) -> torch.Tensor | None:
    """The high-entropy selection (n, w) of rows `idx`, or None when the step keeps every token."""
    if terms is None or terms.selected is None:
        return None
    return terms.selected[idx, :width]


def with_entropy_bonus(
    loss: torch.Tensor,
    terms: StepEntropy,
    entropy: torch.Tensor | None,
    m: torch.Tensor,
    idx: torch.Tensor,
    sums: dict[str, float],
) -> torch.Tensor:
    """`loss` - coef x this micro-batch's share of the step's mean entropy over the bonus's tokens (the selected
    ones, as TRL; `algo.entropy_bonus`); the loss without it goes to `sums` as `policy_loss`."""
    selected = selected_tokens(terms, idx, m.shape[1])
    tokens = m.bool() if selected is None else m.bool() & selected  # (n, w)
    sums["policy_loss"] = sums.get("policy_loss", 0.0) + loss.item()
    sums["entropy/bonus_passes"] = sums.get("entropy/bonus_passes", 0.0) + 1.0
    return loss - terms.coef * algo.entropy_bonus(entropy, tokens, normalizer=terms.tokens)


def add_correction_figures(sums: dict[str, float], values: torch.Tensor) -> None:
    """A micro-batch's correction weights (1-D) into `sums`: their sum, count and zeros, and the running min / max."""
    if values.numel() == 0:
        return
    sums["sampler_weight/sum"] = sums.get("sampler_weight/sum", 0.0) + float(values.sum())
    sums["sampler_weight/count"] = sums.get("sampler_weight/count", 0.0) + float(values.numel())
    sums["sampler_weight/zeros"] = sums.get("sampler_weight/zeros", 0.0) + float((values == 0).sum())
    sums["sampler_weight/min"] = min(sums.get("sampler_weight/min", math.inf), float(values.min()))
    sums["sampler_weight/max"] = max(sums.get("sampler_weight/max", -math.inf), float(values.max()))


def correction_figures(sums: dict[str, float], cluster: Any) -> dict[str, float]:
    """The correction's logged figures over every rank (TRL's names): its weights' min, mean and max, and the share
    set to 0. No correction: none."""
    if "sampler_weight/count" not in sums:
        return {}
    sums = {**sums, **cluster.sum({k: sums[k] for k in CORRECTION_SUMS})}
    extremes = cluster.max({"max": sums["sampler_weight/max"], "negated_min": -sums["sampler_weight/min"]})
    sums["sampler_weight/max"], sums["sampler_weight/min"] = extremes["max"], -extremes["negated_min"]
    count = sums["sampler_weight/count"]
    return {
        "sampling/importance_sampling_ratio/min": sums["sampler_weight/min"],
        "sampling/importance_sampling_ratio/mean": sums["sampler_weight/sum"] / count,
        "sampling/importance_sampling_ratio/max": sums["sampler_weight/max"],
        "sampling/importance_sampling_masked": sums["sampler_weight/zeros"] / count,
    }


def sums_over_ranks(sums: dict[str, float], cluster: Any, rollout: Any, old_logp: torch.Tensor | None,
                    *, summed: tuple[str, ...] = FIGURES) -> None:  # fmt: skip
    """An update's `sums` made the whole step's, in place: the sampler's logprob gap of this rank's rows taken
    (`algo.max_logp_gap`, when there are old-policy logprobs), then the sums and counts `summed` added over the
    ranks and the gap's maximum taken (the gradient norms are of the summed gradients already)."""
    if old_logp is not None:
        sums["sampler_logp_diff"] = algo.max_logp_gap(old_logp, rollout.sampling_logp, rollout.trained_mask)
    sums.update(cluster.sum({k: sums[k] for k in summed}))
    sums.update(cluster.max({"sampler_logp_diff": sums["sampler_logp_diff"]}))


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
    for figure, (total, count) in LOSS_FIGURES.items():
        if sums.get(count, 0.0) > 0:
            stats[figure] = sums[total] / sums[count]
    if with_kl:
        stats["kl"] = sums["kl"] / tokens_seen
    if sums.get("entropy/bonus_passes"):  # an entropy bonus: the loss without it, as TRL logs it
        stats["policy_loss"] = sums["policy_loss"] / n_opt_steps
    if sums.get("entropy/threshold_steps"):  # each rank added each step's (shared) threshold once
        stats["entropy/threshold"] = sums["entropy/threshold"] / sums["entropy/threshold_steps"]
    return stats
