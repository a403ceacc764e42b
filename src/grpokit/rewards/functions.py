"""Rewards: the contract, the built-in rule rewards, and the scoring step that checks every answer.

A reward function is called once per generation batch BY KEYWORD, as TRL calls one:

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=...,
       **columns) -> list[float | None]

`prompts` are the data set's prompts as it holds them (text, or chat messages), one per completion (a
prompt's row is repeated for each of its G completions); `completions` are text, or for chat prompts
TRL's conversational form [{"role": "assistant", "content": text}]; `completion_ids` the sampled token
ids. `columns` holds every other column of the data set, plus grpokit's extras `completion_lengths`
(tokens), `truncated` (no EOS within max_completion_length), `raw_prompts` (= `prompts`, as before) and
`rendered_prompts` (the prompt as text, chat template applied, before any cut to `max_prompt_length`). TRL's three
objects come too:
`trainer_state` (the run's transformers.TrainerState: global_step, epoch, max_steps, as TRL counts them),
`log_metric(name, value)` and `log_extra(column, values)` (`RewardLogs`). A function without **kwargs
gets only the names it declares; one that needs a name nobody provides is an error before the run.
None means "this function does not apply to this sample"; a NaN or an exception is a bug and stops
the run with the function's name and the sample. An `async def` function (or one that returns an
awaitable) is awaited: the async functions of a batch run concurrently in one event loop (`await_rewards`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import importlib
import inspect
import math
import numbers
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grpokit.core import algo
from grpokit.core.types import ArgumentError, ConfigError, kind_of
from grpokit.data.rows import (
    RESERVED_COLUMNS,
    DataError,
    check_answers,
    check_columns,
    check_eval_answers,
    completion_text,
)
from grpokit.data.tasks.reasoning_gym_task import ReasoningGymTask
from grpokit.model.loading import check_model_source
from grpokit.rewards import BUILTIN_REWARDS
from grpokit.rewards.code import code_tests_reward
from grpokit.rewards.mathverify import math_accuracy_reward
from grpokit.rewards.scorer import RewardModelScorer

if TYPE_CHECKING:
    from grpokit.runtime.distributed import Cluster

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


# What grpokit passes to every reward function besides the data set's own columns (which may not shadow them).
REWARD_INPUTS = RESERVED_COLUMNS
# Of those, the objects TRL passes beside the data (`score` adds them to each call, never copied)
CONTRACT_INPUTS = ("trainer_state", "log_metric", "log_extra")
# What a multi-turn rollout (an environment per row) adds: the rows' environment instances (passed as they are, not
# copied: a reward reads their state; for tools on a factory's instance, that instance, as TRL passes it), model
# turns, tool calls ({"name", "arguments", "result" | "error"}), the environment's step rewards, and each row's final
# turn (the model's last: where its answer is)
EPISODE_INPUTS = ("environments", "num_turns", "tool_calls", "step_rewards", "final_turns")
# The columns of a logged completion (`GRPOTrainer.figures`): a `log_extra` column may not replace one
SAMPLE_COLUMNS = frozenset({"step", "prompt", "completion", "reward", "advantage"})
# Metric prefixes grpokit's own figures use outside a step's reward figures (held-out rows, monitors)
RESERVED_METRIC_PREFIXES = ("eval/", "monitor/")


@dataclass
class LoggedValues:
    """What a step's reward functions logged, reduced over the ranks (`RewardLogs.reduce`)."""

    metrics: dict[str, float] = field(default_factory=dict)  # name -> mean of every call's value, every rank's
    extras: dict[str, list[Any]] = field(default_factory=dict)  # column -> one value per completion (N), rank order
    owners: dict[str, str] = field(default_factory=dict)  # metric or column -> the function that logged it first


class RewardLogs:
    """TRL's `log_metric(name, value)` and `log_extra(column, values)` for one batch of reward calls.

    As in TRL 1.16: a metric's value for the step is the mean of every value logged under its name during the
    step, over every rank's calls (sum and count reduced, so each call weighs the same); an extra column holds one
    value per completion of the batch, beside the logged completions (completions.jsonl), a rank that did not log
    it filling its rows with None. Unlike TRL, which averages a metric of the same name as its own into its own
    figure, a name grpokit logs itself is refused (`RewardSet.with_logged`; the `eval/` and `monitor/` prefixes
    here); a column is one list per step, so a second `log_extra` of a column, a wrong count or a value JSON cannot
    hold is refused, naming the function.
    """

    def __init__(self, num_completions: int):
        self.n = num_completions
        self.metrics: dict[str, list[float]] = {}
        self.extras: dict[str, list[Any]] = {}
        self.owners: dict[str, str] = {}

    def callables(self, name: str) -> dict[str, Callable[..., None]]:
        """`log_metric` and `log_extra` for the reward function `name` (named by their errors)."""

        def log_metric(metric: str, value: float) -> None:
            if not isinstance(metric, str) or not metric:
                raise RewardError(f"reward function `{name}` called log_metric({metric!r}, ...): a name is text")
            if metric.startswith(RESERVED_METRIC_PREFIXES):
                raise RewardError(
                    f"reward function `{name}` logged the metric {metric!r}: grpokit's own figures use the prefixes "
                    f"{', '.join(RESERVED_METRIC_PREFIXES)}; choose another name"
                )
            number = _one_number(value)
            if not isinstance(number, numbers.Real):
                raise RewardError(
                    f"reward function `{name}` logged {value!r:.60} as the metric {metric!r}; expected one number"
                )
            self.metrics.setdefault(metric, []).append(float(number))
            self.owners.setdefault(metric, name)

        def log_extra(column: str, values: Sequence[Any]) -> None:
            if not isinstance(column, str) or not column or column in SAMPLE_COLUMNS:
                raise RewardError(
                    f"reward function `{name}` called log_extra({column!r}, ...): a column is text other than the "
                    f"logged completion's own ({', '.join(sorted(SAMPLE_COLUMNS))})"
                )
            if column in self.extras:
                raise RewardError(
                    f"reward function `{name}` logged the column {column!r}, which `{self.owners[column]}` logged "
                    "already this step: one list per column and step"
                )
            if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
                raise RewardError(
                    f"reward function `{name}` logged {type(values).__name__} as the column {column!r}; expected a "
                    f"list of {self.n} values, one per completion"
                )
            values = list(values)
            if len(values) != self.n:
                raise RewardError(
                    f"reward function `{name}` logged {len(values)} values in the column {column!r} for {self.n} "
                    "completions"
                )
            self.extras[column] = [_json_value(v, name, column, i) for i, v in enumerate(values)]
            self.owners.setdefault(column, name)

        return {"log_metric": log_metric, "log_extra": log_extra}

    def reduce(self, gather_objects: Callable[[list[Any]], list[Any]] | None = None) -> LoggedValues:
        """The step's values over every rank (`gather_objects`: `Cluster.gather_objects`, one collective; None: this
        process alone): each metric's sum over count, each column's rows in rank order."""
        mine = (self.n, {k: (sum(v), len(v)) for k, v in self.metrics.items()}, self.extras, self.owners)
        parts = gather_objects([mine]) if gather_objects is not None else [mine]
        out = LoggedValues()
        for metric in sorted({k for _, sums, _, _ in parts for k in sums}):
            total = sum(sums[metric][0] for _, sums, _, _ in parts if metric in sums)
            count = sum(sums[metric][1] for _, sums, _, _ in parts if metric in sums)
            out.metrics[metric] = total / count
        for column in sorted({k for _, _, extras, _ in parts for k in extras}):
            out.extras[column] = [v for n, _, extras, _ in parts for v in extras.get(column, [None] * n)]
        for _, _, _, owners in parts:
            for key, owner in owners.items():
                out.owners.setdefault(key, owner)
        return out


