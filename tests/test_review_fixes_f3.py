"""Review fixes after issue 19: errors about a `gold_reward` folder name `gold_reward`; the example's eval data is
held out and does not warn; an `answer` column that is not text is refused only where the gold checker reads it;
a reward model started from a classifier with another number of labels is said so."""

from __future__ import annotations

import json
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
        train_rows, eval_rows = grpo_rows(cfg, None, None, None)
    assert len(eval_rows) == cfg.num_eval_prompts == 64
    assert not {r["prompt"] for r in eval_rows} & {r["prompt"] for r in train_rows}  # held out, not trained on
