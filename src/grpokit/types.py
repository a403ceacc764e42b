"""The few data types that travel between the sampler, the reward step and the update.

N = P * G rows: prompt p owns rows p*G .. p*G + G - 1 (groups are contiguous and never split).
Tp = padded prompt length (prompts are LEFT-padded), Tc = padded completion length (RIGHT-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Rollout:
    """What the sampler returns for one generation batch."""

    prompt_ids: torch.Tensor  # (N, Tp) long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (N, Tp) long, 1 for real prompt tokens
    completion_ids: torch.Tensor  # (N, Tc) long, pad_token_id after the end of each completion
    completion_mask: torch.Tensor  # (N, Tc) long, 1 for real completion tokens INCLUDING the EOS
    sampling_logp: torch.Tensor  # (N, Tc) float32, log pi(token) under logits / temperature; 0 where masked
    truncated: torch.Tensor  # (N,) bool, True when no EOS / stop string within max_new_tokens
    group_size: int  # G

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]


@dataclass
class TrainResult:
    """What a GRPO run returns (its files are in `output_dir`)."""

    output_dir: Path
    model_dir: Path
    plot_path: Path | None
    final_metrics: dict[str, float]
    eval_history: list[dict[str, float]]
    warnings: list[str]
    monitor_summary: list[str]  # one line per monitor: FIRED with its first warning, or its last figures
    monitor_fired: dict[str, str]  # monitor kind -> its first warning
