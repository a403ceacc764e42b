"""grpokit's offline small world: verifiable tasks, a character tokenizer and tiny models."""

from __future__ import annotations

from typing import Any

from .arithmetic import AdditionTask, accuracy_reward, check_answer, count_carries
from .models import tiny_model
from .preferences import LABELER_FLAWS, preference_pairs
from .tokenizer import build_char_tokenizer
from .tool_arithmetic import ToolAdditionTask

TASKS = {"addition": AdditionTask, "tool_addition": ToolAdditionTask}


def get_task(name: str, **kwargs: Any) -> AdditionTask:
    """Instantiate the task registered under `name` with `kwargs`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = [
    "TASKS",
    "LABELER_FLAWS",
    "AdditionTask",
    "ToolAdditionTask",
    "accuracy_reward",
    "build_char_tokenizer",
    "check_answer",
    "count_carries",
    "get_task",
    "preference_pairs",
    "tiny_model",
]
