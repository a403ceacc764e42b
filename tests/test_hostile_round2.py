"""Cases the second hostile round (on the merged issue-19 code, dedbcd7) found, each fixed at its root."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny

from grpokit.trl import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def addition_rows(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)]


def exact(completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_reward_weights_count_the_reward_functions_handed_to_the_trainer(model, tmp_path):
    """A name and a function in one list with two weights: the weights count the functions handed in, not the
    config's default `reward_funcs` (it used to say "2 entries for 1 reward_funcs")."""
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no", reward_weights=[1.0, 0.5],
    )  # fmt: skip
    trainer = GRPOTrainer(model=str(model), reward_funcs=["accuracy", exact], args=args, train_dataset=addition_rows())
    trainer.train()
    assert trainer.trainer.rewards.names == ["accuracy", "exact"]
    assert trainer.trainer.rewards.weights.tolist() == [1.0, 0.5]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/exact/mean" in rows[-1]
