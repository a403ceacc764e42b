"""Regression tests for the places where copies of the policy machinery had drifted apart before
`grpokit.policy.Policy` took over the one optimizer step shared by GRPO, SFT and reward-model training.

Each test fails on the old behaviour, described in its docstring, and pins the required one."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import HIDDEN, config, digit_share, read_jsonl, step_rows

from grpokit import algo
from grpokit.config import ConfigError, SFTConfig
from grpokit.monitor import pearson
from grpokit.optim import lr_factor
from grpokit.run_setup import stage_policy
from grpokit.sft import train_sft
from grpokit.tasks import AdditionTask, build_char_tokenizer, tiny_model
from grpokit.trainer import GRPOTrainer


def llama():
    return tiny_model(build_char_tokenizer(), "llama", hidden_size=HIDDEN, seed=0)


def sft_rows(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": r["prompt"], "completion": r["answer"]} for r in AdditionTask().rows(n, seed=1)]


def sft_config(out, **overrides) -> SFTConfig:
    """An SFT config for a model and rows passed in: no model path, no task, no data file."""
    values = {
        "model": "",
        "task": None,
        "train_data": None,
        "output_dir": str(out),
        "batch_size": 4,
        "max_completion_length": 8,
        "device": "cpu",
        "progress": False,
        "seed": 0,
    }
    return SFTConfig(**{**values, **overrides})


# ---------------------------------------------------------------- 1. SFT logs the rate the step used


def test_sft_logs_the_learning_rate_its_step_used(tmp_path):
    """Old: SFT read the rate after `scheduler.step()`, so step 10 logged step 11's warm-up rate (11/20)."""
    out = tmp_path / "sft"
    cfg = sft_config(out, warmup_steps=20, lr_schedule="constant", max_steps=20, learning_rate=1e-3)
    train_sft(cfg, model=llama(), tokenizer=build_char_tokenizer(), rows=sft_rows())

    logged = {row["step"]: row["learning_rate"] for row in read_jsonl(out / "metrics.jsonl") if "learning_rate" in row}
    assert sorted(logged) == [10, 20]  # SFT logs every 10 steps and the last

    def expected(step: int) -> float:  # step is 1-based; lr_factor takes the 0-based optimizer step index
        return cfg.learning_rate * lr_factor(step - 1, warmup_steps=20, total_steps=20, schedule="constant")

    assert expected(10) == pytest.approx(cfg.learning_rate * 10 / 20)  # still warming up: the off-by-one shows
    assert logged[10] == pytest.approx(expected(10), rel=1e-12)
    assert logged[10] != pytest.approx(cfg.learning_rate * 11 / 20, rel=1e-6)  # the old, one-step-late value
    assert logged[20] == pytest.approx(expected(20), rel=1e-12)
    assert logged[20] == pytest.approx(cfg.learning_rate)


# ---------------------------------------------------------------- 2. clipping sees trainable parameters only


def test_optimizer_step_clips_and_reports_the_trainable_gradients_only(tmp_path):
    """Old: SFT and the reward model clipped ALL parameters, so a frozen parameter's stale gradient entered
    the norm (and shrank the trainable gradients' clip factor)."""
    model = llama()
    frozen = model.model.norm.weight  # the final RMSNorm: a parameter of its own, not tied to anything
    frozen.requires_grad_(False)
    cfg = sft_config(tmp_path / "unused", max_grad_norm=1.0)
    policy = stage_policy(model, cfg, total_steps=1, device=torch.device("cpu"), dtype=torch.float32)

    trainable = policy.trainable_parameters()
    assert trainable and all(p is not frozen for p in trainable)
    for i, p in enumerate(trainable):
        p.grad = torch.full_like(p, 0.01 * (i % 3 + 1))
    frozen.grad = torch.full_like(frozen, 100.0)  # stale, far larger than everything trainable together
    frozen_before = frozen.detach().clone()
    expected_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in trainable))
    with_frozen = math.sqrt(expected_norm**2 + float(frozen.grad.double().pow(2).sum()))
    assert expected_norm > cfg.max_grad_norm  # clipping must act, so its factor is observable
    assert with_frozen > 10 * expected_norm

    seen = []  # the trainable gradients AdamW steps with, i.e. after clipping
    policy.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([p.grad.detach().clone() for p in trainable])
    )
    before = [p.detach().clone() for p in trainable]
    grad_norm = policy.optimizer_step()

    assert grad_norm == pytest.approx(expected_norm, rel=1e-5)
    clipped_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in seen[0]))
    assert clipped_norm == pytest.approx(cfg.max_grad_norm, rel=1e-5)  # scaled by max_norm / trainable norm
    assert torch.equal(frozen, frozen_before)
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))  # the step did happen


