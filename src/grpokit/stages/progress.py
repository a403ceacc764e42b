"""The run's progress as TRL counts it, in the `transformers.TrainerState` that reward functions get as
`trainer_state` (and a trainer shows as `.state`).

TRL's `global_step` counts optimizer steps: a generation step of grpokit's is `num_iterations` x (its rows /
`minibatch_size`) of them. TRL scores a generation batch before that batch's first optimizer step, so a reward sees
the optimizer steps completed before it (0, 1, 2 ... with one optimizer step per generation), and `epoch` the
fraction of the training prompts sampled before it (measured under TRL 1.16: the same numbers).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from transformers import TrainerState

if TYPE_CHECKING:
    from grpokit.config import GRPOConfig
    from grpokit.runtime.distributed import Cluster


def optimizer_steps_per_step(cfg: GRPOConfig) -> int:
    """The optimizer steps of one generation step: num_iterations passes over its minibatches."""
    generation = cfg.prompts_per_step * cfg.num_generations
    return cfg.num_iterations * (generation // (cfg.minibatch_size or generation))


def trainer_state(cfg: GRPOConfig, num_prompts: int, cluster: Cluster) -> TrainerState:
    """A run's TrainerState before its first step: `max_steps` its optimizer steps, `num_train_epochs` the epochs its
    steps start over `num_prompts` training prompts, logging every generation step, saving and evaluating every
    `save_every` / `eval_every` (what callbacks read, `stages.callbacks`)."""
    per_step = optimizer_steps_per_step(cfg)
    return TrainerState(
        max_steps=cfg.max_steps * per_step,
        num_train_epochs=math.ceil(cfg.max_steps * cfg.prompts_per_step / max(num_prompts, 1)),
        logging_steps=per_step,  # one metrics row per generation step
        save_steps=(cfg.save_every or cfg.max_steps) * per_step,
        eval_steps=(cfg.eval_every or cfg.max_steps) * per_step,
        train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        is_local_process_zero=cluster.local_rank == 0,
        is_world_process_zero=cluster.is_main,
    )


def at_step(state: TrainerState, cfg: GRPOConfig, steps_done: int, num_prompts: int) -> None:
    """`state` after `steps_done` generation steps: their optimizer steps, and the epochs their prompts make."""
    state.global_step = steps_done * optimizer_steps_per_step(cfg)
    state.epoch = steps_done * cfg.prompts_per_step / max(num_prompts, 1)
