"""The reward contract: None is absent, NaN / exceptions / wrong lengths stop the run naming the culprit."""

from __future__ import annotations

import math

import pytest
import torch

from grpokit.rewards.functions import (
    RewardError,
    build_reward_funcs,
    exact_match,
    format_reward,
    gold_reward,
    overlong_reward,
    score,
)


def test_score_stacks_functions_and_keeps_none_as_nan():
    def half(prompts, completions, **_):
        return [0.5, None, 1]

    out = score(
        [("gold", gold_reward(exact_match)), ("half", half)],
        {"prompts": ["p"] * 3, "completions": ["7", " 7 ", "8"], "answer": ["7", "7", "7"]},
    )
    expected = torch.tensor([[1.0, 0.5], [1.0, math.nan], [0.0, 1.0]])
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(-9), expected.nan_to_num(-9))


def test_nan_reward_names_function_and_sample():
    def broken(prompts, completions, **_):
        return [1.0, float("nan")]

    with pytest.raises(RewardError, match=r"`broken` returned nan for sample 1 \(prompt 'q1', completion 'b'\)"):
        score([("broken", broken)], {"prompts": ["q0", "q1"], "completions": ["a", "b"]})


def test_raising_reward_names_function_and_error():
    def needs_column(prompts, completions, solution, **_):
        return [1.0] * len(completions)

    def raises(completions, **_):
        raise KeyError("solution")

    with pytest.raises(RewardError, match="`needs_column` takes 'solution', which grpokit does not pass"):
        score([("needs_column", needs_column)], {"prompts": ["q"], "completions": ["a"], "answer": ["1"]})
    with pytest.raises(RewardError, match="`raises` raised KeyError: 'solution'"):
        score([("raises", raises)], {"prompts": ["q"], "completions": ["a"]})


def test_wrong_length_and_wrong_type_are_errors():
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        score([("short", lambda completions, **_: [1.0])], {"prompts": ["q", "q"], "completions": ["a", "b"]})
    with pytest.raises(RewardError, match="returned '1' for sample 0"):
        score([("text", lambda completions, **_: ["1"])], {"prompts": ["q"], "completions": ["a"]})


def test_format_reward_matches_whole_stripped_completion():
    fn = format_reward(r"\d+")
    assert fn(prompts=[""] * 4, completions=["42", " 42 ", "42a", ""]) == [1.0, 1.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": c}] for c in ["42", "42a"]]
    assert fn(prompts=[[{"role": "user", "content": "?"}]] * 2, completions=conversational) == [1.0, 0.0]


def test_overlong_reward_dapo_soft_punishment():
    # L_max = 10, buffer 4: no penalty up to 6 tokens, then -(L - 6) / 4, and -1 when truncated
    fn = overlong_reward(10, 4)
    got = fn(
        prompts=[""] * 5,
        completions=[""] * 5,
        completion_lengths=[3, 6, 7, 9, 10],
        truncated=[False, False, False, False, True],
    )
    assert got == [0.0, 0.0, -0.25, -0.75, -1.0]


def test_unknown_reward_name_is_an_import_error_with_the_name():
    with pytest.raises(ValueError, match="'nonexistent_reward'"):
        build_reward_funcs(["nonexistent_reward"], format_pattern=".*", max_completion_length=8, overlong_buffer=2)
    with pytest.raises(ValueError, match="could not be imported"):
        build_reward_funcs(["no_such_module:fn"], format_pattern=".*", max_completion_length=8, overlong_buffer=2)


def test_custom_reward_by_import_path():
    ((name, fn),) = build_reward_funcs(["math:fsum"], format_pattern=".*", max_completion_length=8, overlong_buffer=2)
    assert name == "math:fsum" and fn is math.fsum
