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
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit import algo
from grpokit.config import ConfigError
from grpokit.data import RESERVED_COLUMNS, check_columns
from grpokit.modeling import check_model_source, resolve_device
from grpokit.reward_model import RewardModelScorer

RewardFn = Callable[..., Sequence[float | None]]
__all__ = [
    "RESERVED_COLUMNS",
    "RewardFn",
    "RewardSet",
    "build_reward_funcs",
    "check_advantages",
    "reward_set",
    "score",
]


class RewardError(RuntimeError):
    """A reward function raised, timed out, returned the wrong number of values or a value training cannot use."""


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
    if os.getcwd() not in sys.path and "" not in sys.path:
        # `python -m` puts the working folder on the path and the `grpokit` script does not: a reward module
        # next to the config imports either way (appended: it never shadows an installed package)
        sys.path.append(os.getcwd())
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
            check_model_source(name, field="reward_funcs")
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


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Below this largest |advantage| a step's gradient is lost under AdamW's epsilon (1e-8): no learning, by scale.
VANISHING_ADVANTAGE = 1e-8


class _Timeout(BaseException):
    """Raised inside a reward call that ran past `reward_timeout` (a BaseException, so `except Exception` in the
    reward function cannot swallow it)."""


def call_with_timeout(name: str, fn: RewardFn, timeout: float | None, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in this thread, stopped with a RewardError naming `name` after `timeout` seconds.

    The call stays in the calling thread, so a reward that uses signals itself (math verifiers set SIGALRM
    timeouts) keeps working; a watchdog thread sends SIGUSR1 to interrupt it when the time is up. Where
    signals cannot reach the caller (not the main thread, or no pthread_kill), the call runs in a worker
    thread and is abandoned when late. A call stuck inside native code is interrupted when it returns to Python.
    """
    if not timeout:
        return fn(*args, **kwargs)
    late = RewardError(
        f"reward function `{name}` did not return within reward_timeout = {timeout:g} s "
        "(raise reward_timeout if it is only slow)"
    )
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return _call_in_worker(fn, timeout, late, args, kwargs)
    expired = threading.Event()
    main = threading.get_ident()

    def on_time_up() -> None:
        expired.set()
        print(f"grpokit: {late}; stopping it", file=sys.stderr, flush=True)
        signal.pthread_kill(main, signal.SIGUSR1)

    def on_signal(signum: int, frame: Any) -> None:
        if expired.is_set():
            raise _Timeout
        if callable(previous):  # a SIGUSR1 that is not ours (a job scheduler's) goes where it went before
            previous(signum, frame)

    previous = signal.signal(signal.SIGUSR1, on_signal)
    timer = threading.Timer(timeout, on_time_up)
    timer.daemon = True
    timer.start()
    try:
        return fn(*args, **kwargs)
    except _Timeout:
        raise late from None
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)


def _call_in_worker(fn: RewardFn, timeout: float, late: RewardError, args: tuple, kwargs: dict) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)  # a late one is abandoned, and never blocks exit
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise late
    if "error" in box:
        raise box["error"]
    return box["value"]


def score(
    reward_funcs: Sequence[tuple[str, RewardFn]],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    *,
    timeout: float | None = None,
) -> torch.Tensor:
    """Call every reward function once on the batch; returns (N, K) float64 with NaN where one said None.

    Every return value is checked here, so that a broken reward stops the run with the function's
    name and the sample, not later as a NaN loss: one finite number (or None) per completion, within
    float32's range (training computes in float32). A call may take `timeout` seconds (None: no limit).
    """
    n = len(completions)
    out = torch.full((n, len(reward_funcs)), float("nan"), dtype=torch.float64)  # (N, K)
    for k, (name, fn) in enumerate(reward_funcs):
        try:
            values = call_with_timeout(name, fn, timeout, prompts, completions, **columns)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward function `{name}` raised {type(err).__name__}: {err}") from err
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
            raise RewardError(f"reward function `{name}` returned {type(values).__name__}; expected a list of floats")
        values = list(values)
        if len(values) != n:
            raise RewardError(f"reward function `{name}` returned {len(values)} values for {n} completions")
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real) or not math.isfinite(value):  # a bool counts as 0 or 1
                raise RewardError(
                    f"reward function `{name}` returned {value!r} for sample {i} "
                    f"(prompt {prompts[i]!r:.200}, completion {completions[i]!r:.200}); expected a finite number "
                    "or None"
                )
            if abs(value) > FLOAT32_MAX:
                raise RewardError(
                    f"reward function `{name}` returned {value!r} for sample {i}: beyond float32's range "
                    f"(+-{FLOAT32_MAX:.3g}), which training computes in; rescale the reward"
                )
            out[i, k] = float(value)
    return out


def check_advantages(
    advantages: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor, names: list[str], *, group_size: int
) -> None:
    """A reward scale that float32 cannot train on is an error, not a zero or an infinite gradient.

    advantages (N,) float32 as the loss will use them; rewards (N, K) float64 as the functions returned them
    (NaN = None). Overflow: a non-finite advantage. Vanishing: the rewards differ inside some group (in float64),
    yet every advantage is below VANISHING_ADVANTAGE.
    """
    scale = ", ".join(
        f"`{name}` up to {column.nan_to_num(0.0).abs().max().item():.3g}" for name, column in zip(names, rewards.T)
    )
    if not bool(torch.isfinite(advantages).all()):
        raise RewardError(
            f"the advantages overflow float32 (rewards: {scale}); rescale the reward functions or use "
            "scale_rewards: group"
        )
    total, scorable = algo.combine_rewards(rewards, weights.to(rewards))  # (N,), (N,)
    columns = [(column.nan_to_num(0.0), ~column.isnan()) for column in rewards.T]
    spread = any(
        not bool(algo.flat_groups(r, s, group_size=group_size).all()) for r, s in [(total, scorable), *columns]
    )
    largest = float(advantages.abs().max()) if advantages.numel() else 0.0
    if spread and largest < VANISHING_ADVANTAGE:
        raise RewardError(
            f"every advantage of this step is below {VANISHING_ADVANTAGE:g} (largest {largest:.3g}) although the "
            f"rewards differ inside a group (rewards: {scale}): float32 cannot resolve their differences at this "
            "scale; rescale or re-centre the reward functions"
        )


@dataclass
class RewardSet:
    """The rewards of a GRPO run: what it trains on, with weights, and what it only watches."""

    funcs: list[tuple[str, RewardFn]]
    weights: torch.Tensor  # (K,) float32
    gold: list[tuple[str, RewardFn]]  # watched beside a learned reward, never in the loss

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.funcs]

    def score_step(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]], cfg: Any):
        """One generation batch scored and turned into advantages (`score`, `check_advantages`), under the
        config's `num_generations`, `scale_rewards`, `reward_aggregation` and `reward_timeout`.
        -> (rewards (N, K) float32, NaN for None; total (N,); scorable (N,); advantages (N,); gold (N, 1) | None)."""
        G = cfg.num_generations
        scores = score(self.funcs, prompts, completions, columns, timeout=cfg.reward_timeout)  # (N, K) float64
        rewards = scores.float()  # (N, K)
        total, scorable = algo.combine_rewards(rewards, self.weights)  # (N,), (N,)
        advantages = algo.multi_reward_advantages(
            rewards, self.weights, group_size=G, scale=cfg.scale_rewards, aggregation=cfg.reward_aggregation
        )  # (N,)
        check_advantages(advantages, scores, self.weights, self.names, group_size=G)
        gold = (
            score(self.gold, prompts, completions, columns, timeout=cfg.reward_timeout).float() if self.gold else None
        )
        return rewards, total, scorable, advantages, gold


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