# ---------------------------------------------------------------- 3. train_sft gives a passed tokenizer a pad token


def test_train_sft_gives_a_passed_tokenizer_without_pad_a_pad_token(tmp_path):
    """Old: `train_sft` used a tokenizer passed in as it was, so one without a pad token could not pad."""
    model = llama()  # built from a tokenizer that has its pad token
    tok = build_char_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    out = tmp_path / "sft"
    train_sft(sft_config(out, max_steps=2), model=model, tokenizer=tok, rows=sft_rows())

    assert tok.pad_token_id == tok.eos_token_id
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row] == [2]
    assert (out / "model" / "config.json").is_file()


# ---------------------------------------------------------------- 4. the monitor's figures reach metrics.jsonl


def test_monitor_figures_are_in_the_logged_rows(tmp_path):
    """Old: the monitor added its figures to the metrics after the row was written, so they never reached
    metrics.jsonl."""
    out = tmp_path / "run"
    cfg = config("in-memory", out, max_steps=3, monitor_window=2, gold_reward="accuracy")
    trainer = GRPOTrainer(
        cfg, model=llama(), tokenizer=build_char_tokenizer(), reward_funcs=[("digit_share", digit_share)]
    )
    trainer.train()

    rows = step_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows[1:]:
        assert "monitor/length_drift" in row and "monitor/proxy_gold_corr" in row, row
        assert math.isfinite(row["monitor/length_drift"]) and math.isfinite(row["monitor/proxy_gold_corr"])
    # the logged figures are the ones the logged metrics give (window 2, baseline = the first full window)
    lengths = [r["completions/mean_length"] for r in rows]
    baseline = (lengths[0] + lengths[1]) / 2
    assert rows[1]["monitor/length_drift"] == pytest.approx(0.0, abs=1e-12)
    assert rows[2]["monitor/length_drift"] == pytest.approx(((lengths[1] + lengths[2]) / 2 - baseline) / baseline)
    for i in (1, 2):
        proxy = [rows[j]["reward"] for j in (i - 1, i)]
        gold = [rows[j]["gold/mean"] for j in (i - 1, i)]
        assert rows[i]["monitor/proxy_gold_corr"] == pytest.approx(pearson(proxy, gold))


# ---------------------------------------------------------------- 5. one definition of "no reward spread"


