"""Supervised fine-tuning (`train_sft`, `grpokit sft`): each step logs the learning rate it used, a tokenizer handed
in without a pad token gets one, rows handed in beside a built-in task are refused, and numbers that cannot train
stop at the step, saying what was kept."""

from __future__ import annotations

import json
import re

import pytest
from helpers import cli_run, llama, read_jsonl, save_tiny, sft_config, sft_rows

from grpokit.data.tasks import build_char_tokenizer
from grpokit.model.optim import lr_factor
from grpokit.stages.sft import train_sft


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


cli = cli_run


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


def test_sft_rows_with_a_task_are_refused_as_rows_with_train_data_are(tmp_path):
    from grpokit.config import ConfigError, SFTConfig
    from grpokit.stages.sft import train_sft

    model = str(save_tiny(tmp_path / "tiny"))
    cfg = SFTConfig(model=model, output_dir=str(tmp_path / "sft"), task="addition", max_steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"`task` is 'addition' but training rows were passed in \(`rows`\)"):
        train_sft(cfg, rows=[{"prompt": "1+1=", "completion": "2"}] * 4)
    assert not (tmp_path / "sft").exists()


def test_numbers_that_cannot_train_in_sft_name_the_step_and_what_was_kept(model, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(4)))
    with pytest.warns(UserWarning, match=r"`learning_rate` is 1e\+30: an AdamW step moves each weight"):
        rc, err = cli(capsys, "sft", "--model", model, "--train-data", data, "--output-dir", tmp_path / "out",
                      "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e30", "--weight-decay", "0",
                      "--warmup-steps", "0", "--no-progress")  # fmt: skip
    assert rc == 3 and re.search(
        r"stopped: step \d \(learning rate [\d.]+e\+\d+\): .*nothing of this step was saved", err
    )
