"""The training run every stage shares: resume or start, take the steps, log them, checkpoint, stop on a signal,
save the model.

SFT, reward-model, GRPO and PPO training differ in what one step does and in what a checkpoint holds beside the
policy; everything around that is here, once: the checkpoint found under the run folder's lock (rank 0's, told to
every rank), later checkpoints discarded only after the resumed one loaded, metrics.jsonl / TensorBoard opened where
the checkpoint left them, the progress bar, the folder checked to still be the run's before each row is written, a
signal on any rank finishing the step and checkpointing on all of them, a step that cannot train (NaN, a
sampler that fails) stopping the run with the step, the learning rate and the checkpoint left to resume from, and a
rank that left the launch (a collective failed) stopping the others with the checkpoint to resume from.
Code from outside the stage (the TRL adapter's transformers callbacks) sees the run at its events through
`RunHooks`, and may ask for a checkpoint or for the run to end after a step.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from grpokit.core.types import SamplerError
from grpokit.model.policy import NumericsError, Policy
from grpokit.report.runlog import RunLog, progress
from grpokit.runtime.checkpoint import (
    RUN_ID_FILE,
    RunDirectory,
    TrainingInterrupted,
    list_checkpoints,
    numerics_stop,
)
from grpokit.runtime.distributed import Cluster, DistributedError, LostRankError


@dataclass
class StepReport:
    """What one step gives the loop to show and keep."""

    metrics: dict[str, float] | None = None  # the row metrics.jsonl gets for this step; None: no row this step
    postfix: dict[str, str] = field(default_factory=dict)  # figures beside the progress bar (kept until replaced)
    warnings: list[str] = field(default_factory=list)  # printed above the bar, one line each
    completions: list[dict[str, Any]] | None = None  # rows for completions.jsonl; None: none this step


class Stage(Protocol):
    """A training stage as the run loop drives it."""

    policy: Policy  # the trained model (its learning rate goes into the message of a step that cannot train)

    def resume(self, checkpoint: Path) -> int:
        """Restore everything from `checkpoint` (written by `write_checkpoint`); return the step it was taken at."""

    def begin(self, log: RunLog | None, start: int) -> None:
        """Before the first step (`start` 0 for a fresh run): e.g. GRPO evaluates the starting model."""

    def train_step(self, step: int) -> StepReport:
        """One step: data, forward, backward, optimizer step; its figures."""

    def write_checkpoint(self, run: RunDirectory, step: int) -> Path:
        """checkpoint-STEP, whole (`saving.write_policy_checkpoint` with the stage's own state)."""

    def finish(self, log: RunLog | None, step: int) -> None:
        """After the last step (`step`: max_steps, or an earlier one a hook ended the run at), before the model is
        saved: held-out figures, logged at that step."""

    def save(self, folder: Path) -> Path:
        """The trained model (and what goes beside it) into the run folder; returns the model's folder."""


@dataclass(frozen=True)
class LoopSettings:
    """How a stage's run is driven (from its config, by the stage)."""

    name: str  # on the progress bar
    max_steps: int
    save_every: int  # checkpoint every this many steps (0: after the last step only)
    show_progress: bool = True
    tensorboard: bool = False
    record: dict[str, Any] | None = None  # the resolved config, written to config.yaml by a fresh run
    wandb_project: str | None = None  # mirror the metrics to this W&B project; None: no W&B


@dataclass(frozen=True)
class HookAnswer:
    """What a hook asks of the loop after a step."""

    save: bool = False  # checkpoint after this step, due or not
    stop: bool = False  # end the run after this step as its last: checkpoint, `finish`, the model saved
    evaluate: bool = False  # a held-out evaluation after this step (`RunHooks.evaluation_asked`)


class RunHooks:
    """The run's events, for code outside the stage (the TRL adapter's callbacks), called on every rank in this
    order: `train_begin`, then per step `step_begin`, `step_end`, `evaluation_asked` (when a rank's hook asked),
    `saved` (when a checkpoint was written), and `train_end` once the model is saved. A raised error ends the run as
    a failing step does. The base does nothing."""

    def train_begin(self, start: int) -> None:
        """Before the stage's `begin`: `start` is the step the run resumed at (0: a fresh run)."""

    def step_begin(self, step: int) -> None:
        """Before `step` is taken."""

    def step_end(self, step: int, metrics: dict[str, float] | None) -> HookAnswer:
        """After `step` and its row (`metrics`, as the stage reported it on this rank; None: no row this step)."""
        return HookAnswer()

    def evaluation_asked(self, step: int) -> None:
        """After `step_end`, when a hook on any rank asked for an evaluation (`HookAnswer.evaluate`): held-out
        evaluation is a collective under torchrun, so every rank runs it, or none."""

    def saved(self, step: int, checkpoint: Path) -> None:
        """After checkpoint-`step` is complete (written by rank 0, in `checkpoint`)."""

    def train_end(self, step: int, model_dir: Path) -> None:
        """After the last step's `finish` and the model saved into `model_dir`."""


def run_stage(
    stage: Stage, run_dir: RunDirectory, settings: LoopSettings, cluster: Cluster | None = None,
    hooks: RunHooks | None = None,
) -> Path:  # fmt: skip
    """Drives `stage` from its checkpoint (or step 0) to `settings.max_steps` (or to the step `hooks` ends it at)
    inside `run_dir` (its lock, its signal handlers, its whole-or-absent checkpoints); returns the saved model's
    folder. Rank 0 alone writes; every rank takes every step and calls the hooks."""
    cluster, hooks = cluster or Cluster(), hooks or RunHooks()
    with run_dir as run:
        try:
            return _run(stage, run, settings, cluster, hooks)
        except RuntimeError as err:  # a collective that failed: a rank left, or stopped answering
            lost = cluster.lost_rank(err)
            if lost is None:
                raise
            message = lost_rank_stop(run, lost)
            # said now, while this run's signal handlers hold: torchrun's SIGTERM to the remaining ranks follows a
            # lost one within a fraction of a second, and would end the process before the CLI prints
            print(f"grpokit: stopped: {message}", file=sys.stderr, flush=True)
            raise LostRankError(message) from err


# Errors every rank raises together, from figures every rank shares: a NumericsError (the gradient norm and the
# search for a non-finite weight are all-reduced), `check_every_rank_sees`'s DistributedError (gathered), a signal's
# stop (agreed at a step's end). Any other error may be one rank's alone (its reward, its shard of a checkpoint).
AGREED_ERRORS: tuple[type[BaseException], ...] = (TrainingInterrupted, NumericsError, DistributedError)


@contextmanager
def leaving_cluster(cluster: Cluster) -> Iterator[None]:
    """Runs the block (a trainer's run on this rank), then leaves `cluster`'s process group (`Cluster.close`).
    The rule: the closing barrier (which keeps gloo from aborting at teardown, "terminate called without an active
    exception") is entered when every rank is known to end the block together: it returned, or raised one of
    AGREED_ERRORS. On any other error this rank leaves alone, at once: the others may wait in another collective,
    which the barrier would answer (both then hang until `ddp_timeout`); its closed connections fail theirs at once.
    A LostRankError (a peer left) leaves without it too (`Cluster.lost_rank`), ignoring the SIGTERM torchrun sends
    the remaining ranks after a lost one, so that this rank ends with its own exit code."""
    together = False
    try:
        yield
        together = True
    except AGREED_ERRORS:
        together = True
        raise
    except LostRankError:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    finally:
        cluster.close(together=together)


def lost_rank_stop(run: RunDirectory, lost: str) -> str:
    """What a rank whose peer left says: what happened, and the checkpoint the launch resumes from."""
    found = list_checkpoints(run.path)
    kept = (
        f"the last complete checkpoint is {found[-1][1]} (step {found[-1][0]}): once every rank can run, launch "
        "again with `--resume-from-checkpoint latest`"
        if found
        else "no checkpoint was written yet: launch again to start over"
    )
    return f"{lost}; this rank stops too; {kept}"


def check_every_rank_sees(run: RunDirectory, cluster: Cluster) -> None:
    """Every rank sees the run folder rank 0 opened, checked once before any work by reading back rank 0's run
    identity: on several machines `output_dir` must be on a file system every node shares, at the same path (a
    relative one is read against each node's working folder), or FSDP's ranks would write their checkpoint shards
    where rank 0 never looks."""
    if not cluster.active:
        return
    run_id = cluster.broadcast(run.run_id)
    try:
        seen = (run.path / RUN_ID_FILE).read_text().strip()
    except OSError:
        seen = None
    blind = cluster.gather_objects([] if seen == run_id else [cluster.rank])
    if blind:
        raise DistributedError(
            f"config field `output_dir` ({run.path}): rank{'s' * (len(blind) > 1)} {', '.join(map(str, blind))} "
            "cannot see the run folder rank 0 writes (its run_id file is missing there, or another run's): across "
            "machines, output_dir must be a folder every node shares at the same path (an absolute path on a "
            "shared file system)"
        )


def _run(stage: Stage, run: RunDirectory, settings: LoopSettings, cluster: Cluster, hooks: RunHooks) -> Path:
    main = cluster.is_main
    check_every_rank_sees(run, cluster)
    run.checkpoint = cluster.broadcast(run.checkpoint)  # what rank 0 found, under its lock
    start = stage.resume(run.checkpoint) if run.checkpoint is not None else 0
    run.discard_later_checkpoints()  # only now that the checkpoint resumed has loaded
    log = None
    if main:
        log = RunLog(run.path, tensorboard=settings.tensorboard, record=settings.record,
                     wandb_project=settings.wandb_project, resume_step=start or None)  # fmt: skip
    step, bar = start, None
    try:
        hooks.train_begin(start)
        stage.begin(log, start)  # (before the numerics guard below: no step was taken yet)
        bar = progress(range(start + 1, settings.max_steps + 1), settings.name.lower(), initial=start,
                       total=settings.max_steps, enabled=settings.show_progress and main)  # fmt: skip
        try:
            for step in bar:
                hooks.step_begin(step)
                report = stage.train_step(step)
                if main:
                    run.check_still_ours()  # before its files are written: deleted, or another run's now
                    for warning in report.warnings:
                        bar.write(f"WARNING {warning}")
                    if report.metrics is not None:
                        log.log(step, report.metrics)
                    if report.completions is not None:
                        log.log_completions(step, report.completions)
                if report.postfix:
                    bar.set_postfix(**report.postfix)
                asked = hooks.step_end(step, report.metrics)
                # a signal, or a hook's save, stop or evaluation, on one rank: on all (they evaluate, checkpoint and
                # stop together). The ranks get a signal at different moments (one between steps, one inside a
                # collective): the flags of this step's end decide, the same on every rank.
                flags = cluster.max({"s": run.stop_signal or 0, "save": asked.save, "stop": asked.stop,
                                     "eval": asked.evaluate})  # fmt: skip
                run.stop_signal = int(flags["s"]) or None
                if flags["eval"]:
                    hooks.evaluation_asked(step)
                due = run.checkpoint_due(step, settings.max_steps, settings.save_every)
                if due or flags["save"] or flags["stop"]:
                    checkpoint = stage.write_checkpoint(run, step)
                    hooks.saved(step, checkpoint)
                    run.check_stop(step, checkpoint)
                if flags["stop"]:
                    break
            stage.finish(log, step)
        except (NumericsError, SamplerError) as err:  # say where the run stopped and what is left to resume
            where = f"step {step} (learning rate {stage.policy.lr:g})"
            raise type(err)(numerics_stop(run.path, where, err)) from None
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    model_dir = stage.save(run.path)
    hooks.train_end(step, model_dir)
    return model_dir