def from_rewards(values: list[float | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, scorable) as the trainer builds them from one reward function (None = unscorable)."""
    rewards = torch.tensor([[math.nan if v is None else v] for v in values])  # (N, 1)
    return algo.combine_rewards(rewards, torch.ones(1))


@pytest.mark.parametrize("scale", sorted(algo.ADVANTAGE_SCALES))
def test_flat_groups_leave_unscorable_rows_out(scale):
    """Old: the metric took std == 0 over totals, where an unscorable row counts as 0, so [1, 1, None, 1]
    was "spread" for the metric while its advantages were all 0."""
    G = 4
    total, scorable = from_rewards([1.0, 1.0, None, 1.0] + [0.0, 0.0, None, 1.0] + [None] * 4)
    flat = algo.flat_groups(total, scorable, group_size=G)
    assert flat.tolist() == [True, False, True]
    adv = algo.advantages(total, scorable, group_size=G, scale=scale).reshape(-1, G)
    assert torch.equal(adv[0], torch.zeros(G))
    assert torch.equal(adv[2], torch.zeros(G))
    assert adv[1, 2] == 0  # the unscorable row
    assert bool((adv[1] != 0).any())


@pytest.mark.parametrize("seed", range(5))
def test_flat_groups_are_exactly_the_groups_with_zero_advantages(seed):
    """For random totals and scorable masks, `flat_groups` marks exactly the groups whose advantages are all
    0, for every advantage scale."""
    G, P = 4, 64
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.1, 0.2, 0.7])  # few values, so ties and flat groups are common; 0.1 does not round
    total = values[torch.randint(0, 3, (P * G,), generator=g)]
    scorable = torch.rand(P * G, generator=g) < 0.7
    total = torch.where(scorable, total, 0.0)  # as combine_rewards leaves an unscorable row
    flat = algo.flat_groups(total, scorable, group_size=G)
    assert flat.dtype == torch.bool and flat.shape == (P,)
    assert 0 < int(flat.sum()) < P  # both kinds occur, so the comparison below means something
    for scale in algo.ADVANTAGE_SCALES:
        adv = algo.advantages(total, scorable, group_size=G, scale=scale).reshape(P, G)
        all_zero = (adv == 0).all(-1)
        assert torch.equal(flat, all_zero), scale


def test_step_counts_groups_flat_over_their_scorable_rows(tmp_path):
    """End to end: one None per group and the same non-zero reward elsewhere is no spread at all. The old
    metric counted the None as 0 (std > 0 over [0, 1, 1, 1]) and reported 0.0."""
    G = 4

    def one_none_per_group(prompts, completions, **_):
        return [None if i % G == 0 else 1.0 for i in range(len(completions))]

    cfg = config("in-memory", tmp_path / "run", max_steps=1, prompts_per_step=2, num_generations=G)
    trainer = GRPOTrainer(
        cfg, model=llama(), tokenizer=build_char_tokenizer(), reward_funcs=[("one_none", one_none_per_group)]
    )
    metrics, samples = trainer.step()
    assert metrics["frac_reward_zero_std"] == 1.0
    assert samples and all(s["advantage"] == 0.0 for s in samples)


# ---------------------------------------------------------------- 6. rows passed in need no task or train_data


def test_rows_passed_in_need_neither_task_nor_train_data(tmp_path):
    """Old: validation demanded exactly one of `task` and `train_data` even when rows were handed in."""
    rows = AdditionTask().rows(8, seed=3)
    out = tmp_path / "run"
    cfg = config("in-memory", out, task=None, max_steps=1)
    assert cfg.task is None and cfg.train_data is None
    trainer = GRPOTrainer(
        cfg,
        model=llama(),
        tokenizer=build_char_tokenizer(),
        reward_funcs=[("digit_share", digit_share)],
        train_dataset=rows,
    )
    trainer.train()

    assert [r["step"] for r in step_rows(out)] == [1]
    logged_prompts = {c["prompt"] for c in read_jsonl(out / "completions.jsonl")}
    assert logged_prompts and logged_prompts <= {r["prompt"] for r in rows}  # it trained on the rows passed in


def test_train_data_and_rows_passed_in_is_a_config_error(tmp_path):
    out = tmp_path / "run"
    cfg = config("in-memory", out, task=None, train_data=str(tmp_path / "train.jsonl"), max_steps=1)
    with pytest.raises(ConfigError, match="`train_data`"):
        GRPOTrainer(
            cfg,
            model=llama(),
            tokenizer=build_char_tokenizer(),
            reward_funcs=[("digit_share", digit_share)],
            train_dataset=AdditionTask().rows(8, seed=3),
        )
    assert not out.exists()
