"""The reward-hacking and collapse monitors fire on the patterns they name, with figures, and only then."""

from __future__ import annotations

import pytest

from grpokit.monitor import SignalMonitor, group_diversity, pearson


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
