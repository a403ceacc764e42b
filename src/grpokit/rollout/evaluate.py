"""Held-out figures of a model, greedy and sampled, through the run's sampler: accuracy under a gold checker and
the mean of every reward function."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grpokit.data.rows import encode_prompts
from grpokit.rollout.multiturn import episode_figures, rollout_counts
from grpokit.rollout.sampler import EVAL_STEP, Sampler, SamplingParams, call_generate, check_rollout, prompt_seeds
from grpokit.runtime.distributed import Cluster

EPISODE_FIGURES = ("turns/mean", "tools/call_frequency", "tools/failure_frequency")
"""The held-out figures of a multi-turn rollout (`multiturn.episode_figures`), per mode: eval/turns/mean_greedy, ..."""


def sample_batches(
    sampler: Sampler,
    tokenizer: Any,
    prompts: list[Any],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 256,
    max_prompt_length: int = 256,
    chat_template_kwargs: dict[str, Any] | None = None,
    rows: list[dict[str, Any]] | None = None,
    first_place: int = 0,
):
    """One completion per prompt (temperature 0: greedy), `batch_size` prompts at a time (chat prompts rendered
    with `chat_template_kwargs`); yields (start, the batch's EncodedPrompts, its Rollout, its texts decoded without
    special tokens). Prompt i draws from its own seed (`prompt_seeds(seed, EVAL_STEP, [first_place + i])`: its place
    among all the held-out prompts when `prompts` are a rank's share of them), so a sampled evaluation is the same
    at any batch size, engine or rank split and never moves the training streams."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        encoded = encode_prompts(tokenizer, batch, max_prompt_length, chat_template_kwargs)
        places = range(first_place + start, first_place + start + len(encoded.ids))  # by place: any batch size
        seeds = prompt_seeds(seed, EVAL_STEP, list(places))
        batch_rows = None if rows is None else rows[start : start + batch_size]  # (a multi-turn sampler's columns)
        rollout = call_generate(
            sampler, encoded.ids, batch_rows, num_generations=1, params=params, seeds=seeds
        )  # (errors:
        # a SamplerError naming the sampler, as in training)
        check_rollout(rollout, sampler, rows=len(encoded.ids), prompts=encoded.ids)
        yield start, encoded, rollout, decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)


def completions_for(sampler: Sampler, tokenizer: Any, prompts: list[Any], **kwargs: Any) -> list[str]:
    """The texts of `sample_batches` (same arguments), in prompt order."""
    return [text for *_, texts in sample_batches(sampler, tokenizer, prompts, **kwargs) for text in texts]


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """Masked tokens (after EOS) are dropped before decoding; special tokens such as EOS are skipped."""
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids, completion_mask)
    ]


def require_heldout_rows(eval_every: int, rows: list[Any], num_eval_prompts: int | None = None) -> None:
    """Before any work: `eval_every` asks for evaluations that held-out rows make; without rows there would be
    none, and no word of it."""
    from grpokit.core.types import ConfigError

    if eval_every and num_eval_prompts == 0:
        raise ConfigError(
            f"config field `eval_every` is {eval_every}, but num_eval_prompts is 0, so no held-out row is evaluated: "
            "raise num_eval_prompts, or set eval_every: 0"
        )
    if eval_every and not rows:
        raise ConfigError(
            f"config field `eval_every` is {eval_every}, but there are no held-out rows to evaluate on: set "
            "`eval_data` (or pass eval_dataset=; with a `task`, num_eval_prompts > 0), or set eval_every: 0"
        )


@dataclass(frozen=True)
class HeldoutSettings:
    """How `heldout_eval` samples and scores the held-out rows: a GRPO / PPO run's config sets them
    (`GRPOTrainer.evaluate`), `grpokit eval` its own fields."""

    temperature: float
    """Of the sampled pass (the greedy pass draws at 0)."""
    max_new_tokens: int
    seed: int
    """Prompt i of the sampled pass draws from `prompt_seeds(seed, EVAL_STEP, [i])`."""
    prompt_column: str
    max_prompt_length: int
    reward_timeout: float | None
    """Seconds a reward function's call may take (`rewards.score`); None: no limit."""
    chat_template_kwargs: dict[str, Any] | None = None
    """The chat template's variables for chat prompts (a config's `chat_template_kwargs`)."""