def join_logged(parts: list[LoggedValues], sizes: list[int], rows: torch.Tensor) -> LoggedValues:
    """What several batches' reward calls logged (`parts`, of `sizes` completions each) as one batch's: each metric
    the mean of the batches' values (batches of one size: each call weighs the same), each column its values at
    `rows` (N,) of the batches' completions end to end (None where a batch did not log it)."""
    out = LoggedValues()
    for metric in sorted({k for part in parts for k in part.metrics}):
        values = [part.metrics[metric] for part in parts if metric in part.metrics]
        out.metrics[metric] = sum(values) / len(values)
    for column in sorted({k for part in parts for k in part.extras}):
        values = [v for part, n in zip(parts, sizes) for v in part.extras.get(column, [None] * n)]
        out.extras[column] = [values[i] for i in rows.tolist()]
    for part in parts:
        for key, owner in part.owners.items():
            out.owners.setdefault(key, owner)
    return out


def _one_number(value: Any) -> Any:
    """A one-element tensor or array (a reward's own arithmetic) as its number; anything else as it is."""
    size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", None)
    if size == 1 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def _json_value(value: Any, name: str, column: str, row: int) -> Any:
    """A `log_extra` value as completions.jsonl holds it: numbers, text, None, lists and dicts of them (NaN and inf
    are None, as in the metrics); a numpy or torch scalar is its number. Anything else is refused, naming it."""
    value = _one_number(value)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_json_value(v, name, column, row) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, name, column, row) for k, v in value.items()}
    raise RewardError(
        f"reward function `{name}` logged {type(value).__name__} {value!r:.60} in the column {column!r} (sample "
        f"{row}): completions.jsonl holds numbers, text, None, and lists or dicts of them"
    )


def reward_inputs(
    rows: list[dict[str, Any]],
    prompt_column: str,
    group_size: int,
    rendered: list[str],
    completions: list[str],
    rollout,
) -> dict[str, list[Any]]:
    """The keyword arguments of one batch's reward calls: rows (P) repeated G times to line up with the N
    completions, chat completions in TRL's conversational form."""
    G = group_size
    prompts = [row[prompt_column] for row in rows for _ in range(G)]
    lengths = rollout.completion_mask.sum(-1).tolist()  # (N,)
    columns = {key: [row[key] for row in rows for _ in range(G)] for key in rows[0] if key != prompt_column}
    episodes = getattr(rollout, "episodes", None)
    if episodes is not None:  # the whole transcript: the model's turns and what was inserted between them
        columns.update(episode_inputs(episodes))
    return {
        **columns,
        "prompts": prompts,
        "completions": [
            c if isinstance(p, str) else conversation(c, None if episodes is None else episodes[i])
            for i, (p, c) in enumerate(zip(prompts, completions))
        ],
        "completion_ids": [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), lengths)],
        "completion_lengths": lengths,
        "truncated": rollout.truncated.tolist(),
        "raw_prompts": prompts,
        "rendered_prompts": [p for p in rendered for _ in range(G)],
    }


def episode_inputs(episodes: Sequence[Any]) -> dict[str, list[Any]]:
    """The keywords a multi-turn rollout's rewards get beside the columns (`EPISODE_INPUTS`), one per row."""
    return {
        "environments": [getattr(e.environment, "user_environment", e.environment) for e in episodes],
        "num_turns": [e.num_turns for e in episodes],
        "tool_calls": [list(e.tool_calls or []) for e in episodes],
        "step_rewards": [list(e.step_rewards or []) for e in episodes],
        "final_turns": final_turns(episodes),
    }


def final_turns(episodes: Sequence[Any]) -> list[str]:
    """Each row's last model turn: its answer, which a gold check compares (the transcript before it holds tool
    calls and their outputs, which no answer column equals)."""
    return [next((text for kind, text in reversed(e.pieces) if kind == "model"), "") for e in episodes]


def conversation(completion: str, episode: Any) -> list[dict[str, str]]:
    """A chat prompt's completion in TRL's message form: one assistant message, or for a multi-turn row its
    turns in order, the model's as assistant messages and what was inserted between them as tool messages (with
    tool_format chat, as TRL gives them: each call in its assistant message's `tool_calls`, the inserted messages
    under their own roles, with the contents the model was shown)."""
    if episode is None:
        return [{"role": "assistant", "content": completion}]
    messages = getattr(episode, "messages", None)  # (tool_format chat: the sampler's)
    if messages is not None:
        return list(messages)
    return [{"role": "assistant" if kind == "model" else "tool", "content": text} for kind, text in episode.pieces]


def accepted_inputs(name: str, fn: RewardFn, available: Sequence[str]) -> set[str] | None:
    """The keyword names `fn` takes (None: all, it has **kwargs). Raises a RewardError, before any work, when it
    takes a positional-only argument or requires a name that is not `available`."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it with everything
        return None
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    missing = [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in available
    ]
    if positional_only:
        raise RewardError(
            f"reward function `{name}` takes {positional_only[0]!r} as a positional-only parameter (before `/`): "
            "reward functions are called by keyword, as TRL calls them; drop the `/`, e.g. "
            f"def {name}({positional_only[0]}, **kwargs)"
        )
    if missing:
        raise RewardError(
            f"reward function `{name}` takes {missing[0]!r}, which grpokit does not pass: "
            f"reward functions are called by keyword, as TRL calls them, with {', '.join(REWARD_INPUTS)} and the "
            f"data columns ({', '.join(sorted(set(available) - set(REWARD_INPUTS))) or 'none'}); "
            f"e.g. def {name}(completions, **kwargs)"
        )
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def named_parameters(fn: RewardFn) -> set[str]:
    """The argument names `fn`'s signature spells out (its **kwargs aside); none when it has no signature."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def gold_reward(is_correct: Callable[[str, str], bool]) -> RewardFn:
    """1 when `is_correct(completion, row's answer column)`, else 0: a verifier as a reward."""

    def accuracy(completions: list[Any], answer: list[str], final_turns: list[str] | None = None, **_: Any) -> (
        list[float]
    ):  # fmt: skip
        """(A multi-turn row is checked on its final turn, `final_turns`.)"""
        texts = final_turns if final_turns is not None else [completion_text(c) for c in completions]
        return [float(is_correct(text, str(a))) for text, a in zip(texts, answer)]

    return accuracy


