"""Review fixes after issue 19: errors about a `gold_reward` folder name `gold_reward`; the example's eval data is
held out and does not warn; an `answer` column that is not text is refused only where the gold checker reads it;
a reward model started from a classifier with another number of labels is said so."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import pytest
from helpers import save_tiny

from grpokit.cli import main
from grpokit.config import GRPOConfig, load_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_a_causal_lm_given_as_gold_reward_is_named_as_gold_reward(tmp_path, model, capsys):
    rc = main(
        ["train", "--model", str(model), "--task", "addition", "--output-dir", str(tmp_path / "run"),
         "--gold-reward", str(model), "--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
         "--num-train-prompts", "4", "--num-eval-prompts", "0", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "grpokit train: error:" in err and "Traceback" not in err
    assert "gold_reward" in err and "reward_funcs" not in err


def test_the_jsonl_example_evaluates_held_out_rows_without_a_warning(monkeypatch):
    from grpokit.data import InputWarning, grpo_rows

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


@pytest.fixture(scope="module")
def two_label_classifier(model, tmp_path_factory):
    """A Llama sequence classifier with 2 labels (a sentiment model, say) on the tiny model's body."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("clf") / "two_labels"
    AutoModelForSequenceClassification.from_pretrained(model, num_labels=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return folder


def test_reward_model_training_from_a_two_label_classifier_starts_a_new_one_output_head(two_label_classifier, tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.data import InputWarning
    from grpokit.reward_model import train_reward_model

    cfg = RewardModelConfig(model=str(two_label_classifier), output_dir=str(tmp_path / "rm"), task="addition",
                            num_train_pairs=8, num_eval_pairs=4, max_steps=1, batch_size=4, progress=False)  # fmt: skip
    with pytest.warns(InputWarning, match=r"`model`.*score\.weight of shape \[2, \d+\] \(2 labels\).*num_labels=1"):
        train_reward_model(cfg)
    saved = json.loads((tmp_path / "rm" / "model" / "config.json").read_text())
    assert len(saved["id2label"]) == 1  # one output, as TRL's RewardTrainer builds


def accepted_answers(completions, answer, **_):
    """A reward of the user's own: `answer` is a list of accepted answers."""
    return [float(c.strip() in accepted) for c, accepted in zip(completions, answer)]


def rows_with_answer_lists() -> list[dict]:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    for i in (1, 5):
        rows[i]["answer"] = [str(i + 1), f"0{i + 1}"]
    return rows


def test_answer_lists_for_a_users_reward_are_left_out_of_held_out_accuracy(tmp_path, model, monkeypatch):
    from helpers import config

    from grpokit.data import InputWarning
    from grpokit.trainer import GRPOTrainer

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
    monkeypatch.setattr(trainer, "task", types.SimpleNamespace(is_correct=is_correct))  # records what it compares
    result = trainer.evaluate(0)
    assert result["eval/accuracy_greedy"] == 1.0  # over the 6 rows with a text answer
    assert sorted(set(compared)) == sorted(str(i + 1) for i in (0, 2, 3, 4, 6, 7))
    assert "eval/rewards/accepted_answers/mean_greedy" in result


def test_answer_lists_are_refused_where_the_accuracy_reward_compares_them(tmp_path):
    from helpers import config

    from grpokit.data import DataError
    from grpokit.trainer import GRPOTrainer

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
