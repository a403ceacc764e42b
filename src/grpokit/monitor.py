"""Watching the reward signal: a run that cannot learn should say so while it runs, not after.

GRPO learns only from groups whose rewards differ; when most groups are all-right or all-wrong, or
most completions are cut at the length limit, the gradient is mostly noise or zero.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class SignalMonitor:
    """Warns (once per kind) when a sliding-window average crosses its threshold."""

    window: int = 10
    max_zero_std_frac: float = 0.9
    max_truncated_frac: float = 0.5
    _zero_std: deque = field(default_factory=deque)
    _truncated: deque = field(default_factory=deque)
    warnings: list[str] = field(default_factory=list)

    def update(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Feed one step's metrics; returns the warnings raised at this step (usually none)."""
        new = []
        for values, key, limit, what in (
            (
                self._zero_std,
                "frac_zero_std_groups",
                self.max_zero_std_frac,
                "of groups had identical rewards for every completion: no learning signal. Make the task "
                "harder/easier, raise num_generations or temperature, or add a graded reward.",
            ),
            (
                self._truncated,
                "truncated_frac",
                self.max_truncated_frac,
                "of completions hit max_completion_length without EOS: raise max_completion_length, or "
                "set mask_truncated_completions / add the `overlong` reward.",
            ),
        ):
            values.append(metrics[key])
            if len(values) > self.window:
                values.popleft()
            mean = sum(values) / len(values)
            if len(values) == self.window and mean > limit and not any(key in w for w in self.warnings):
                new.append(f"step {step}: {mean:.0%} [{key}] {what}")
        self.warnings.extend(new)
        return new
