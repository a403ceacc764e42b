"""TRL's reward contract beyond the data: `trainer_state` (the run's transformers.TrainerState, counted as TRL counts
it, resumed with the run), `log_metric` / `log_extra` (to metrics.jsonl, TensorBoard, W&B and completions.jsonl;
collisions refused; reduced over ranks as TRL reduces them) and `async def` reward functions (awaited concurrently in
one event loop, each call checked and timed as a plain one is)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import config, read_jsonl, save_tiny, step_rows

from grpokit.rewards.functions import RewardError, RewardLogs, score
from grpokit.stages.grpo import GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def length(completions, **_):
    return [float(len(c)) for c in completions]


BATCH = {"prompts": ["p", "p", "q"], "completions": ["a", "bb", "ccc"]}

# ---------------------------------------------------------------- trainer_state


def test_trainer_state_counts_optimizer_steps_before_each_batch_and_epochs_over_the_prompts(model, tmp_path):
    """As TRL 1.16 counts: a batch's rewards see the optimizer steps completed before it (2 per generation step
    here, num_iterations = 2), max_steps the run's optimizer steps, epoch the share of the training prompts sampled.
    A function that neither names `trainer_state` nor takes **kwargs does not get it."""
    seen = []

    def curriculum(completions, trainer_state):
        seen.append((trainer_state.global_step, trainer_state.epoch, trainer_state.max_steps))
        return [float(len(c)) for c in completions]

    def plain(completions):  # called with `completions` alone: an unexpected keyword would be a TypeError
        return [1.0] * len(completions)

    cfg = config(model, tmp_path / "run", max_steps=3, num_iterations=2, num_train_prompts=8)  # 2 prompts a step
    trainer = GRPOTrainer(cfg, reward_funcs=[curriculum, plain])
    trainer.train()
    assert seen == [(0, 0.0, 6), (2, 0.25, 6), (4, 0.5, 6)]
    from transformers import TrainerState

    assert type(trainer.state) is TrainerState
    assert (trainer.state.global_step, trainer.state.epoch, trainer.state.max_steps) == (6, 0.75, 6)


def test_a_resumed_run_s_rewards_see_the_step_numbers_of_the_straight_run(model, tmp_path):
    def run(out, reward, **overrides):
        return GRPOTrainer(config(model, out, max_steps=4, save_every=2, **overrides), reward_funcs=[("steps", reward)])

    def recording(into, fail_at=None):
        def steps(completions, trainer_state, **_):
            if trainer_state.global_step == fail_at:
                raise ConnectionError("reward backend unreachable")
            into.append((trainer_state.global_step, trainer_state.epoch))
            return [float(len(c)) for c in completions]

        return steps

    straight, crashed, resumed = [], [], []
    run(tmp_path / "straight", recording(straight)).train()
    with pytest.raises(RewardError, match=r"`steps` raised ConnectionError"):
        run(tmp_path / "crashed", recording(crashed, fail_at=3)).train()  # after checkpoint-2
    run(tmp_path / "crashed", recording(resumed), resume_from_checkpoint="latest").train()
    assert crashed == straight[:3] and resumed == straight[2:] and [s for s, _ in straight] == [0, 1, 2, 3]


# ---------------------------------------------------------------- log_metric, log_extra


def test_logged_metrics_and_columns_reach_metrics_jsonl_tensorboard_wandb_and_the_completions(
    model, tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def judged(completions, log_metric, log_extra, **_):
        digits = [sum(ch.isdigit() for ch in c) for c in completions]
        log_metric("judge/digits", sum(digits) / len(digits))
        log_metric("judge/digits", 0.0)  # twice in a step: the step's value is the mean of the two
        log_extra("digits", digits)
        return [float(d) for d in digits]

    out = tmp_path / "run"
    cfg = config(model, out, max_steps=2, tensorboard=True, wandb=True, log_completions_every=1)
    GRPOTrainer(cfg, reward_funcs=judged).train()
    rows = step_rows(out)
    assert [r["judge/digits"] for r in rows] == pytest.approx([r["rewards/judged/mean"] / 2 for r in rows])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("judge/digits")] == pytest.approx([r["judge/digits"] for r in rows])
    from test_run_log import wandb_history

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [h["judge/digits"] for h in wandb_history(run_file) if "judge/digits" in h]
    assert logged == pytest.approx([r["judge/digits"] for r in rows]) and wandb is not None
    samples = read_jsonl(out / "completions.jsonl")
    assert samples and all(s["digits"] == sum(ch.isdigit() for ch in s["completion"]) for s in samples)


def test_a_metric_of_a_name_grpokit_logs_is_refused_naming_the_function(model, tmp_path):
    """TRL averages a reward's `reward` into its own `reward` figure; grpokit refuses it."""

    def shadows(completions, log_metric, **_):
        log_metric("reward", 5.0)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"`shadows` logged the metric 'reward' \(log_metric\), a name grpokit logs"):
        GRPOTrainer(config(model, tmp_path / "run", max_steps=1), reward_funcs=shadows).step()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda log: log["log_metric"]("eval/accuracy", 1.0), r"logged the metric 'eval/accuracy': grpokit's own"),
        (lambda log: log["log_metric"]("m", "high"), r"logged 'high' as the metric 'm'; expected one number"),
        (lambda log: log["log_extra"]("completion", [1, 2, 3]), r"log_extra\('completion', ...\): a column is text"),
        (lambda log: log["log_extra"]("c", [1, 2]), r"logged 2 values in the column 'c' for 3 completions"),
        (lambda log: log["log_extra"]("c", [1, 2, object()]), r"logged object .* in the column 'c' \(sample 2\)"),
        (lambda log: [log["log_extra"]("c", [1, 2, 3]) for _ in range(2)], r"`f` logged the column 'c', which `f`"),
    ],
)
def test_what_a_reward_logs_is_checked_naming_the_function(call, message):
    def f(completions, **kwargs):
        call(kwargs)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=message):
        score([("f", f)], BATCH)


