"""It learns (DESIGN invariant 10), end to end: the built-in demo's GRPO student beats its SFT self and
its teacher on held-out problems. Seeded; the margins it must clear are the issue's acceptance bar,
and the measured margins are more than twice as large (greedy +68 points over SFT at seed 0).

The runs are made by `run_demo` and `run_pipeline` in tests/demo_runs.py, a process conftest starts before the first
test (`demo_runs`), so that they train while the rest of the suite runs; these tests go last and read their tables
and folders."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_grpo_beats_sft_and_teacher_on_held_out_problems(demo_runs):
    table = demo_runs.table("demo")
    tmp_path = demo_runs.out
    teacher, sft, grpo = table["demonstrator"], table["SFT on demonstrator"], table["SFT + GRPO (gold reward)"]
    for mode in ("greedy", "sampled"):
        assert grpo[mode] >= sft[mode] + 0.25, (mode, table)
        assert grpo[mode] >= teacher[mode] + 0.10, (mode, table)
    # SFT really copied the teacher's flaw: greedy decoding forgets carries, so it trails the teacher
    assert sft["greedy"] < teacher["greedy"]
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    rewards = [row["reward"] for row in rows if "reward" in row]  # step rows (eval rows have eval/ keys only)
    assert sum(rewards[-10:]) / 10 > sum(rewards[:10]) / 10 + 0.2
    assert (tmp_path / "grpo" / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_pipeline_reward_hacking_is_caught_and_gold_grpo_is_not_flagged(demo_runs):
    """The pipeline demo: GRPO against the verbosity-biased reward model raises its proxy reward while gold
    accuracy falls, and the hacking monitor fires; GRPO against the gold checker improves, monitor quiet.

    Seed-robust by design: the reward model also learns the labeler's length preference over every length
    and character the policy can write (`demo.verbosity_pairs`), so longer is the only way up; the GRPO runs
    warm up for 20 steps, so the "start" figures (first 10 steps) measure the SFT model. Measured at seeds
    0-3 (one thread): length 4.0 -> 8.0 tokens, proxy -5.0..-3.1 -> +11.4..+11.9, gold 38-46% -> 0%, the
    gold run's held-out greedy +55..+64 points."""
    table = demo_runs.table("pipeline")
    tmp_path = demo_runs.out
    hacked, gold = table["reward model"], table["gold checker"]
    assert hacked["hacking_fired"] and not gold["hacking_fired"]
    assert hacked["proxy_end"] > hacked["proxy_start"] + 1.0  # the proxy reward climbs ...
    assert hacked["gold_end"] < hacked["gold_start"] - 0.2  # ... while gold accuracy falls
    assert hacked["length_end"] > hacked["length_start"] + 1.0  # by writing longer answers
    assert gold["heldout_end"] >= gold["heldout_start"] + 0.25
    assert (tmp_path / "pipeline.png").stat().st_size > 10_000