def heldout_eval(
    sampler: Sampler,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    settings: HeldoutSettings,
    check: Callable[[str, dict[str, Any]], bool | None] | None = None,
    rewards: Any = None,
    *,
    batch_size: int = 256,
    cluster: Cluster | None = None,
) -> dict[str, float]:
    """Held-out figures of one completion per row, greedy and sampled at `settings.temperature`:
    eval/accuracy_{greedy,sampled} (the share of the rows `check(completion, row)` accepts, of those it does not
    leave out by answering None: a task's gold check, or `rows.answer_check` on an `answer`), and with `rewards` (a
    RewardSet) eval/rewards/NAME/mean_{mode} of every function the rows can feed and eval/reward_{mode}, their
    weighted sum over the rows some function scored, and eval/METRIC_{mode} of each metric they log (`log_metric`:
    the mean of its values; a `log_extra` column is checked and dropped, held-out rows keep no completions). The
    functions get `rewards.state` as `trainer_state`. Through a multi-turn sampler also eval/FIGURE_{mode} of
    `EPISODE_FIGURES` (model turns, tool calls and failed calls per row). {} without rows.

    Under torchrun (`cluster`) each rank samples and scores its contiguous share of the rows (`eval_share`; the
    shares may differ by one row), and the completions, scores and logged values are gathered in row order, so the
    figures are the ones one process computes. Every rank must call it (and under FSDP inside the policy's
    `full_weights`, as the ranks call the sampler unequally often)."""
    prompt_column = settings.prompt_column
    from grpokit.core import algo
    from grpokit.rewards.functions import (
        EPISODE_INPUTS,
        REWARD_INPUTS,
        RewardError,
        RewardLogs,
        accepted_inputs,
        final_turns,
        reward_inputs,
        score,
    )

    if not rows:
        return {}
    funcs, skipped = [], []
    available = [*rows[0], *REWARD_INPUTS, *(EPISODE_INPUTS if getattr(sampler, "takes_rows", False) else ())]
    for k, (name, fn) in enumerate(rewards.funcs if rewards is not None else []):
        try:
            accepted_inputs(name, fn, available)
            funcs.append((k, name, fn))
        except RewardError:
            skipped.append(name)
    if skipped:
        warnings.warn(f"held-out rows lack what {skipped} need: those reward functions are not evaluated", stacklevel=2)
    out: dict[str, float] = {}
    cluster = cluster or Cluster()
    share = eval_share(len(rows), cluster)
    mine = rows[share.start : share.stop]
    for mode, mode_temperature in (("greedy", 0.0), ("sampled", settings.temperature)):
        texts, scores, logged, owners, episodes = [], [], {}, {}, []
        batches = sample_batches(
            sampler,
            tokenizer,
            [r[prompt_column] for r in mine],
            temperature=mode_temperature,
            max_new_tokens=settings.max_new_tokens,
            seed=settings.seed,
            batch_size=batch_size,
            max_prompt_length=settings.max_prompt_length,
            chat_template_kwargs=settings.chat_template_kwargs,
            rows=mine,
            first_place=share.start,
        )
        for start, prompts, rollout, batch_texts in batches:
            texts += batch_texts if rollout.episodes is None else final_turns(rollout.episodes)  # (the answers)
            episodes += rollout.episodes or ()
            if funcs:
                batch = mine[start : start + len(batch_texts)]
                inputs = reward_inputs(batch, prompt_column, 1, prompts.texts, batch_texts, rollout)
                logs = RewardLogs(len(batch_texts))
                called = [(n, f) for _, n, f in funcs]
                scores.append(score(called, inputs, timeout=settings.reward_timeout, state=rewards.state, logs=logs))
                for metric, values in logs.metrics.items():
                    logged.setdefault(metric, []).extend(values)
                    owners.setdefault(metric, logs.owners[metric])
        if cluster.active:  # every rank's, in row order
            texts, scores, episodes = map(cluster.gather_objects, (texts, scores, episodes))
            logged, owners = merged_logs(cluster.gather_objects([(logged, owners)]))
        # rows the check cannot compare (an answer list a reward of the user's reads: None) are left out
        verdicts = [v for v in (check(t, r) for t, r in zip(texts, rows)) if v is not None] if check else []
        if verdicts:
            out[f"eval/accuracy_{mode}"] = sum(map(bool, verdicts)) / len(verdicts)
        if funcs:
            table = torch.cat(scores)  # (n, K') NaN where None
            for column, (_, name, _) in zip(table.T, funcs):
                out[f"eval/rewards/{name}/mean_{mode}"] = column.nanmean().item()
            weights = rewards.weights[[k for k, _, _ in funcs]]
            total, scorable = algo.combine_rewards(table, weights)
            out[f"eval/reward_{mode}"] = total[scorable].mean().item() if bool(scorable.any()) else float("nan")
        if episodes:  # a multi-turn sampler's: how the model used its tools and turns
            figures = episode_figures(rollout_counts(tuple(episodes), 0))
            out.update({f"eval/{key}_{mode}": figures[key] for key in EPISODE_FIGURES})
        for metric, values in logged.items():
            if f"eval/{metric}_{mode}" in out:
                raise RewardError(
                    f"reward function `{owners[metric]}` logged the metric {metric!r} (log_metric), which would "
                    f"be logged as eval/{metric}_{mode}, a name grpokit logs itself: choose another name"
                )
            out[f"eval/{metric}_{mode}"] = sum(values) / len(values)
    return out


def eval_share(n: int, cluster: Cluster) -> range:
    """This rank's contiguous share of n held-out rows: rank r of W takes rows r*n//W .. (r+1)*n//W - 1 (any n: the
    shares differ by at most one row, and a rank may have none)."""
    return range(cluster.rank * n // cluster.world_size, (cluster.rank + 1) * n // cluster.world_size)


def merged_logs(parts: list[tuple[dict[str, list[float]], dict[str, str]]]) -> tuple[dict, dict]:
    """Every rank's logged metric values (metric -> values, in row order) and their owners, as one rank's."""
    logged: dict[str, list[float]] = {}
    owners: dict[str, str] = {}
    for values, names in parts:
        for metric, metric_values in values.items():
            logged.setdefault(metric, []).extend(metric_values)
            owners.setdefault(metric, names[metric])
    return logged, owners
