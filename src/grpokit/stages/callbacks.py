"""transformers' `TrainerCallback` events on grpokit's run loop: what `grpokit.trl.GRPOTrainer(callbacks=[...])`
plugs into the GRPO trainer's `hooks` (`loop.RunHooks`).

Each event is called as transformers calls it, `callback.on_EVENT(args, state, control, model=, processing_class=,
optimizer=, lr_scheduler=, train_dataloader=None, eval_dataloader=None, ...)`, on every rank as transformers does,
with the trainer's own `transformers.TrainerState` (its steps are optimizer steps, TRL's unit) and one
`transformers.TrainerControl` for the trainer's life. Where grpokit's loop differs from transformers':
- a loop step is one generation step: on_step_begin / on_step_end come once per generation step, and
  `state.global_step` advances by its optimizer steps (one with TRL's defaults; num_iterations x steps_per_generation
  / gradient_accumulation_steps in general);
- every step is logged: on_log gets each step's row (grpokit's metric names, as metrics.jsonl has them), and each
  evaluation is a row of its own with `eval_` keys, as transformers logs one;
- grpokit evaluates the held-out rows before the first step and after the last whenever it has some, and every
  `eval_every` steps between;
- `control.should_training_stop` ends the run after the step as its last step would: a checkpoint, the final
  evaluation, the model saved, on_train_end; `control.should_save` writes a checkpoint after the step (named
  checkpoint-STEP in generation steps); `control.should_evaluate` evaluates after the step; `should_log` has nothing
  to do (every step is logged);
- on_epoch_begin / on_epoch_end, on_substep_end, on_pre_optimizer_step, on_optimizer_step, on_prediction_step,
  on_predict and on_push_begin are never called (no such points: the loop has no epochs, nor predictions).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerControl, TrainerState

from grpokit.report.runlog import read_metrics, strict
from grpokit.stages.loop import HookAnswer, RunHooks
from grpokit.stages.progress import at_step, optimizer_steps_per_step

# the events a transformers callback may define (one at least, or it is no callback)
EVENTS = (
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate", "on_predict",
    "on_save", "on_log", "on_prediction_step", "on_push_begin",
)  # fmt: skip


class CallbackError(RuntimeError):
    """A callback raised: the message names it, the event and the step; its own error is the cause."""


class Callbacks:
    """A trainer's callbacks in the order added, with transformers' `add_callback` / `pop_callback` /
    `remove_callback` (a class is instantiated when added, and matches any instance of it when popped or removed)."""

    def __init__(self, callbacks: list[Any] | None = None):
        self.callbacks: list[Any] = []
        for callback in callbacks or []:
            self.add_callback(callback)

    def add_callback(self, callback: Any) -> None:
        instance = callback() if isinstance(callback, type) else callback
        if not any(callable(getattr(instance, event, None)) for event in EVENTS):
            raise TypeError(
                f"callback {instance!r} has none of transformers' callback events (on_step_end, on_log, ...): "
                "pass a transformers.TrainerCallback (or its class)"
            )
        if any(type(other) is type(instance) for other in self.callbacks):  # transformers says the same
            warnings.warn(f"a second {type(instance).__name__} callback is added: both are called", stacklevel=3)
        self.callbacks.append(instance)

    def pop_callback(self, callback: Any) -> Any:
        """The first callback that is `callback` (or an instance of that class), removed; None if there is none."""
        for found in self.callbacks:
            if isinstance(found, callback) if isinstance(callback, type) else found == callback:
                self.callbacks.remove(found)
                return found
        return None

    def remove_callback(self, callback: Any) -> None:
        """As `pop_callback`; an instance that is not there is a ValueError (as in transformers)."""
        if self.pop_callback(callback) is None and not isinstance(callback, type):
            raise ValueError(f"callback {callback!r} is not among the trainer's callbacks")

    @property
    def callback_list(self) -> str:
        return "\n".join(type(callback).__name__ for callback in self.callbacks)

    def call(self, event: str, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """`event` on every callback that has it, in order; a callback may return a new control (or None)."""
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:  # an object with some events only (not a TrainerCallback subclass)
                continue
            try:
                answer = method(args, state, control, **kwargs)
            except Exception as err:
                raise CallbackError(
                    f"callback {type(callback).__name__}.{event} raised {type(err).__name__}: {err} "
                    f"(at global_step {state.global_step})"
                ) from err
            if answer is not None:
                control = answer
        return control


def eval_metrics(evaluation: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    """An evaluation (`eval/NAME` keys, as grpokit's metrics.jsonl has them) in transformers' form: `eval_NAME`."""
    return {f"{prefix}_{key.removeprefix('eval/')}": value for key, value in evaluation.items() if key != "step"}


def split_row(row: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """A metrics row as transformers logs it: the training figures, and the evaluation's (empty: none this step)."""
    train = {key: value for key, value in row.items() if key != "step" and not key.startswith("eval/")}
    return train, {key: value for key, value in row.items() if key.startswith("eval/")}


class CallbackHooks(RunHooks):
    """The run loop's events (`RunHooks`) as transformers' callback events on `trainer` (grpokit's GRPO trainer):
    keeps `trainer.state` current (global_step, epoch, log_history) and calls `callbacks` with `args` (what the user
    passed as the trainer's args)."""

    def __init__(self, trainer: Any, args: Any, callbacks: Callbacks):
        self.trainer, self.args, self.callbacks = trainer, args, callbacks
        self.control = TrainerControl()
        # optimizer steps per generation step (the trainer's state counts the run's optimizer steps)
        self.per_step = optimizer_steps_per_step(trainer.cfg)
        self.reported = len(trainer.eval_history)  # evaluations already told to the callbacks

    @property
    def state(self) -> TrainerState:
        return self.trainer.state

    def event(self, name: str, **extra: Any) -> None:
        policy = self.trainer.policy
        self.control = self.callbacks.call(
            name, self.args, self.state, self.control, model=policy.model, processing_class=self.trainer.tokenizer,
            optimizer=policy.optimizer, lr_scheduler=policy.scheduler, train_dataloader=None, eval_dataloader=None,
            **extra,
        )  # fmt: skip

    def at(self, step: int) -> None:
        """`state` after generation step `step`: its optimizer steps, and epochs as the prompts drawn so far."""
        at_step(self.state, self.trainer.cfg, step, len(self.trainer.train_rows))

    def log(self, logs: dict[str, float]) -> None:
        """transformers' `Trainer.log`: the epoch added, the row kept in log_history with its step, on_log."""
        logs = {**strict(logs), "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control.should_log = False
        self.event("on_log", logs=logs)

    def report_evaluations(self, prefix: str = "eval") -> dict[str, float]:
        """The evaluations the trainer made since the last report, each logged and told (on_evaluate) as
        transformers' `evaluate` does; returns the last one's metrics."""
        metrics: dict[str, float] = {}
        for evaluation in self.trainer.eval_history[self.reported :]:
            metrics = eval_metrics(evaluation, prefix)
            self.log(metrics)
            self.control.should_evaluate = False
            self.event("on_evaluate", metrics=metrics)
        self.reported = len(self.trainer.eval_history)
        return metrics

    def evaluate(self, prefix: str = "eval") -> dict[str, float]:
        """A held-out evaluation now (at the step the run is at), logged and told; its metrics as `PREFIX_NAME`."""
        if not self.trainer.eval_rows:
            raise ValueError(
                "evaluation needs an eval_dataset, and the trainer has none: pass eval_dataset= to GRPOTrainer(...) "
                "(TRL refuses it as well: 'Trainer: evaluation requires an eval_dataset')"
            )
        self.report_evaluations()  # (earlier ones first, in order)
        self.trainer.evaluate(self.state.global_step // self.per_step)
        return self.report_evaluations(prefix)

    # ---------------------------------------------------------------- the loop's events
    def train_begin(self, start: int) -> None:
        """A fresh log_history (transformers makes a new TrainerState per train(); the run's schedule figures are
        the trainer's `progress.trainer_state`); a resumed run's holds its rows so far again, from metrics.jsonl."""
        state = self.state
        state.log_history.clear()
        metrics_file = Path(self.trainer.run_dir.path) / "metrics.jsonl"
        if start and metrics_file.is_file():  # (rank 0's file: another rank sees it on a shared file system)
            for row in read_metrics(metrics_file):
                if row["step"] <= start:
                    self.at(row["step"])
                    train, evaluation = split_row(row)
                    for logs in (train, eval_metrics(evaluation)):
                        if logs:
                            state.log_history.append({**logs, "epoch": state.epoch, "step": state.global_step})
        self.at(start)
        self.reported = len(self.trainer.eval_history)  # a resumed run's were told before it stopped
        self.control.should_training_stop = False
        self.event("on_train_begin")

    def step_begin(self, step: int) -> None:
        self.report_evaluations()  # the starting model's (the stage's `begin`)
        self.at(step - 1)
        self.control.should_log = self.control.should_evaluate = self.control.should_save = False
        self.event("on_step_begin")

    def step_end(self, step: int, metrics: dict[str, float] | None) -> HookAnswer:
        self.at(step)
        self.event("on_step_end")
        if metrics is not None:
            self.log(split_row(metrics)[0])
        self.report_evaluations()  # one due at this step (its figures were in the step's row)
        # a callback's should_evaluate: run by the loop on every rank when any rank's callback set it
        # (`evaluation_asked`), as held-out evaluation is a collective under torchrun
        return HookAnswer(save=self.control.should_save, stop=self.control.should_training_stop,
                          evaluate=self.control.should_evaluate)  # fmt: skip

    def evaluation_asked(self, step: int) -> None:
        self.evaluate()

    def saved(self, step: int, checkpoint: Path) -> None:
        self.control.should_save = False
        self.event("on_save")

    def train_end(self, step: int, model_dir: Path) -> None:
        self.report_evaluations()  # the final one (the stage's `finish`)
        self.event("on_train_end")