def exact_match(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def task_accuracy(task: Any) -> RewardFn:
    """The `accuracy` reward of a run's task: a reasoning-gym task's own scorer (a score in [0, 1], the answer read
    from `<answer>` tags), a built-in task's gold checker (1 or 0), or without a task exact match on `answer`."""
    if task is None:
        return gold_reward(exact_match)
    if isinstance(task, ReasoningGymTask):
        return task.reward()
    return gold_reward(task.is_correct)


# The common tag layouts of a reasoning completion, each a built-in reward of its name: 1 when the whole completion
# (stripped) has the layout, else 0. One block of each tag, nothing outside them but whitespace, as the format
# rewards of DeepSeek-R1 (Guo et al. 2025, section 2.2.2) and open-r1 ask for; a block holds no tag of its own pair.
TAG_LAYOUTS = {
    "format_think_answer": r"<think>((?!</?think>).)*</think>\s*<answer>((?!</?answer>).)*</answer>",
    "format_answer_tags": r"<answer>((?!</?answer>).)*</answer>",
}


def tag_layout_reward(name: str) -> RewardFn:
    """The reward `name` of `TAG_LAYOUTS`: 1.0 when the whole stripped completion has that layout, else 0.0."""
    compiled = re.compile(TAG_LAYOUTS[name], re.DOTALL)

    def layout(completions: list[Any], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    layout.__name__ = layout.__qualname__ = name
    return layout


def format_reward(pattern: str) -> RewardFn:
    """1 when the whole stripped completion matches `pattern`, else 0."""
    compiled = re.compile(pattern)

    def format_match(completions: list[Any], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return format_match


def overlong_reward(max_completion_length: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), on token counts L:
    0 while L <= L_max - buffer, then linear down to -1 at L_max; a truncated completion gets -1."""
    start = max_completion_length - buffer

    def overlong(completion_lengths: list[int], truncated: list[bool], **_: Any) -> list[float]:
        return [-1.0 if cut else min(0.0, (start - n) / buffer) for n, cut in zip(completion_lengths, truncated)]

    return overlong


def import_reward(spec: str, kind: str = "reward function") -> RewardFn:
    """`package.module:function` -> the function (a custom reward named in a YAML config; `kind` says what else it
    is in the errors: a tool, an environment)."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"{kind} {spec!r}: expected a built-in name or `package.module:function`")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # `python -m` puts the working folder on the path and the `grpokit` script does not: a reward module
        # next to the config imports either way (appended: it never shadows an installed package)
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as err:
        raise ValueError(f"{kind} {spec!r} could not be imported: {err.msg} at {err.filename}:{err.lineno}") from None
    except Exception as err:  # ImportError, or whatever the module raises while it imports
        raise ValueError(f"{kind} {spec!r} could not be imported: {type(err).__name__}: {err}") from err
    if not hasattr(module, attr):
        raise ValueError(
            f"{kind} {spec!r} could not be imported: the module {module_name!r} that Python imported, "
            f"{getattr(module, '__file__', None) or '(built in)'}, has no attribute {attr!r}{_shadowing(module)}"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"{kind} {spec!r} is not callable")
    return fn


def _shadowing(module: Any) -> str:
    """Why a module of the user's may not be the one imported: its name is also a standard library module's
    (`calendar.py` beside the config imports Python's own calendar; on PYTHONPATH it replaces it for everyone)."""
    import sysconfig

    top = module.__name__.split(".")[0]
    if top not in sys.stdlib_module_names:
        return ""
    file = getattr(module, "__file__", None)
    stdlib = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")}
    if file is None or any(os.path.realpath(file).startswith(folder + os.sep) for folder in stdlib):
        return (
            f": that is the standard library's {top!r}, which shadows a module of yours of the same name; rename "
            f"your {top}.py (e.g. my_{top}.py) and name it in reward_funcs"
        )
    return (
        f": this file shadows the standard library module {top!r} (everything that imports {top!r} gets it); "
        f"rename it (e.g. my_{top}.py)"
    )


def build_reward_funcs(
    names: Sequence[str],
    *,
    format_pattern: str,
    max_completion_length: int,
    overlong_buffer: int,
    task: Any = None,
    device: str = "cpu",
    reward_model_batch_size: int = 64,
    field: str = "reward_funcs",
) -> list[tuple[str, RewardFn]]:
    """Resolve config names to (name, callable) pairs. `accuracy` uses the task's gold checker if any; a
    folder holding a config.json is a reward model (`RewardModelScorer`), logged under the folder's name.
    `field`: the config field that gave the names (`reward_funcs`, `gold_reward`), named by a folder's errors."""
    builtins: dict[str, Callable[[], RewardFn]] = {
        "accuracy": lambda: task_accuracy(task),
        "format": lambda: format_reward(format_pattern),
        "overlong": lambda: overlong_reward(max_completion_length, overlong_buffer),
        "code_tests": code_tests_reward,  # the sandbox's default limits; for others call code_tests_reward(...)
        "math_accuracy": math_accuracy_reward,  # math-verify's default timeouts; for others call it with them
        **{name: functools.partial(tag_layout_reward, name) for name in TAG_LAYOUTS},
    }
    funcs = []
    for name in names:
        if name in builtins:
            funcs.append((name, builtins[name]()))
        elif Path(name).is_dir() and (Path(name) / "config.json").is_file():
            check_model_source(name, field=field, kind="reward_model")
            scorer = RewardModelScorer(name, device=device, batch_size=reward_model_batch_size, field=field)
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


class RewardWarning(UserWarning):
    """A reward function did something to the process that grpokit undid (it changed the working directory or the
    file-creation mask)."""


def _restore_cwd(cwd: str, name: str, warned: set[str]) -> None:
    """Back to `cwd` after a reward call that left another working directory: the run's relative paths (its
    output_dir, data, model folders) keep meaning what the user wrote. Warned once per function of `warned` (the
    names already warned about: a RewardSet's own, so each run says it once per function)."""
    try:
        moved_to = os.getcwd()
    except FileNotFoundError:  # it moved into a folder that is gone now
        moved_to = "a deleted folder"
    if moved_to == cwd:
        return
    os.chdir(cwd)
    if name not in warned:
        warned.add(name)
        warnings.warn(
            f"reward function `{name}` changed the working directory to {moved_to}; grpokit changed it back to "
            f"{cwd} after the call (and does after every call), so the run's relative paths keep their meaning. "
            "Use absolute paths, or `os.chdir` back, inside the function",
            RewardWarning,
            stacklevel=2,
        )


_SPARE_FDS: dict[int, int] = {}  # fd 1 / 2 -> a duplicate taken before any reward ran


def _keep_spare_streams() -> None:
    """Duplicates of fds 1 and 2, taken once: a reward that closes them leaves the run a way to report it."""
    for fd in (1, 2):
        if fd not in _SPARE_FDS:
            with contextlib.suppress(OSError):  # (a process started without one)
                _SPARE_FDS[fd] = os.dup(fd)


def _reopen_closed_streams() -> str:
    """After a reward call: stdout / stderr (the Python objects or their fds) that it closed are reopened on the
    spares; -> what was closed, named ('' when nothing was)."""
    closed = []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            if fd in _SPARE_FDS:
                os.dup2(_SPARE_FDS[fd], fd)
            closed.append(f"file descriptor {fd} ({name})")
        if getattr(sys, name).closed:
            setattr(sys, name, os.fdopen(os.dup(fd), "w", buffering=1))
            closed.append(f"sys.{name}")
    return " and ".join(closed)


def _warn_once(warned: set[str], key: str, message: str) -> None:
    if key not in warned:
        warned.add(key)
        warnings.warn(message, RewardWarning, stacklevel=3)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it: set it straight back
    os.umask(mask)
    return mask


def _restore_umask(mask: int, name: str, warned: set[str]) -> None:
    """Back to the run's file-creation mask after a reward call that changed it (`os.umask(0o777)` would write the
    model and checkpoints unreadable), warned once per function."""
    now = _umask()
    if now == mask:
        return
    os.umask(mask)
    if f"umask {name}" not in warned:
        warned.add(f"umask {name}")
        warnings.warn(
            f"reward function `{name}` changed the file-creation mask (umask) to {now:03o}; grpokit set it back to "
            f"{mask:03o} after the call (and does after every call), so the run's files stay readable",
            RewardWarning,
            stacklevel=2,
        )


class _ExitCalled(BaseException):
    """os._exit called inside a reward function (a BaseException: `except Exception` there cannot swallow it)."""


def _exit_refused(real_exit: Any) -> Any:
    """os._exit for the time of a reward call: in this process it raises `_ExitCalled` (the run stops with the
    function named, not with exit code 0 and nothing saved); a child the reward forked exits as it asks."""
    pid = os.getpid()

    def _exit(code: int) -> None:
        if os.getpid() != pid:
            real_exit(code)
        raise _ExitCalled(code)

    return _exit


class _Timeout(SystemExit):
    """Raised inside a reward call that ran past `reward_timeout`: not an Exception, so `except Exception` in the
    reward function cannot swallow it, and a SystemExit, which asyncio re-raises out of its event loop wherever it
    lands (a task's step, a callback) instead of logging it and going on."""


def late_error(name: str, timeout: float) -> RewardError:
    return RewardError(
        f"reward function `{name}` did not return within reward_timeout = {timeout:g} s "
        "(raise reward_timeout if it is only slow)"
    )


@contextlib.contextmanager
def _watchdog(timeout: float | None, late: str) -> Iterator[None]:
    """Inside: after `timeout` seconds (None: never) a watchdog thread sends SIGUSR1 to this (the main) thread,
    whose handler raises `_Timeout` wherever the thread then is; `late` is said on stderr first."""
    if not timeout:
        yield
        return
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
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)


def _signals_reach_here() -> bool:
    """Whether a watchdog's SIGUSR1 can interrupt this thread: the main thread, on a system with pthread_kill."""
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_kill")


def call_with_timeout(name: str, fn: RewardFn, timeout: float | None, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in this thread, stopped with a RewardError naming `name` after `timeout` seconds.

    The call stays in the calling thread, so a reward that uses signals itself (math verifiers set SIGALRM
    timeouts) keeps working; a watchdog thread sends SIGUSR1 to interrupt it when the time is up. Where
    signals cannot reach the caller (not the main thread, or no pthread_kill), the call runs in a worker
    thread and is abandoned when late. A call stuck inside native code is interrupted when it returns to Python.
    """
    if not timeout:
        return fn(*args, **kwargs)
    late = late_error(name, timeout)
    if not _signals_reach_here():
        return _call_in_worker(fn, timeout, late, args, kwargs)
    try:
        with _watchdog(timeout, str(late)):
            return fn(*args, **kwargs)
    except _Timeout:
        raise late from None


# The event loops async reward functions run in, each kept for the process: an async client a reward made in one
# step (bound to the loop it first ran in) still works in the next, as under TRL's one loop. "main": run in the main
# thread; "thread": a daemon thread's, where the main thread runs a loop of its own (a notebook) or is not the caller.
_LOOPS: dict[str, asyncio.AbstractEventLoop] = {}


def await_rewards(calls: Sequence[tuple[str, Any]], timeout: float | None) -> list[Any]:
    """The awaitables of `calls` ((name, awaitable): the async reward functions' calls of one batch) awaited
    concurrently in one event loop, each within `timeout` seconds of the start (None: no limit); -> their values, in
    order. The first that raises or runs late is raised, named (a RewardError), the others cancelled.

    In the main thread with no event loop running there (a script, each rank of torchrun) the loop runs in this
    thread, so a reward's own signal handlers (SIGALRM timeouts of math verifiers) work, and the watchdog's SIGUSR1
    stops one that holds the loop past its time, as `call_with_timeout` does. Where a loop runs already (a notebook)
    or this is another thread, they run in a daemon thread's loop, as TRL runs them: a late one is cancelled, and one
    that holds that loop is abandoned with it."""
    if _signals_reach_here() and not _loop_running():
        return _await_here(calls, timeout)
    return _await_in_thread(calls, timeout)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _awaited(name: str, awaitable: Any) -> Any:
    """`awaitable`'s value, what it raises as a RewardError naming `name` (its timeout and cancellation as they are)."""
    try:
        return await awaitable
    except (RewardError, _Timeout, asyncio.CancelledError):
        raise
    except BaseException as err:
        raise _reward_error(name, err) from (None if isinstance(err, _ExitCalled) else err)


def _outcome(tasks: list[asyncio.Task], timeout: float | None, late: list[str]) -> list[Any]:
    """The values of `tasks`, all done; else the first (in order) that raised, raised; else the one the watchdog
    stopped, or the first of `late` (the names of those still waiting when the time was up), named as late."""
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    stopped = [t.get_name() for t in failed if isinstance(t.exception(), _Timeout)]
    for task in failed:
        if not isinstance(task.exception(), _Timeout):
            raise task.exception()
    if stopped or late:
        raise late_error((stopped or late)[0], timeout or 0.0) from None
    return [t.result() for t in tasks]


def _await_here(calls: Sequence[tuple[str, Any]], timeout: float | None) -> list[Any]:
    loop = _LOOPS.get("main") or _LOOPS.setdefault("main", asyncio.new_event_loop())
    tasks = [loop.create_task(_awaited(name, awaitable), name=name) for name, awaitable in calls]
    names = ", ".join(f"`{name}`" for name, _ in calls)
    said = f"reward functions {names}, awaited together, did not all return within reward_timeout = {timeout} s"
    late: list[str] = []
    try:
        with _watchdog(timeout, said):
            loop.run_until_complete(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
    except _Timeout:  # in a task's step (that task is done with it) or while the loop waited (every one not done)
        late = [t.get_name() for t in tasks if not t.done()]
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:  # one failed or the time is up: the others stop
            task.cancel()
        if pending:
            with contextlib.suppress(_Timeout), _watchdog(timeout, f"cancelling {names}"):
                loop.run_until_complete(asyncio.wait(pending))
    return _outcome(tasks, timeout, late)


def _await_in_thread(calls: Sequence[tuple[str, Any]], timeout: float | None) -> list[Any]:
    loop = _LOOPS.get("thread")
    if loop is None:
        loop = _LOOPS["thread"] = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="grpokit-async-rewards", daemon=True).start()
    tasks: list[asyncio.Task] = []

    async def together() -> None:
        tasks.extend(asyncio.ensure_future(_awaited(name, awaitable)) for name, awaitable in calls)
        for task, (name, _) in zip(tasks, calls):
            task.set_name(name)
        _, pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    finished = asyncio.run_coroutine_threadsafe(together(), loop)
    try:
        finished.result(timeout)
    except concurrent.futures.TimeoutError:  # a reward holds the loop: it is abandoned, the next batch gets another
        _LOOPS.pop("thread", None)
        raise late_error(next((t.get_name() for t in tasks if not t.done()), calls[0][0]), timeout or 0.0) from None
    late = [t.get_name() for t in tasks if t.cancelled()]
    return _outcome(tasks, timeout, late)


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


IMMUTABLE = (str, bytes, int, float, bool, type(None), numbers.Number)
SCALAR_TYPES = frozenset({str, bytes, int, float, bool, type(None)})  # a flat list of exactly these: one copy


def private_copy(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """A copy of a reward input that shares nothing mutable with it: lists, dicts and tuples copied down to their
    immutable leaves, anything else through `copy.deepcopy`. A flat list of scalars (a row of token ids, of
    texts) is copied in one C-level call, not item by item. `memo` (one per reward call, `copy.deepcopy`'s own
    form: id of an original -> its copy) copies an object met several times once: a prompt row that the G
    completions of its group share, or the same messages in two columns, stays one object in the copy, as in the
    original."""
    if memo is None:
        memo = {}
    if isinstance(value, IMMUTABLE):
        return value
    kind = type(value)  # exactly: a subclass keeps its type through deepcopy below
    if kind is list or kind is dict or kind is tuple:
        key = id(value)
        if key in memo:
            return memo[key]
        if kind is list:
            if set(map(type, value)) <= SCALAR_TYPES:
                copied = value.copy()
            else:
                copied = []
                memo[key] = copied  # before its items: a list that holds itself
                copied.extend(private_copy(v, memo) for v in value)
        elif kind is dict:
            copied = {}
            memo[key] = copied
            copied.update((k, private_copy(v, memo)) for k, v in value.items())
        else:
            copied = value if set(map(type, value)) <= SCALAR_TYPES else tuple(private_copy(v, memo) for v in value)
        memo[key] = copied
        return copied
    try:
        return copy.deepcopy(value, memo)
    except Exception:  # an object that cannot be copied (a lock, a client) is shared, as a column of it must be
        return value


def score(
    reward_funcs: Sequence[tuple[str, RewardFn]],
    inputs: dict[str, list[Any]],
    *,
    timeout: float | None = None,
    warned_cwd: set[str] | None = None,
    state: Any = None,
    logs: RewardLogs | None = None,
) -> torch.Tensor:
    """Call every reward function once on the batch, by keyword (`inputs`: prompts, completions, ... as
    `reward_inputs` builds them; and TRL's `trainer_state`, `log_metric`, `log_extra`); returns (N, K) float64 with
    NaN where one said None.

    Every return value is checked here, so that a broken reward stops the run with the function's
    name and the sample, not later as a NaN loss: one finite number (or None) per completion, within
    float32's range (training computes in float32). A call may take `timeout` seconds (None: no limit).
    The calls that return an awaitable (`async def` functions) are awaited together, after the others
    (`await_rewards`), and checked alike. `warned_cwd`: the functions already warned about changing the working
    directory (a RewardSet's, kept across its steps; None: a set of this call's own). `state`: the TrainerState
    passed as `trainer_state` (None: a fresh one, as outside a run); `logs`: where `log_metric` and `log_extra` go
    (None: checked, then dropped).
    """
    warned_cwd = set() if warned_cwd is None else warned_cwd
    prompts, completions = inputs["prompts"], inputs["completions"]
    n = len(completions)
    logs = RewardLogs(n) if logs is None else logs
    available = [*inputs, *CONTRACT_INPUTS]
    out = torch.full((n, len(reward_funcs)), float("nan"), dtype=torch.float64)  # (N, K)
    waiting: list[tuple[int, str, Any]] = []  # (k, name, awaitable): the async functions' calls, awaited together
    try:
        for k, (name, fn) in enumerate(reward_funcs):
            accepted = accepted_inputs(name, fn, available)
            # each function gets its own copy of every input, nested lists and dicts included (completion_ids, chat
            # messages, list columns): one that edits its inputs in place cannot feed the next one, or the log, its
            # edits. TRL's objects are passed as they are (a state and two functions, not data)
            memo: dict[int, Any] = {}  # one per call: a row shared by several completions is copied once
            kwargs = {
                key: v if key == "environments" else private_copy(v, memo)  # (the live instances: their state)
                for key, v in inputs.items()
                if accepted is None or key in accepted
            }
            kwargs.update(_contract(name, accepted, state, logs))
            values = guarded_call(name, warned_cwd, lambda: call_with_timeout(name, fn, timeout, **kwargs))  # noqa: B023
            if inspect.isawaitable(values):
                waiting.append((k, name, values))
            else:
                out[:, k] = torch.tensor(checked_rewards(name, values, prompts, completions), dtype=torch.float64)
        if waiting:
            calls, places = [(name, awaitable) for _, name, awaitable in waiting], [k for k, _, _ in waiting]
            waiting = []  # await_rewards owns them now
            together = "`, `".join(name for name, _ in calls)  # (said as "reward function `a`, `b` ...")
            values_of = guarded_call(together, warned_cwd, lambda: await_rewards(calls, timeout))
            for k, (name, _), values in zip(places, calls, values_of):
                out[:, k] = torch.tensor(checked_rewards(name, values, prompts, completions), dtype=torch.float64)
    finally:
        for _, _, awaitable in waiting:  # never awaited: an earlier function failed
            if inspect.iscoroutine(awaitable):
                awaitable.close()
    return out


def _contract(name: str, accepted: set[str] | None, state: Any, logs: RewardLogs) -> dict[str, Any]:
    """TRL's `trainer_state`, `log_metric` and `log_extra` for the reward function `name`, those it takes."""
    wanted = [key for key in CONTRACT_INPUTS if accepted is None or key in accepted]
    if not wanted:
        return {}
    if state is None and "trainer_state" in wanted:
        from transformers import TrainerState

        state = TrainerState()
    return {key: value for key, value in {"trainer_state": state, **logs.callables(name)}.items() if key in wanted}


def _reward_error(name: str, err: BaseException) -> RewardError:
    """What a reward function raised, as the RewardError that stops the run naming it."""
    if isinstance(err, _ExitCalled):
        return RewardError(
            f"reward function `{name}` called os._exit({err.args[0]}), which would end the run at once, with no "
            "word and nothing saved"
        )
    return RewardError(f"reward function `{name}` raised {type(err).__name__}: {err}")


def guarded_call(name: str, warned: set[str], call: Callable[[], Any]) -> Any:
    """`call()`, a reward function's call (`name`; for the awaiting of several async ones, their names joined), with
    the process kept as the run needs it. A changed working directory, file-creation mask or grad mode is set
    back and said once per function of `warned`; os._exit, sys.exit(), KeyboardInterrupt, an exception or closing
    stdout / stderr stops the run with a RewardError naming the function."""
    cwd, umask, real_exit, grad = os.getcwd(), _umask(), os._exit, torch.is_grad_enabled()
    _keep_spare_streams()
    os._exit = _exit_refused(real_exit)
    try:
        values = call()
    except RewardError:
        raise
    except (_ExitCalled, Exception, KeyboardInterrupt) as err:  # a reward's exit() or Ctrl-C is its bug, named
        raise _reward_error(name, err) from (None if isinstance(err, _ExitCalled) else err)
    except SystemExit as err:
        if isinstance(err, _Timeout):  # (the watchdog's, late on its way out: the call was late)
            raise
        raise _reward_error(name, err) from err
    finally:
        os._exit = real_exit
        _restore_cwd(cwd, name, warned)
        _restore_umask(umask, name, warned)
        if torch.is_grad_enabled() != grad:  # torch.set_grad_enabled(False) would leave the backward no graph
            torch.set_grad_enabled(grad)
            _warn_once(warned, f"grad {name}", f"reward function `{name}` changed torch's grad mode; "
                       "grpokit set it back after the call (and does after every call)")  # fmt: skip
    closed = _reopen_closed_streams()
    if closed:
        raise RewardError(f"reward function `{name}` closed {closed}: the run could no longer report")
    return values


def checked_rewards(name: str, values: Any, prompts: list[Any], completions: list[Any]) -> list[float]:
    """A reward function's answer for N completions as N floats (NaN for None), or the RewardError naming it and the
    sample: one finite number or None per completion, within float32's range."""
    n = len(completions)
    # a 0-d tensor or array is one number for the whole batch, not one per completion (and cannot be iterated)
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable) or getattr(values, "ndim", 1) == 0:
        raise RewardError(
            f"reward function `{name}` returned {type(values).__name__} {values!r:.60}; expected a list of {n} "
            "floats, one per completion"
        )
    values = list(values)
    if len(values) != n:
        raise RewardError(f"reward function `{name}` returned {len(values)} values for {n} completions")
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(float("nan"))
            continue
        value = _one_number(value)  # one-element tensors and numpy arrays (a row of an (N, 1) output) alike
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
        out.append(float(value))
    return out


def check_advantages(
    advantages: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor, names: list[str], *, group_size: int,
    scale: str = "group", aggregation: str = "sum_then_normalize",
) -> None:  # fmt: skip
    """A reward scale that float32 cannot train on is an error, not a zero or an infinite gradient.

    advantages (N,) float32 as the loss will use them; rewards (N, K) float64 as the functions returned them
    (NaN = None). Overflow: a non-finite advantage. Vanishing: the same advantages computed in float64 (under the
    same `scale` and `aggregation`) are not all 0, yet every float32 advantage is below VANISHING_ADVANTAGE. Rewards
    that differ inside a group but whose weighted sums do not (two functions that cancel) give advantages of 0 in
    float64 too: that is no error.
    """
    sizes = ", ".join(
        f"`{name}` up to {column.nan_to_num(0.0).abs().max().item():.3g}" for name, column in zip(names, rewards.T)
    )
    if not bool(torch.isfinite(advantages).all()):
        raise RewardError(
            f"the advantages overflow float32 (rewards: {sizes}); rescale the reward functions or use "
            "scale_rewards: group"
        )
    exact = algo.multi_reward_advantages(
        rewards.double(), weights.double(), group_size=group_size, scale=scale, aggregation=aggregation
    )  # (N,) float64
    spread = bool((exact.nan_to_num(0.0).abs() >= VANISHING_ADVANTAGE).any())
    largest = float(advantages.abs().max()) if advantages.numel() else 0.0
    if spread and largest < VANISHING_ADVANTAGE and float(rewards.nan_to_num(0.0).abs().max()) ** 2 > FLOAT32_MAX:
        raise RewardError(
            f"the rewards ({sizes}) overflow float32 in the group statistics (their squares pass {FLOAT32_MAX:.3g}), "
            "so every advantage is 0: rescale the reward functions"
        )
    if spread and largest < VANISHING_ADVANTAGE:
        raise RewardError(
            f"every advantage of this step is below {VANISHING_ADVANTAGE:g} (largest {largest:.3g}) although the "
            f"rewards differ inside a group (rewards: {sizes}): float32 cannot resolve their differences at this "
            "scale; rescale or re-centre the reward functions"
        )


@dataclass
class RewardSet:
    """The rewards of a GRPO run: what it trains on, with weights, and what it only watches."""

    funcs: list[tuple[str, RewardFn]]
    weights: torch.Tensor  # (K,) float32
    gold: list[tuple[str, RewardFn]]  # watched beside a learned reward, never in the loss
    # the functions this run has warned about changing the working directory: said once per function and run
    warned_cwd: set[str] = field(default_factory=set)
    state: Any = None  # the run's transformers.TrainerState, passed as `trainer_state` (None: a fresh one per call)
    logged: LoggedValues = field(default_factory=LoggedValues)  # what the last `score_step`'s functions logged

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.funcs]

    def specs(self) -> list[str]:
        """What the config records for each function: a reward model's folder; `module:function` for a function
        passed bare where that imports it back (a YAML run can repeat the Python run); else its name."""
        out = []
        for name, fn in self.funcs:
            module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
            if isinstance(fn, RewardModelScorer):
                out.append(str(fn.path))
            elif (
                name == qualname
                and module not in (None, "__main__", "grpokit.rewards.functions")
                and qualname.isidentifier()
            ):
                out.append(f"{module}:{qualname}")
            elif name in BUILTIN_REWARDS and not str(module).startswith("grpokit"):
                out.append(f"{module}:{qualname}")  # a function of yours named as a built-in: not the built-in
            else:
                out.append(name)
        return out

    def score_step(
        self,
        inputs: dict[str, list[Any]],
        *,
        group_size: int,
        scale: str,
        aggregation: str,
        timeout: float | None,
        cluster: Cluster | None = None,
    ):
        """One generation batch (`reward_inputs`) scored (each call within `timeout` seconds) and turned into
        advantages over groups of `group_size` (`algo.multi_reward_advantages` under `scale` and `aggregation`;
        `check_advantages`). `cluster` joins the scores of every rank's share, so that advantages and every figure
        are of the whole step (a batch-level `scale` included) wherever its rows were sampled, and what the functions
        logged (`logged`, reduced over the ranks).
        -> (rewards (N, K) float32, NaN for None; total (N,); scorable (N,); advantages (N,); gold (N, 1) | None)."""
        G = group_size
        gather = cluster.gather if cluster is not None else (lambda t: t)
        warned, logs = self.warned_cwd, RewardLogs(len(inputs["completions"]))
        scores = gather(score(self.funcs, inputs, timeout=timeout, warned_cwd=warned, state=self.state, logs=logs))
        rewards = scores.float()  # (N, K); scores (N, K) float64
        total, scorable = algo.combine_rewards(rewards, self.weights)  # (N,), (N,)
        advantages = self.advantages(scores, group_size=G, scale=scale, aggregation=aggregation)  # (N,)
        gold = None
        if self.gold:
            gold = gather(score(self.gold, inputs, timeout=timeout, warned_cwd=warned, state=self.state, logs=logs))
            gold = gold.float()  # (N, 1)
        self.logged = logs.reduce(cluster.gather_objects if cluster is not None else None)
        return rewards, total, scorable, advantages, gold

    def advantages(self, scores: torch.Tensor, *, group_size: int, scale: str, aggregation: str) -> torch.Tensor:
        """The advantages (N,) float32 of a whole batch of scores (N, K) (`algo.multi_reward_advantages` under `scale`
        and `aggregation`), checked (`check_advantages`): `score_step`'s, and those of a batch made of the groups
        dynamic sampling kept."""
        advantages = algo.multi_reward_advantages(
            scores.float(), self.weights, group_size=group_size, scale=scale, aggregation=aggregation
        )  # (N,)
        check_advantages(advantages, scores.double(), self.weights, self.names, group_size=group_size, scale=scale,
                         aggregation=aggregation)  # fmt: skip
        return advantages

    def with_logged(
        self, metrics: dict[str, float], samples: list[dict[str, Any]], *, every: int = 1
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """A step's `metrics` and its N logged completions (`samples`, every `every`-th kept) with what its reward
        functions logged (`logged`): their metrics beside grpokit's, their columns beside each completion. A metric
        of a name grpokit logs itself is refused, naming the function (TRL would average the two into one)."""
        logged = self.logged
        for name in logged.metrics:
            if name in metrics:
                raise RewardError(
                    f"reward function `{logged.owners[name]}` logged the metric {name!r} (log_metric), a name grpokit "
                    f"logs itself at every step ({metrics[name]!r:.12} this step): choose another name, e.g. "
                    f"'{logged.owners[name]}/{name}'"
                )
        for column, values in logged.extras.items():
            for sample, value in zip(samples, values):
                sample[column] = value
        return {**metrics, **logged.metrics}, samples[::every]

    def step_figures(self, rewards, total, scorable, gold, *, group_size: int) -> dict[str, float]:
        """What a step logs of `score_step`'s answer: the mean and spread of the total (NaN, logged as null,
        when nothing was scored), the scored share, each function's mean, the gold mean, the flat groups' share."""
        scored = total[scorable]  # rows where some reward function returned a number
        return {
            "reward": scored.mean().item() if len(scored) else float("nan"),
            "reward_std": scored.std().item() if len(scored) > 1 else float("nan"),
            "rewards/scored_frac": scorable.float().mean().item(),
            **{f"rewards/{name}/mean": rewards[:, k].nanmean().item() for k, name in enumerate(self.names)},
            **({"gold/mean": gold.nanmean().item()} if gold is not None else {}),
            "frac_reward_zero_std": algo.flat_groups(total, scorable, group_size=group_size).float().mean().item(),
        }


def reward_set(
    funcs: list[Any] | None,
    build: Callable[..., list[tuple[str, RewardFn]]],
    *,
    names: Sequence[str],
    weights: Sequence[float] | None,
    gold_reward: str | None,
    prompt_column: str,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]] | None = None,
    state: Any = None,
    episodes: bool = False,
    extra: Sequence[tuple[str, RewardFn]] = (),
    text_answers: bool = True,
) -> RewardSet:
    """The reward functions `funcs` handed in, else those `names` names, with their `weights` (None: 1 each) and the
    `gold_reward` watched beside them; `build(names, field=...)` turns names into (name, function) pairs
    (`build_reward_funcs` with the run's settings; `field` the config field that named them). Checks that the rows
    (training and held-out: their answers, their image columns) carry what they need, before any policy model
    loads. `state`: the run's TrainerState, what the functions get as `trainer_state`. `episodes`: the rollouts are
    multi-turn (the functions may take `EPISODE_INPUTS`); `extra`: reward columns of the environment, after the
    others, weight 1 each (as TRL adds an environment's `get_reward`). `text_answers`: `accuracy` compares the rows'
    `answer` as text (False: it is a task's own scorer, which reads its rows as they are: a reasoning-gym task's)."""
    funcs = named_reward_funcs(funcs, build) if funcs is not None else build(names)
    try:
        gold = build([gold_reward], field="gold_reward") if gold_reward else []
    except ValueError as err:
        raise ConfigError(f"config field `gold_reward`: {err}") from None
    weights = weights or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(f"config field `reward_weights` has {len(weights)} entries for {len(funcs)} reward functions")
    funcs, weights = [*funcs, *extra], [*weights, *[1.0] * len(extra)]
    if not funcs:
        raise ConfigError(
            "config field `reward_funcs` is empty and the environment brings no reward of its own (reward() or "
            "get_reward()): nothing would score the rollouts"
        )
    gold_checked = "accuracy" in [name for name, _ in funcs + gold]
    if gold_checked and text_answers:
        check_columns(train_rows, ["answer"], "train data (the `accuracy` reward needs it)")
        check_answers(train_rows, "train data (the `accuracy` reward compares its `answer`)")
    if text_answers:
        check_eval_answers(eval_rows or [], gold_reward_used=gold_checked)
    available = [*REWARD_INPUTS, *(c for c in train_rows[0] if c != prompt_column)]
    if episodes:
        shadowed = [c for c in EPISODE_INPUTS if c in train_rows[0]]
        if shadowed:
            raise DataError(
                f"train data has a column {shadowed[0]!r}, a name a multi-turn run passes its reward functions "
                f"({', '.join(EPISODE_INPUTS)}): rename the column"
            )
        available += EPISODE_INPUTS
    asked: set[str] = set()  # the names reward functions ask for in their signatures (not through **kwargs)
    for name, fn in funcs + gold:
        accepted_inputs(name, fn, available)  # a signature grpokit cannot call fails now, not at step 1
        asked |= named_parameters(fn)
    check_image_columns(train_rows, asked, prompt_column, "train data")
    check_image_columns(eval_rows or [], asked, prompt_column, "eval data")
    return RewardSet(funcs, torch.tensor(weights, dtype=torch.float32), gold, state=state)


IMAGE_COLUMNS = ("image", "images")  # TRL's vision-language input columns


def check_image_columns(rows: list[dict[str, Any]], asked: set[str], prompt_column: str, source: str) -> None:
    """grpokit trains text models: an `image` / `images` column (TRL's VLM input) would never reach the model, and
    the run would train on the text alone. Refused, naming the column, unless a reward function asks for it by
    name (then it is a data column that function reads, like any other)."""
    for column in IMAGE_COLUMNS:
        if rows and column in rows[0] and column not in asked:
            raise DataError(
                f"{source} has an {column!r} column (a vision-language model's input, as TRL reads it), but "
                f"grpokit trains text models: the model would see only {prompt_column!r} and the images would be "
                f"dropped. Remove the column, or name it in a reward function's signature, e.g. "
                f"def my_reward(completions, {column}, **kwargs), if a reward reads it"
            )


def named_reward_funcs(funcs: Any, build: Callable[[Sequence[str]], list[tuple[str, RewardFn]]]):
    """`reward_funcs` as a Python caller gave it (checked by `reward_entries`): functions, (name, function)
    pairs, names or reward-model folders (built by `build`) -> (name, function) pairs; a name used twice gets a
    suffix, so every function has its own metric."""
    entries = reward_entries(funcs)
    named: list[tuple[str, RewardFn]] = []
    for entry in entries:
        if isinstance(entry, str):
            named += build([entry])
        elif isinstance(entry, tuple):  # (name, function)
            named.append(entry)
        else:
            named.append((getattr(entry, "__name__", type(entry).__name__), entry))
    taken: set[str] = set()
    for i, (name, fn) in enumerate(named):
        unique, count = name, 1
        while unique in taken:  # the suffix too may be a name given: ("f", a), ("f_2", b), ("f", c)
            count += 1
            unique = f"{name}_{count}"
        taken.add(unique)
        named[i] = (unique, fn)
    return named


def reward_entries(reward_funcs: Any) -> list[Any] | None:
    """`reward_funcs` as a non-empty list of entries: functions, (name, function) pairs, built-in names, reward-model
    folders or `module:function` names. One function, one name or one (name, function) pair stands alone."""
    if reward_funcs is None:
        return None
    if callable(reward_funcs) or isinstance(reward_funcs, (str, Path)):
        return [_entry(reward_funcs, "reward_funcs")]
    if _is_pair(reward_funcs):
        name = reward_funcs[0]
        if name in BUILTIN_REWARDS or ":" in name or "/" in name or Path(name).exists():
            # "accuracy" alone is also a reward: the tuple could be one named function or two rewards
            raise ArgumentError(
                f"`reward_funcs` = ({name!r}, {_name_of(reward_funcs[1])}) is ambiguous: write "
                f"[({name!r}, {_name_of(reward_funcs[1])})] for one function named {name!r}, or "
                f"[{name!r}, {_name_of(reward_funcs[1])}] for two reward functions"
            )
        return [reward_funcs]
    if isinstance(reward_funcs, (dict, bytes)) or not isinstance(reward_funcs, Iterable):
        raise ArgumentError(
            f"`reward_funcs` is {kind_of(reward_funcs)} ({reward_funcs!r:.60}); expected a function, a list of "
            "functions, (name, function) pairs, built-in names or reward-model folders"
        )
    entries = [_entry(entry, f"reward_funcs[{i}]") for i, entry in enumerate(reward_funcs)]
    if not entries:
        raise ArgumentError(
            "`reward_funcs` is empty: pass at least one reward function, or leave it out (None) to use the "
            "config's `reward_funcs`"
        )
    return entries


def _entry(entry: Any, name: str) -> Any:
    if isinstance(entry, Path):
        return str(entry)
    if _is_module(entry):  # callable, but called with tensors, not with completions by keyword
        raise ArgumentError(
            f"`{name}` is a {type(entry).__name__} model object: grpokit loads a reward model from its folder, with "
            "its own tokenizer; save both (`model.save_pretrained(DIR)`, `tokenizer.save_pretrained(DIR)`) and pass "
            "DIR, or wrap the model in a function of (completions, **kwargs)"
        )
    if _is_pair(entry) and _is_module(entry[1]):
        raise ArgumentError(
            f"`{name}` = ({entry[0]!r}, a {type(entry[1]).__name__} model object): grpokit loads a reward model from "
            "its folder, with its own tokenizer; save both and pass the folder, or wrap the model in a function of "
            "(completions, **kwargs)"
        )
    if isinstance(entry, str) or callable(entry) or _is_pair(entry):
        return entry
    if isinstance(entry, tuple):
        raise ArgumentError(
            f"`{name}` is the tuple {entry!r:.80}; a pair is (name, function): a text name and a callable"
        )
    raise ArgumentError(
        f"`{name}` is {kind_of(entry)} ({entry!r:.60}); expected a function, a (name, function) pair, "
        "a built-in name, a reward-model folder or `module:function`"
    )


def _is_pair(entry: Any) -> bool:
    return isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and callable(entry[1])


def _name_of(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _is_module(value: Any) -> bool:
    import torch

    return isinstance(value, torch.nn.Module)
