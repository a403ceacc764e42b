"""Rewards: the contract, the built-in rule rewards, and the scoring step that checks every answer.

A reward function is any callable

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

called once per generation batch. `columns` holds every extra column of the data set, one value per
completion (a prompt's row is repeated for each of its G completions), plus `completion_lengths`
(tokens), `truncated`, and `raw_prompts` (the prompt column as the data set holds it: text or chat
messages, for scorers such as reward models that render it with a chat template of their own).
None means "this function does not apply to this sample"; a NaN or an exception is a bug and stops
the run with the function's name and the sample.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.config import ConfigError
from grpokit.data import RESERVED_COLUMNS, check_columns
from grpokit.modeling import resolve_device
from grpokit.reward_model import RewardModelScorer

RewardFn = Callable[..., Sequence[float | None]]
__all__ = ["RESERVED_COLUMNS", "RewardFn", "RewardSet", "build_reward_funcs", "reward_set", "score"]


class RewardError(RuntimeError):
    """A reward function raised, returned the wrong number of values, or returned NaN/inf."""


def gold_reward(is_correct: Callable[[str, str], bool]) -> RewardFn:
    """1 when `is_correct(completion, row's answer column)`, else 0: a verifier as a reward."""

    def accuracy(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(is_correct(c, str(a))) for c, a in zip(completions, answer)]

    return accuracy


def exact_match(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def format_reward(pattern: str) -> RewardFn:
    """1 when the whole stripped completion matches `pattern`, else 0."""
    compiled = re.compile(pattern)

    def format_match(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return format_match


def overlong_reward(max_completion_length: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), on token counts L:
    0 while L <= L_max - buffer, then linear down to -1 at L_max; a truncated completion gets -1."""
    start = max_completion_length - buffer

    def overlong(
        prompts: list[str],
        completions: list[str],
        completion_lengths: list[int],
        truncated: list[bool],
        **_: Any,
    ) -> list[float]:
        return [-1.0 if cut else min(0.0, (start - n) / buffer) for n, cut in zip(completion_lengths, truncated)]

    return overlong


def import_reward(spec: str) -> RewardFn:
    """`package.module:function` -> the function (a custom reward named in a YAML config)."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"reward function {spec!r}: expected a built-in name or `package.module:function`")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {spec!r} could not be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def build_reward_funcs(
    names: Sequence[str],
    *,
    format_pattern: str,
    max_completion_length: int,
    overlong_buffer: int,
    task: Any = None,
    device: str = "cpu",
    reward_model_batch_size: int = 64,
) -> list[tuple[str, RewardFn]]:
    """Resolve config names to (name, callable) pairs. `accuracy` uses the task's gold checker if any; a
    folder holding a config.json is a reward model (`RewardModelScorer`), logged under the folder's name."""
    builtins: dict[str, Callable[[], RewardFn]] = {
        "accuracy": lambda: gold_reward(task.is_correct if task is not None else exact_match),
        "format": lambda: format_reward(format_pattern),
        "overlong": lambda: overlong_reward(max_completion_length, overlong_buffer),
    }
    funcs = []
    for name in names:
        if name in builtins:
            funcs.append((name, builtins[name]()))
        elif Path(name).is_dir() and (Path(name) / "config.json").is_file():
            scorer = RewardModelScorer(name, device=device, batch_size=reward_model_batch_size)
            funcs.append((scorer.__name__, scorer))
        elif "/" in name or Path(name).exists():
            raise ValueError(
                f"reward function {name!r} looks like a path but is not a reward-model folder "
                "(a directory holding config.json, e.g. the `model` folder of `grpokit reward-model`)"
            )
        else:
            funcs.append((name, import_reward(name)))
    return funcs


def score(
    reward_funcs: Sequence[tuple[str, RewardFn]],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
) -> torch.Tensor:
    """Call every reward function once on the batch; returns (N, K) float32 with NaN where one said None.

    Every return value is checked here, so that a broken reward stops the run with the function's
    name and the sample, not later as a NaN loss.
    """
    n = len(completions)
    out = torch.full((n, len(reward_funcs)), float("nan"))  # (N, K)
    for k, (name, fn) in enumerate(reward_funcs):
        try:
            values = list(fn(prompts, completions, **columns))
        except Exception as err:
            raise RewardError(f"reward function `{name}` raised {type(err).__name__}: {err}") from err
        if len(values) != n:
            raise RewardError(f"reward function `{name}` returned {len(values)} values for {n} completions")
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RewardError(
                    f"reward function `{name}` returned {value!r} for sample {i} "
                    f"(prompt {prompts[i]!r}, completion {completions[i]!r}); expected a finite number or None"
                )
            out[i, k] = float(value)
    return out


@dataclass
class RewardSet:
    """The rewards of a GRPO run: what it trains on, with weights, and what it only watches."""

    funcs: list[tuple[str, RewardFn]]
    weights: torch.Tensor  # (K,) float32
    gold: list[tuple[str, RewardFn]]  # watched beside a learned reward, never in the loss


def reward_set(
    cfg: Any, task: Any, train_rows: list[dict[str, Any]], funcs: list[tuple[str, RewardFn]] | None = None
) -> RewardSet:
    """Resolve `cfg.reward_funcs` (or take `funcs`), `reward_weights` and `gold_reward`, and check that the
    rows carry what they need, before any policy model loads."""

    def build(names: Sequence[str]) -> list[tuple[str, RewardFn]]:
        return build_reward_funcs(
            names,
            format_pattern=cfg.format_pattern,
            max_completion_length=cfg.max_completion_length,
            overlong_buffer=cfg.overlong_buffer,
            task=task,
            device=str(resolve_device(cfg.device)),
            reward_model_batch_size=cfg.reward_model_batch_size,
        )

    funcs = funcs or build(cfg.reward_funcs)
    gold = build([cfg.gold_reward]) if cfg.gold_reward else []
    weights = cfg.reward_weights or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(f"config field `reward_weights` has {len(weights)} entries for {len(funcs)} reward functions")
    if "accuracy" in [name for name, _ in funcs + gold]:
        check_columns(train_rows, ["answer"], "train data (the `accuracy` reward needs it)")
    return RewardSet(funcs, torch.tensor(weights, dtype=torch.float32), gold)