def test_logged_values_reduce_over_ranks_as_trl_reduces_them():
    """Each metric: the sum over the count of every call on every rank; a column: every rank's rows in rank order,
    None where a rank did not log it."""
    rank0, rank1 = RewardLogs(2), RewardLogs(3)
    rank0.callables("f")["log_metric"]("m", 1.0)
    rank0.callables("f")["log_metric"]("m", 2.0)
    rank1.callables("f")["log_metric"]("m", 6.0)
    rank1.callables("g")["log_extra"]("c", ["x", "y", "z"])
    sent: list = []
    rank1.reduce(lambda mine: sent.extend(mine) or mine)  # what rank 1 hands the gather
    logged = rank0.reduce(lambda mine: mine + sent)  # rank 0's view of the gather: its own part first
    assert logged.metrics == {"m": 3.0}
    assert logged.extras == {"c": [None, None, "x", "y", "z"]} and logged.owners == {"m": "f", "c": "g"}


# ---------------------------------------------------------------- async reward functions


def waiting_on_each_other():
    """Two async rewards that each wait for an event the other sets: they finish only if they run concurrently."""
    first_ran, second_ran = asyncio.Event(), asyncio.Event()

    async def first(completions, **_):
        first_ran.set()
        await second_ran.wait()
        completions.clear()  # its own copy: the second still gets every completion
        return [1.0] * 3

    async def second(completions, **_):
        second_ran.set()
        await first_ran.wait()
        return [float(len(c)) for c in completions]

    return [("first", first), ("sync", length), ("second", second)]


def test_async_rewards_of_a_batch_run_concurrently_each_with_its_own_inputs():
    scores = score(waiting_on_each_other(), BATCH, timeout=60)  # (the timeout: a sequential run fails, not hangs)
    assert scores.tolist() == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 3.0, 3.0]]


def test_async_rewards_run_where_an_event_loop_runs_already_as_in_a_notebook():
    async def notebook_cell():
        return score(waiting_on_each_other(), BATCH, timeout=60)

    assert asyncio.run(notebook_cell()).tolist() == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 3.0, 3.0]]


async def quick(completions, **_):
    return [0.0] * len(completions)


async def broken(completions, **_):
    raise ValueError("no judge")


async def awaits_for_ever(completions, **_):
    await asyncio.Event().wait()


async def blocks_the_loop(completions, **_):
    threading.Event().wait()  # never set: holds the event loop's thread


async def too_few(completions, **_):
    return [1.0]


@pytest.mark.parametrize("where", ["main thread", "running loop"])
@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (broken, r"reward function `broken` raised ValueError: no judge"),
        (awaits_for_ever, r"reward function `awaits_for_ever` did not return within reward_timeout = 0.5 s"),
        (blocks_the_loop, r"reward function `blocks_the_loop` did not return within reward_timeout = 0.5 s"),
        (too_few, r"reward function `too_few` returned 1 values for 3 completions"),
    ],
)
def test_an_async_reward_that_raises_runs_late_or_answers_wrong_is_stopped_and_named(fn, message, where):
    def call():
        return score([("quick", quick), (fn.__name__, fn)], BATCH, timeout=0.5)

    async def in_a_loop():
        return call()

    with pytest.raises(RewardError, match=message):
        call() if where == "main thread" else asyncio.run(in_a_loop())
    assert score([("quick", quick)], BATCH, timeout=0.5).tolist() == [[0.0]] * 3  # the loop serves the next batch
