"""grpokit's offline small world: verifiable tasks, a character tokenizer and tiny models."""

from __future__ import annotations

from typing import Any

from .arithmetic import AdditionTask, accuracy_reward, check_answer, count_carries
from .models import tiny_model
from .preferences import LABELER_FLAWS, preference_pairs
from .reasoning_gym_task import ReasoningGymTask, reasoning_gym_name
from .tokenizer import build_char_tokenizer
from .tool_arithmetic import ToolAdditionTask

TASKS = {"addition": AdditionTask, "tool_addition": ToolAdditionTask}


def get_task(name: str, **kwargs: Any) -> AdditionTask:
    """Instantiate the task registered under `name` with `kwargs`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def make_task(name: str, *, num_digits: int, settings: dict[str, Any] | None = None) -> Any:
    """The task a config names: `reasoning_gym:NAME` with its `settings` (`ReasoningGymTask`), or a built-in task with
    `num_digits` digits per operand (a built-in task takes no settings)."""
    gym = reasoning_gym_name(name)
    if gym is not None:
        return ReasoningGymTask(gym, settings)
    if settings:
        raise ValueError(
            f"config field `task_settings` is set, but task {name!r} takes none (only `reasoning_gym:` tasks do)"
        )
    return get_task(name, num_digits=num_digits)


__all__ = [
    "TASKS",
    "LABELER_FLAWS",
    "AdditionTask",
    "ReasoningGymTask",
    "ToolAdditionTask",
    "accuracy_reward",
    "build_char_tokenizer",
    "check_answer",
    "count_carries",
    "get_task",
    "make_task",
    "preference_pairs",
    "reasoning_gym_name",
    "tiny_model",
]
