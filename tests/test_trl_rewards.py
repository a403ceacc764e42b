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


def test_the_documented_reward_functions_get_what_trl_passes_and_are_weighted(model, tmp_path):
    """TRL's reward-function examples, as its docs write them, on conversational prompts: a `<think>/<answer>` format
    check on the message's content, a length reward on `completion_ids`, a `\\boxed{}` check against a data set
    column reached through its name; three functions with `reward_weights`. Each logged mean is the mean of what
    that function returned, and `reward` their weighted sum."""
    import re

    returned = defaultdict(list)  # function name -> every value it returned

    def format_reward_func(completions, **kwargs):
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        contents = [completion[0]["content"] for completion in completions]
        returned["format_reward_func"] += [1.0 if re.match(pattern, c) else 0.0 for c in contents]
        return returned["format_reward_func"][-len(contents) :]

    def length_reward(completion_ids, **kwargs):
        assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in completion_ids)
        returned["length_reward"] += [float(len(ids)) for ids in completion_ids]
        return returned["length_reward"][-len(completion_ids) :]

    def boxed_reward(completions, ground_truth, **kwargs):
        matches = [re.search(r"\\boxed\{(.*?)\}", c[0]["content"]) for c in completions]
        contents = [m.group(1) if m else "" for m in matches]
        # each completion gets its own prompt's column value: ground truth "i" for the prompt asking about i
        prompts = kwargs["prompts"]
        assert [p[-1]["content"] for p in prompts] == [f"what is {g}?" for g in ground_truth]
        returned["boxed_reward"] += [1.0 if c == g else 0.0 for c, g in zip(contents, ground_truth)]
        return returned["boxed_reward"][-len(completions) :]

    data = [{"prompt": [{"role": "user", "content": f"what is {i}?"}], "ground_truth": str(i)} for i in range(8)]
    trainer = GRPOTrainer(
        model=str(model), reward_funcs=[format_reward_func, length_reward, boxed_reward],
        args=args(tmp_path, max_steps=2, reward_weights=[1.0, 0.5, 2.0]), train_dataset=data,
    )  # fmt: skip
    trainer.train()
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    per_step = 4  # per_device_train_batch_size completions per generation batch
    for i, row in enumerate(rows):
        means = {}
        for name in ("format_reward_func", "length_reward", "boxed_reward"):
            values = returned[name][i * per_step : (i + 1) * per_step]
            means[name] = sum(values) / len(values)
            assert row[f"rewards/{name}/mean"] == pytest.approx(means[name])
        weighted = means["format_reward_func"] + 0.5 * means["length_reward"] + 2.0 * means["boxed_reward"]
        assert row["reward"] == pytest.approx(weighted)
    assert min(returned["length_reward"]) >= 1.0  # a completion holds at least its EOS or one sampled token


def test_trls_own_reward_functions_run_through_the_adapter(model, tmp_path):
    """`trl.rewards.think_format_reward` and `get_soft_overlong_punishment` (TRL's own code) as reward_funcs."""
    rewards = pytest.importorskip("trl.rewards")
    data = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(8)]
    overlong = rewards.get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
    trainer = GRPOTrainer(
        model=str(model), reward_funcs=[rewards.think_format_reward, overlong],
        args=args(tmp_path, max_steps=1, reward_weights=[1.0, 1.0]), train_dataset=data,
    )  # fmt: skip
    trainer.train()
    (row,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward" in r]
    assert row["rewards/think_format_reward/mean"] == 0.0  # a random tiny model writes no <think> block
    assert -1.0 <= row[f"rewards/{overlong.__name__}/mean"] <= 0.0
