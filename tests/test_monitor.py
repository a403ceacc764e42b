"""The reward-hacking and collapse monitors fire on the patterns they name, with figures, and only then; in a run
their figures reach metrics.jsonl, and a gold reward that scores nothing is said."""

from __future__ import annotations

import math

import pytest
from helpers import config, digit_share, llama, step_rows

from grpokit.data.tasks import build_char_tokenizer
from grpokit.report.monitor import SignalMonitor, group_diversity, pearson
from grpokit.stages.grpo import GRPOTrainer


def test_group_diversity_hand_computed():
    assert group_diversity(["a", "a", "b", "c", "x", "x", "x", "x"], 4) == pytest.approx((3 / 4 + 1 / 4) / 2)


def test_pearson_hand_computed_and_constant_series():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def run(monitor: SignalMonitor, steps: int, metrics_at) -> list[str]:
    raised = []
    for step in range(1, steps + 1):
        raised += monitor.update(step, metrics_at(step))
    return raised


def healthy(step: int) -> dict[str, float]:
    return {"frac_reward_zero_std": 0.3, "completions/clipped_ratio": 0.0, "completions/mean_length": 4.0}


def test_hacking_fires_when_proxy_rises_and_gold_falls():
    monitor = SignalMonitor(long_window=20)

    def metrics(step):  # proxy climbs 0.2 -> 0.8 while gold accuracy slides 0.60 -> 0.48
        return {**healthy(step), "reward": 0.2 + 0.03 * step, "gold/mean": 0.6 - 0.006 * step}

    raised = run(monitor, 20, metrics)
    assert len(raised) == 1 and raised[0].startswith("step 20: proxy reward +0.30 while gold accuracy -6 points")
    assert "likely reward hacking" in raised[0] and "correlation -1.00" in raised[0]
    assert run(monitor, 5, metrics) == []  # once only
    assert monitor.summary()[0].startswith("hacking: FIRED at step 20")


def test_hacking_is_quiet_when_gold_follows_the_proxy():
    monitor = SignalMonitor(long_window=20)

    def metrics(step):
        return {**healthy(step), "reward": 0.2 + 0.03 * step, "gold/mean": 0.2 + 0.03 * step}

    assert run(monitor, 40, metrics) == []
    assert monitor.summary() == [
        "hacking: quiet (proxy reward +0.30 while gold accuracy +30 points over the last 20 steps (correlation +1.00))"
    ]


def test_hacking_is_quiet_when_the_proxy_is_flat_noise():
    monitor = SignalMonitor(long_window=20)
    noise = [0.5, 0.52, 0.49, 0.51] * 10
    assert run(monitor, 40, lambda s: {**healthy(s), "reward": noise[s - 1], "gold/mean": 0.5}) == []


def test_length_drift_fires_against_the_first_window():
    monitor = SignalMonitor(long_window=10)
    raised = run(monitor, 30, lambda s: {**healthy(s), "completions/mean_length": 4.0 if s <= 10 else 9.0})
    assert len(raised) == 1 and "completion length 4.0 -> 6.5 tokens (+62%)" in raised[0]


def test_collapse_needs_both_low_diversity_and_low_entropy():
    def metrics(entropy):
        return lambda s: {**healthy(s), "diversity": 0.125, "entropy": entropy}

    assert run(SignalMonitor(), 12, metrics(0.3)) == []  # identical groups but still uncertain: not collapse
    raised = run(SignalMonitor(), 12, metrics(0.001))
    assert len(raised) == 1 and "mode collapse: within-group diversity 0.12" in raised[0]


def test_kl_drift_fires_above_its_threshold_only():
    assert run(SignalMonitor(), 12, lambda s: {**healthy(s), "kl": 0.2}) == []
    raised = run(SignalMonitor(), 12, lambda s: {**healthy(s), "kl": 2.5})
    assert len(raised) == 1 and "KL to the reference 2.50 nats/token" in raised[0]


def test_no_signal_is_said_at_step_3_when_most_groups_start_flat():
    """The README's `grpokit train examples/grpo_jsonl.yaml --model runs/sft/model --max-steps 12` after a 100-step
    SFT: 50-94% of groups without reward spread, 65% over the first 3 steps, the reward flat at ~0.1, and no word
    before (the first steps' bar was 75%, the window's more than 90% over 10 steps)."""
    monitor = SignalMonitor()
    flat = [0.5, 0.688, 0.75, 0.875, 0.875, 0.938, 0.812, 0.625, 0.625, 0.812, 0.75, 0.562]  # that run's, per step
    raised = run(monitor, len(flat), lambda s: {**healthy(s), "frac_reward_zero_std": flat[s - 1], "reward": 0.105})
    assert len(raised) == 1 and raised[0].startswith(
        "step 3: 65% of groups [frac_reward_zero_std] over the first 3 steps had the same reward for every "
        "completion (this step's mean reward 0.105): their advantages are 0"
    ), raised
    for change in ("num_generations", "temperature", "partial credit", "SFT first", "easier prompts"):
        assert change in raised[0], change
    assert monitor.summary() == [f"no_signal: FIRED at {raised[0]}"]


@pytest.mark.parametrize(
    "start",
    [
        [0.41, 0.38, 0.31],  # `grpokit demo`, seed 0
        [0.19, 0.16, 0.16],  # `grpokit demo --pipeline`: its first GRPO run ...
        [0.34, 0.28, 0.44],  # ... and its second
        [0.54, 0.5, 0.58],  # mean 0.54: just under the first steps' bar
    ],
)
def test_no_signal_is_quiet_on_healthy_starts_and_on_groups_solved_late(start):
    """Late in a run that learned, most groups are flat because every completion is right (the demo reaches 74% over
    3 steps near its end): the first steps' bar does not apply there, so a sliding 3-step window would fail this."""
    late = [0.85, 0.8, 0.9, 0.85, 0.8, 0.9, 0.85, 0.8, 0.9, 0.85] * 3  # mean 0.85: under the window's bar
    flat = start + late
    monitor = SignalMonitor()
    assert run(monitor, len(flat), lambda s: {**healthy(s), "frac_reward_zero_std": flat[s - 1]}) == []
    assert run(SignalMonitor(), 40, healthy) == []


def test_no_signal_is_not_said_where_advantages_come_from_a_critic():
    """PPO's advantages are the critic's (reward minus value, through GAE), not the group's: a group whose
    completions all got one reward still has them, so "their advantages are 0, so they teach nothing" would be
    false. PPO's monitor (`group_advantages=False`) does not say it; GRPO's does, on the same figures."""
    every_group_flat = lambda s: {**healthy(s), "frac_reward_zero_std": 1.0}  # noqa: E731
    assert run(SignalMonitor(group_advantages=False), 20, every_group_flat) == []
    assert len(run(SignalMonitor(), 20, every_group_flat)) == 1


# ---------------------------------------------------------------- in a run


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


def test_a_gold_reward_that_scores_nothing_is_said():
    """`gold/mean` null every step, and no word: the hacking monitor watched nothing."""
    from grpokit.report.monitor import SignalMonitor

    monitor = SignalMonitor()
    warned = monitor.update(1, {"reward": 1.0, "gold/mean": float("nan")}, group_size=2)
    assert any("the gold_reward returned None for every sample" in w for w in warned)
    assert not SignalMonitor().update(1, {"reward": 1.0, "gold/mean": 0.5}, group_size=2)
