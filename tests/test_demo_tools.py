"""`grpokit demo --tools`, small: SFT on the calculator demonstrator, GRPO raising the calculator's use, and the
control run that trains on the calculator's output tokens.

The small version (about 40 s): 3-digit operands, a 64-wide model, 250 SFT steps at a high rate, 16 GRPO steps. The
demonstrator calls the calculator in 70% of its rows (fewer, and 250 steps did not teach the small model to copy the
result at every seed) and otherwise guesses with every carry forgotten (always wrong: each operand starts with 5 or
more, so the sum always carries out), so only a call can be rewarded. Measured at seeds 0-3: the SFT model calls in
63-77% of its samples, the GRPO model in 83-93% (+16 to +25 points); a tool loop that inserted no result, or a loss
that trained nothing, leaves every reward 0 and the rate where it was. Held-out accuracy is not asserted at this
size: GRPO's greedy accuracy fell at three of those seeds (the small model's copying of the result is fragile);
the full demo's table is in docs/environments.md."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from grpokit.config import ConfigError, DemoConfig
from grpokit.data.tasks import ToolAdditionTask
from grpokit.data.tasks.tool_arithmetic import count_tool_calls, final_answer
from grpokit.demo_tools import run_tools_demo


@pytest.fixture(autouse=True)
def one_thread():
    """Overrides conftest's: the demos pin their own thread count (DemoConfig.num_threads)."""
    yield


def small_config(folder: Path) -> DemoConfig:
    return DemoConfig(
        output_dir=str(folder),
        tools=True,
        hidden_size=64,
        tools_num_digits=3,
        tool_rate=0.7,
        tools_forget_carry=1.0,
        tools_sft_by_turn=False,
        sft_examples=5000,
        tools_sft_steps=250,
        sft_learning_rate=6e-3,
        tools_grpo_steps=16,
        tools_grpo_learning_rate=3e-4,
        tools_prompts_per_step=8,
        num_generations=8,
        num_eval_prompts=100,
        progress=False,
    )


def test_tool_task_reads_the_answer_after_the_last_result():
    task = ToolAdditionTask(num_digits=3, forget_carry=1.0, tool_rate=1.0)
    row = task.rows(1, seed=0)[0]
    demo = task.demonstrate(row, rng=random.Random(0))
    assert demo == task.tool_transcript(row["prompt"]) and len(demo) == task.max_completion_chars
    assert task.is_correct(demo, row["answer"]) and count_tool_calls(demo) == 1
    # the answer is what follows the result: a right result followed by a wrong answer is wrong
    assert not task.is_correct(demo[: -len(row["answer"])] + "000", row["answer"])
    assert final_answer("<calc>1+2</calc><result>3</result>3") == "3"
    assert task.is_correct(row["answer"], row["answer"])  # no call: the whole text is the answer
    a, b = row["prompt"].removesuffix("=").split("+")
    assert min(int(a), int(b)) >= 500 and len(row["answer"]) == 4  # every sum has 4 digits, the first a 1
    # a guess is the addition task's: with every carry forgotten, the digit sums and a leading 0 (always wrong here)
    guess = ToolAdditionTask(num_digits=3, forget_carry=1.0, tool_rate=0.0).demonstrate(row, random.Random(0))
    assert guess == "0" + "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b))
    assert not task.is_correct(guess, row["answer"])


def test_turn_rows_keep_the_result_out_of_every_target():
    task = ToolAdditionTask(num_digits=3, forget_carry=0.5, tool_rate=0.5)
    problems = task.rows(40, seed=0)
    rows = task.turn_rows(problems, random.Random(0))
    calls = [r for r in rows if r["completion"].startswith("<calc>")]
    answers = [r for r in rows if "</result>" in r["prompt"]]
    assert len(rows) == len(problems) + len(calls) and len(answers) == len(calls) > 0
    for row in rows:
        assert "<result>" not in row["completion"] and row["completion"]
    for call, answer in zip(calls, answers):  # the answer's row continues the call's problem, the result as context
        assert answer["prompt"] == call["prompt"] + call["completion"] + f"<result>{int(call['answer'])}</result>"
        assert answer["completion"] == str(int(call["answer"]))


def test_demo_tools_config_refuses_two_demos_at_once():
    with pytest.raises(ConfigError, match="tools"):
        DemoConfig(tools=True, pipeline=True).validate()
    with pytest.raises(ConfigError, match="tool_rate"):
        DemoConfig(tools=True, tool_rate=1.5).validate()
    with pytest.raises(ConfigError, match="never calls the calculator"):  # nothing for GRPO to reinforce
        DemoConfig(tools=True, tool_rate=0.0).validate()


@pytest.mark.slow
def test_grpo_raises_tool_use_and_the_control_trains_on_the_tool_output(tmp_path):
    table = run_tools_demo(small_config(tmp_path))
    sft, grpo = table["SFT on demonstrator"], table["SFT + GRPO"]
    assert 0.4 <= sft["calls_sampled"] <= 0.9, table  # SFT copied both habits
    assert grpo["calls_sampled"] >= sft["calls_sampled"] + 0.1, table

    # Both GRPO runs start from the same SFT model with the same seed: their first rollouts are the same, and they
    # differ in what is trained: the control also trains on each call's <result>...</result> (17 tag tokens + the sum)
    def first_step(run: str) -> dict:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        return next(r for r in rows if "reward" in r)

    masked, control = first_step("grpo"), first_step("grpo_unmasked")
    assert masked["reward"] == control["reward"] and masked["tools/rows_with_calls"] == control["tools/rows_with_calls"]
    calls = masked["tools/call_frequency"]
    assert calls > 0.2
    inserted = control["completions/mean_length"] - masked["completions/mean_length"]  # trained tokens per row
    assert inserted >= calls * (len("<result></result>") + 1), (inserted, calls)

    record = json.loads((tmp_path / "tools_table.json").read_text())
    assert record["table"] == table and record["config"]["tools_num_digits"] == 3
    assert (tmp_path / "tools.png").stat().st_size > 10_000
