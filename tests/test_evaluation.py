"""Held-out evaluation and `grpokit eval`: each reward function's mean, greedy and sampled; any data file with any
reward functions; the JSONL example's held-out rows; answer lists (a reward of the user's own reads them, the
accuracy reward cannot compare them); and settings that would do nothing (eval_every without held-out rows, a task
beside eval data, the task's digits with a data file)."""

from __future__ import annotations

import json
import re
import types
import warnings
from pathlib import Path

import pytest
from helpers import cli_run, config, module_level_reward, save_tiny, text_rows, tiny_run_args

from grpokit.cli import main
from grpokit.config import GRPOConfig, load_yaml
from grpokit.stages.grpo import GRPOTrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


cli = cli_run


def accepted_answers(completions, answer, **_):
    """A reward of the user's own: `answer` is a list of accepted answers."""
    return [float(c.strip() in accepted) for c, accepted in zip(completions, answer)]


def rows_with_answer_lists() -> list[dict]:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    for i in (1, 5):
        rows[i]["answer"] = [str(i + 1), f"0{i + 1}"]
    return rows


# ---------------------------------------------------------------- the reward functions' means, greedy and sampled


def test_eval_reports_each_reward_mean_greedy_and_sampled(tmp_path, model):
    from grpokit.rollout.evaluate import completions_for

    eval_rows = [{"prompt": f"{i}+{i}="} for i in range(6)]  # no `answer`: accuracy has nothing to check
    cfg = config(model, tmp_path / "run", num_eval_prompts=6)
    trainer = GRPOTrainer(cfg, reward_funcs=module_level_reward, train_dataset=text_rows(), eval_dataset=eval_rows)
    result = trainer.evaluate(0)
    assert not any("accuracy" in key for key in result)
    greedy = completions_for(
        trainer.sampler, trainer.tokenizer, [r["prompt"] for r in eval_rows], temperature=0.0,
        max_new_tokens=cfg.max_completion_length, seed=cfg.seed,
    )  # fmt: skip
    expected = sum(len(c) for c in greedy) / len(greedy)
    assert result["eval/rewards/module_level_reward/mean_greedy"] == pytest.approx(expected)
    assert result["eval/reward_greedy"] == pytest.approx(expected)  # one function, weight 1
    assert "eval/rewards/module_level_reward/mean_sampled" in result and "eval/reward_sampled" in result


def test_grpokit_eval_takes_any_data_file_and_reward_functions(tmp_path, model, capsys):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(4)))
    assert main(["eval", "--model", str(model), "--eval-data", str(data), "--reward-funcs", "format"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"held_out.jsonl held-out accuracy, greedy: \d+\.\d% of 4", out), out
    assert re.search(r"held_out.jsonl held-out rewards/format, sampled \(T=1\): [01]\.\d{4} \(mean of 4\)", out), out


def test_the_jsonl_example_evaluates_held_out_rows_without_a_warning(monkeypatch):
    from grpokit.data.rows import InputWarning, grpo_rows

    monkeypatch.chdir(ROOT)  # the README runs it from the repository's root
    cfg = load_yaml(GRPOConfig, ROOT / "examples" / "grpo_jsonl.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        train_rows, eval_rows = grpo_rows(
            None, None, None, train_data=cfg.train_data, eval_data=cfg.eval_data, seed=cfg.seed,
            num_train_prompts=cfg.num_train_prompts, num_eval_prompts=cfg.num_eval_prompts,
            prompt_column=cfg.prompt_column,
        )  # fmt: skip
    assert len(eval_rows) == cfg.num_eval_prompts == 64
    assert not {r["prompt"] for r in eval_rows} & {r["prompt"] for r in train_rows}  # held out, not trained on


# ---------------------------------------------------------------- answer lists


def test_answer_lists_for_a_users_reward_are_left_out_of_held_out_accuracy(tmp_path, model, monkeypatch):
    from helpers import config

    from grpokit.data.rows import InputWarning, answer_check
    from grpokit.stages.grpo import GRPOTrainer

    compared = []

    def is_correct(completion, answer):
        compared.append(answer)
        return True

    with pytest.warns(InputWarning, match=r"eval data.*row 1: column 'answer' is list.*2 of 8 held-out rows are left"):
        trainer = GRPOTrainer(
            config(model, tmp_path / "run", num_eval_prompts=8),
            train_dataset=rows_with_answer_lists(),
            eval_dataset=rows_with_answer_lists(),
            reward_funcs=[accepted_answers],
        )
    # (the built-in tasks' check: `answer_check` of their is_correct) records what it compares
    monkeypatch.setattr(trainer, "task", types.SimpleNamespace(check=answer_check(is_correct)))
    result = trainer.evaluate(0)
    assert result["eval/accuracy_greedy"] == 1.0  # over the 6 rows with a text answer
    assert sorted(set(compared)) == sorted(str(i + 1) for i in (0, 2, 3, 4, 6, 7))
    assert "eval/rewards/accepted_answers/mean_greedy" in result


def test_answer_lists_are_refused_where_the_accuracy_reward_compares_them(tmp_path):
    from helpers import config

    from grpokit.data.rows import DataError
    from grpokit.stages.grpo import GRPOTrainer

    with pytest.raises(DataError, match=r"eval data.*row 1: column 'answer' is list.*compares the completion"):
        GRPOTrainer(
            config("never-loaded-model", tmp_path / "run", num_eval_prompts=8, gold_reward="accuracy"),
            train_dataset=[{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)],
            eval_dataset=rows_with_answer_lists(),
            reward_funcs=[accepted_answers],
        )


def test_eval_refuses_answer_lists_where_the_accuracy_reward_compares_them(tmp_path, model, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows_with_answer_lists()))
    rc = main(["eval", "--model", str(model), "--eval-data", str(data), "--reward-funcs", "accuracy"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "grpokit eval: error:" in err and "row 1: column 'answer' is list" in err and "Traceback" not in err


# ---------------------------------------------------------------- settings that would do nothing


def test_eval_every_with_no_held_out_row_names_num_eval_prompts(model, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    rc, err = cli(capsys, "train", *tiny_run_args(model, tmp_path / "out", "--eval-data", data, "--eval-every", "1",
                                                   "--num-eval-prompts", "0"))  # fmt: skip
    assert rc == 2 and "`eval_every` is 1, but num_eval_prompts is 0" in err, err


def test_eval_with_both_a_task_and_eval_data_is_refused(model, tmp_path, capsys):
    """`--task addition --eval-data F` scored F and ignored the task, with no word."""
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    rc, err = cli(capsys, "eval", "--model", model, "--task", "addition", "--eval-data", data)
    assert rc == 2 and "config field `task` ('addition') and `eval_data`" in err and "give one" in err, err


def test_eval_task_digits_with_eval_data_and_chat_prompts_without_a_user_turn_are_said(model, tmp_path, capsys):
    from grpokit.data.rows import scan_prompts
    from grpokit.data.tasks.tokenizer import build_char_tokenizer

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    rc, err = cli(capsys, "eval", "--model", model, "--eval-data", data, "--task-num-digits", "3")
    assert rc == 2 and "config field `task_num_digits` is 3, but it shapes the built-in task's rows" in err, err
    rows = [{"prompt": [{"role": "system", "content": "add"}]}, {"prompt": [{"role": "user", "content": "1+1="}]}]
    scan = scan_prompts(build_char_tokenizer(), rows, "prompt", 256, "train data")
    assert any("1 of 2 chat prompts have no user message (first: row 0)" in w for w in scan.warnings)
