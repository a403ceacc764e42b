"""Reward functions as TRL's documentation writes them, run with only the import line changed: a curriculum reward
that reads `trainer_state.global_step`, and an async reward function."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from helpers import read_jsonl, save_tiny

from grpokit.trl import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def dataset():
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]


def args(out, **fields):
    return GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        use_cpu=True, report_to="none", save_strategy="no", **fields,
    )  # fmt: skip


def test_a_curriculum_reward_reads_the_trainer_state(model, tmp_path):
    """TRL's curriculum example: a length penalty that grows with training. TRL scores a batch before its optimizer
    step, so the steps seen are those completed before it: 0, 1, 2 (one optimizer step per generation batch)."""
    seen = []

    def curriculum_reward(completions, trainer_state, **kwargs):
        seen.append(trainer_state.global_step)
        weight = trainer_state.global_step / trainer_state.max_steps
        return [-weight * len(c) for c in completions]

    trainer = GRPOTrainer(model=str(model), reward_funcs=curriculum_reward, args=args(tmp_path, max_steps=3),
                          train_dataset=dataset())  # fmt: skip
    trainer.train()
    assert seen == [0, 1, 2]
    assert trainer.trainer.state.global_step == 3 and trainer.trainer.state.max_steps == 3


def test_async_reward_functions_are_awaited_together(model, tmp_path):
    """TRL's async example: rewards that await something (a judge over the network; here each other), run
    concurrently in one event loop: each waits for the other to have started, at every step."""
    started = defaultdict(lambda: (asyncio.Event(), asyncio.Event()))  # step -> (the judge's, the length's)

    async def async_judge(completions, answer, trainer_state, log_metric, **kwargs):
        judge, length = started[trainer_state.global_step]
        judge.set()
        await length.wait()
        log_metric("judge/calls", 1.0)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    async def async_length(completions, trainer_state, **kwargs):
        judge, length = started[trainer_state.global_step]
        length.set()
        await judge.wait()
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(model=str(model), reward_funcs=[async_judge, async_length],
                          args=args(tmp_path, max_steps=2), train_dataset=dataset())  # fmt: skip
    trainer.train()
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 2 and all(r["judge/calls"] == 1.0 and r["rewards/async_length/mean"] > 0 for r in steps)
