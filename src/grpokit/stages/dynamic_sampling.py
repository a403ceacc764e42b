"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", section 3.2): keep sampling until the step is full of groups
that teach something.

A group whose completions all got the same reward has advantage 0: it adds nothing to the gradient, yet it takes its
place in the step (and in `loss_type: dapo`'s token count), so a step of mostly flat groups is a small, noisy one.
After a step's rollouts are scored, `fill_step` drops the flat groups (`algo.signal_free_groups`: no spread of the
combined reward over the scorable rows, or under normalize_then_sum of any weighted reward; the spread, not the
mean, which for a non-binary reward is what tells a flat group, as OpenRLHF #1270 found) and samples the next
prompts of the seeded order, `prompts_per_step` at a time (a whole generation batch per round, as verl), until
the step holds `prompts_per_step` groups with spread (`algo.kept_groups`: the first ones in sampling order; a
surplus is dropped, as verl keeps exactly the batch).

The cap, `max_dynamic_sampling_rounds` (verl: `algorithm.filter_groups.max_num_gen_batches`). verl raises an error
when it is reached; grpokit trains on what it has: the groups with spread, filled up with the earliest flat groups
(advantage 0), so that the step keeps its shape (each rank's share, the minibatches). They are counted in
`dynamic_sampling/flat_trained`, and the monitor says so once (`SignalMonitor`).

Exactness. The trained batch is the kept groups in sampling order, and its advantages (a batch-level
`scale_rewards` included) and every normalizer (`loss_type: dapo`'s counts the kept batch's tokens) are computed
over it as over any step's: the step equals a normal step on a batch of those groups. Across ranks, every round is
scored whole on every rank (its rewards gathered), so every rank makes the same choice; the kept groups are then
dealt out as a normal step's prompts are (rank r trains the r-th contiguous share), each sent from the rank that
sampled it. Each prompt's draws are seeded by its place in the step (round r's p-th prompt: r x P + p), so the first
round is the step the switch leaves off, and a world size never changes what is drawn.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from grpokit.core import algo
from grpokit.core.types import Generation, Rollout
from grpokit.rewards.functions import RewardSet, join_logged
from grpokit.runtime.distributed import Cluster

ROLLOUT_ROWS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampling_logp", "truncated")


def fill_step(
    first: Generation,
    sample_round: Callable[[int], Generation],
    encode: Callable[[list[Any]], Any],
    rewards: RewardSet,
    cluster: Cluster,
    *,
    group_size: int,
    max_rounds: int,
    scale: str,
    aggregation: str,
    pad_token_id: int,
) -> tuple[Generation, dict[str, float]]:
    """The step's batch from its `first` round: while fewer than its P groups have reward spread and fewer than
    `max_rounds` rounds were sampled, `sample_round(first_place)` samples the next P prompts of the order (seeded from
    their place in the step); then the kept groups (`algo.kept_groups`) as one round of P prompts, this rank's share
    (its data rows re-encoded by `encode`), the whole batch's advantages (`rewards.advantages` under `scale` and
    `aggregation`; `rewards.logged` is set to what the kept rows' reward calls logged). -> (that batch, its figures:
    the cost of the sampling)."""
    P, G = len(first.rows), group_size
    rounds = [first]

    def signal_free(r: Generation) -> torch.Tensor:  # (P,) the round's groups whose advantages are all 0
        return algo.signal_free_groups(r.rewards, rewards.weights, group_size=G, aggregation=aggregation)

    flat = signal_free(first)  # (P,)
    while int((~flat).sum()) < P and len(rounds) < max_rounds:
        more = sample_round(len(rounds) * P)
        rounds.append(more)
        flat = torch.cat([flat, signal_free(more)])  # (R * P,)
    chosen = algo.kept_groups(flat, P)  # (P,) the groups trained, in sampling order
    rows = (chosen[:, None] * G + torch.arange(G, device=chosen.device)).reshape(-1)  # (N,) their rows, all rounds

    def whole(name: str) -> torch.Tensor:  # (N, ...) the kept rows of a whole-round tensor
        return torch.cat([getattr(r, name) for r in rounds])[rows]

    scores = whole("rewards")  # (N, K)
    advantages = rewards.advantages(scores, group_size=G, scale=scale, aggregation=aggregation)  # (N,)
    rewards.logged = join_logged([r.logged for r in rounds], [len(r.total) for r in rounds], rows)
    data, kept = [row for r in rounds for row in r.rows], chosen.tolist()
    mine = cluster.share(P)
    rollout, completions = dealt(rounds, kept, cluster, group_size=G, pad_token_id=pad_token_id)
    scoring = sum(r.clock[2] - r.clock[1] for r in rounds)  # the rounds' scoring, apart from their sampling
    end = time.perf_counter()
    batch = Generation(
        [data[g] for g in kept], encode([data[kept[j]] for j in mine]), rollout, completions, scores,
        whole("total"), whole("scorable"), advantages, whole("gold") if first.gold is not None else None,
        rewards.logged, mine.start * G, [first.clock[0], end - scoring, end],
    )  # fmt: skip
    return batch, cost_figures(rounds, flat, chosen)


def cost_figures(rounds: list[Generation], flat: torch.Tensor, chosen: torch.Tensor) -> dict[str, float]:
    """What dynamic sampling cost a step: its generation `rounds`, the prompts sampled per group with spread
    trained (NaN, logged as null, when none was), the flat groups dropped, the groups with spread dropped as a
    surplus, the flat groups trained because the cap was reached, and the mean reward of every scored completion
    sampled (the trained batch's `reward` leaves out the flat groups, e.g. those all right)."""
    P = len(chosen)
    spread_kept = int((~flat[chosen]).sum())
    total = torch.cat([r.total for r in rounds])  # (R * N,)
    scored = total[torch.cat([r.scorable for r in rounds])]
    return {
        "dynamic_sampling/rounds": float(len(rounds)),
        "dynamic_sampling/prompts_sampled_per_kept": len(flat) / spread_kept if spread_kept else float("nan"),
        "dynamic_sampling/groups_dropped": float(int(flat.sum()) - (P - spread_kept)),
        "dynamic_sampling/surplus_dropped": float(int((~flat).sum()) - spread_kept),
        "dynamic_sampling/flat_trained": float(P - spread_kept),
        "dynamic_sampling/reward_sampled": scored.mean().item() if len(scored) else float("nan"),
    }


def dealt(
    rounds: list[Generation], chosen: list[int], cluster: Cluster, *, group_size: int, pad_token_id: int
) -> tuple[Rollout, list[str]]:
    """This rank's share of the kept groups `chosen` (indices over every round's P prompts): their rollout rows end
    to end (`join_rollouts`) and completions. A group sampled on another rank comes from it (one `gather_objects`,
    every rank sending the kept groups it sampled for another rank, on the CPU, an episode without its
    environment, which only the rollout and the rewards use)."""
    P, G = len(chosen), group_size
    per_rank, mine = P // cluster.world_size, cluster.share(P)
    held, sent = {}, []  # kept place -> (rollout rows, completions) sampled here; what goes to other ranks
    for j, g in enumerate(chosen):
        r, p = divmod(g, P)
        if p // per_rank != cluster.rank:
            continue
        at = slice((p % per_rank) * G, (p % per_rank + 1) * G)  # its rows in this rank's share of round r
        piece = (rollout_rows(rounds[r].rollout, at), rounds[r].completions[at])
        if j in mine:
            held[j] = piece
        else:
            sent.append((j, (portable(piece[0]), piece[1])))
    if cluster.active:
        device = rounds[0].rollout.completion_ids.device
        for j, (rollout, completions) in cluster.gather_objects(sent):
            if j in mine:
                held[j] = (moved(rollout, device), completions)
    parts = [held[j] for j in mine]
    return join_rollouts([rollout for rollout, _ in parts], pad_token_id), [c for _, texts in parts for c in texts]


def rollout_rows(rollout: Rollout, rows: slice) -> Rollout:
    """The rows `rows` of a rollout, as a rollout."""
    cut = {name: getattr(rollout, name)[rows] for name in ROLLOUT_ROWS}
    loss_mask = rollout.loss_mask[rows] if rollout.loss_mask is not None else None
    episodes = rollout.episodes[rows] if rollout.episodes is not None else None
    return dataclasses.replace(rollout, **cut, loss_mask=loss_mask, episodes=episodes)


def portable(rollout: Rollout) -> Rollout:
    """A rollout that another process can unpickle: tensors on the CPU (a CUDA tensor would land on the sender's
    device index), episodes without their environments (a sandbox or a connection does not travel)."""
    moved_tensors = moved(rollout, torch.device("cpu"))
    if rollout.episodes is None:
        return moved_tensors
    episodes = tuple(dataclasses.replace(e, environment=None) for e in rollout.episodes)
    return dataclasses.replace(moved_tensors, episodes=episodes)


def moved(rollout: Rollout, device: torch.device) -> Rollout:
    tensors = {name: getattr(rollout, name).to(device) for name in ROLLOUT_ROWS}
    loss_mask = rollout.loss_mask.to(device) if rollout.loss_mask is not None else None
    return dataclasses.replace(rollout, **tensors, loss_mask=loss_mask)


def join_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rollouts of one sampler end to end, as one: prompts left-padded and completions right-padded to the widest
    (`pad_token_id` under mask 0, logprobs 0), then cut to the columns some row's mask holds."""
    if not parts:
        raise ValueError("no rollout to join")
    loss_masks = [p.loss_mask for p in parts if p.loss_mask is not None]
    with_episodes = [p.episodes is not None for p in parts]
    if any(with_episodes) and not all(with_episodes):
        raise ValueError("rollouts with and without episodes cannot be joined")

    def padded(name: str, value: Any, left: bool) -> torch.Tensor:  # (n, width)
        tensors = [getattr(p, name) for p in parts]
        if name == "loss_mask":  # a rollout without one trains every real completion token
            tensors = [p.trained_mask.to(loss_masks[0].dtype) for p in parts]
        width = max(t.shape[1] for t in tensors)
        out = []
        for t in tensors:
            fill = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
            out.append(torch.cat([fill, t] if left else [t, fill], dim=1))
        return torch.cat(out)

    prompt_mask = padded("prompt_mask", 0, left=True)  # (n, Tp)
    completion_mask = padded("completion_mask", 0, left=False)  # (n, Tc)
    start = int(prompt_mask.bool().any(0).nonzero().min()) if prompt_mask.numel() else 0
    stop = int(completion_mask.bool().any(0).nonzero().max()) + 1 if completion_mask.any() else 0
    return Rollout(
        prompt_ids=padded("prompt_ids", pad_token_id, left=True)[:, start:],
        prompt_mask=prompt_mask[:, start:],
        completion_ids=padded("completion_ids", pad_token_id, left=False)[:, :stop],
        completion_mask=completion_mask[:, :stop],
        sampling_logp=padded("sampling_logp", 0.0, left=False)[:, :stop],
        truncated=torch.cat([p.truncated for p in parts]),
        group_size=parts[0].group_size,
        loss_mask=padded("loss_mask", 0, left=False)[:, :stop] if loss_masks else None,
        episodes=tuple(e for p in parts for e in p.episodes) if all(with_episodes) else None,
    )
