"""What a GRPO (or PPO) step logs: its rewards, completions, update and times, over every rank, and the completions
written beside them."""

from __future__ import annotations

from typing import Any

from grpokit.core.types import StepBatch
from grpokit.report.monitor import group_diversity
from grpokit.rewards.functions import RewardSet
from grpokit.rollout.multiturn import episode_figures, rollout_counts
from grpokit.runtime.distributed import Cluster


def step_figures(
    batch: StepBatch, stats: dict[str, float], cluster: Cluster, rewards: RewardSet, *, group_size: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The whole step's metrics (on every rank; times of the slowest) with the update's `stats` and the batch's own
    figures (dynamic sampling's), and its samples to log: every prompt's completions in groups of `group_size`,
    every (G // 2)-th kept, with what the reward functions logged (`RewardSet.with_logged`)."""
    rollout, G = batch.rollout, group_size
    lengths = cluster.gather(rollout.trained_mask.sum(-1))  # (N,) the tokens the model wrote and trains on
    truncated = cluster.gather(rollout.truncated.long()).bool()  # (N,)
    completions, seen = cluster.gather_objects(batch.completions), cluster.gather_objects(batch.prompts.seen)
    t0, t_rollout, t_reward, t_ref, t_update = batch.clock
    span = [t_rollout - t0, t_reward - t_rollout, t_ref - t_reward, t_update - t_ref, t_update - t0]
    times = list(cluster.max(dict(enumerate(span))).values())
    metrics = {
        **rewards.step_figures(batch.rewards, batch.total, batch.scorable, batch.gold, group_size=G),
        "diversity": group_diversity(completions, G),
        "completions/mean_length": lengths.float().mean().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
        "completions/clipped_count": float(truncated.sum()),
        **episode_figures(cluster.sum(rollout_counts(rollout.episodes, batch.prompts.cut))),  # (multi-turn too)
        **stats,
        **batch.figures,
        **dict(zip(("time/rollout", "time/reward", "time/reference", "time/update", "time/step"), times)),
        "tokens_per_s": float(lengths.sum()) / times[-1],
    }
    seen_n = [p for p in seen for _ in range(G)]  # the prompt as the model saw it (cut ones cut)
    rows = zip(seen_n, completions, batch.total.tolist(), batch.scorable.tolist(), batch.step_advantages.tolist())
    samples = [{"prompt": p, "completion": c, "reward": r if ok else None, "advantage": a} for p, c, r, ok, a in rows]
    return rewards.with_logged(metrics, samples, every=max(1, G // 2))  # (what the rewards logged added)
