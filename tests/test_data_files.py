"""Training data read from files: JSONL, a JSON array, parquet and CSV (its cells read as the text written), a bad
row named by its row; a CSV column named twice, chat messages written as JSON text in a cell, a binary file of no
known format and a mistyped data path (never taken for a hub name) are refused or said."""

from __future__ import annotations

import json

import pytest
from helpers import cli_run, config, save_tiny, tiny_run_args

from grpokit.config import GRPOConfig
from grpokit.data.rows import DataError, load_rows


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


cli = cli_run


train_args = tiny_run_args


def write_yaml(path, cfg: GRPOConfig) -> str:
    import dataclasses

    import yaml

    path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"}))
    return str(path)


ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]


# ---------------------------------------------------------------- tables


def test_parquet_and_csv_data_are_read_as_tables(tmp_path):
    import datasets

    parquet, csv = tmp_path / "add.parquet", tmp_path / "add.csv"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    csv.write_text('prompt,answer\n1+2=,"3"\n4+4=,"8"\n')
    assert load_rows(parquet) == ROWS
    # CSV has no types: a column of digits reads as numbers, which the gold checker takes as whole numbers
    assert [(r["prompt"], str(r["answer"])) for r in load_rows(csv)] == [(r["prompt"], r["answer"]) for r in ROWS]
    damaged = tmp_path / "text.parquet"
    damaged.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"text\.parquet could not be read as parquet"):
        load_rows(damaged)


def test_a_bad_row_of_a_parquet_file_is_named_by_its_row(tmp_path, model, capsys):
    import datasets

    data = tmp_path / "add.parquet"
    datasets.Dataset.from_list([ROWS[0], {"prompt": "4+4=", "answer": ""}]).to_parquet(str(data))
    out = tmp_path / "run"
    rc, err = cli(capsys, "train", write_yaml(tmp_path / "run.yaml", config(model, out, train_data=str(data))))
    assert rc == 2
    assert f"{data}, row 1: column 'answer' is empty" in err, err


def test_a_json_array_of_rows_is_read_with_the_checks_of_jsonl(tmp_path):
    data = tmp_path / "add.json"
    data.write_text(json.dumps(ROWS, indent=2))
    assert load_rows(data) == ROWS
    data.write_text('[{"prompt": "1+2=", "answer": "3"}, ["4+4=", "8"]]')
    with pytest.raises(DataError, match=r"add\.json, row 1: expected a JSON object per row of the array, got list"):
        load_rows(data)
    data.write_text('[{"prompt": "1+2=", "answer": "3", "answer": "4"}]')
    with pytest.raises(DataError, match=r"add\.json: the key 'answer' is given twice"):
        load_rows(data)


def test_a_binary_file_that_is_no_known_table_names_the_formats(tmp_path):
    data = tmp_path / "add.bin"
    data.write_bytes(b"PAR1\x15\x04\xff\xfe")
    with pytest.raises(
        DataError, match=r"not UTF-8 text .* JSONL, a JSON array, \.parquet, \.csv or a `datasets` folder"
    ):
        load_rows(data)


# ---------------------------------------------------------------- CSV


def test_csv_cells_are_read_as_the_text_written(tmp_path):
    """The answer `060` used to arrive as the number 60, so every right completion "060" scored 0."""
    from grpokit.data.rows import load_rows

    data = tmp_path / "add.csv"
    data.write_text("prompt,answer,note\n41+19=,060,\n1+1=,2,1e3\nN/A?,NA,null\n")
    assert list(load_rows(str(data), field="train_data")) == [
        {"prompt": "41+19=", "answer": "060", "note": ""},
        {"prompt": "1+1=", "answer": "2", "note": "1e3"},
        {"prompt": "N/A?", "answer": "NA", "note": "null"},  # not a missing value: the text written
    ]


def test_a_csv_column_named_twice_is_refused(tmp_path):
    from grpokit.data.rows import DataError, load_rows

    data = tmp_path / "dup.csv"
    data.write_text("prompt,answer,answer\n1+1=,2,x\n")
    with pytest.raises(DataError, match=r"dup\.csv has the column 'answer' twice: rename one"):
        load_rows(str(data), field="train_data")


def test_chat_messages_written_as_json_text_in_a_csv_cell_are_said(tmp_path):
    from grpokit.data.rows import scan_prompts
    from grpokit.data.tasks.tokenizer import build_char_tokenizer

    rows = [{"prompt": json.dumps([{"role": "user", "content": "1+1="}])}, {"prompt": "2+2="}]
    scan = scan_prompts(build_char_tokenizer(), rows, "prompt", 256, "train data")
    assert any("1 of 2 prompts are text that reads as chat messages in JSON (first: row 0" in w for w in scan.warnings)


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("typo", ["data/trian.jsonl", "data/train.JSON", "d/t.parquet"])
def test_a_mistyped_two_part_data_path_is_refused_naming_the_field(tmp_path, capsys, model, monkeypatch, typo):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    argv = [a for a in train_args(model, tmp_path / "out", "--train-data", typo) if a not in ("--task", "addition")]
    rc, err = cli(capsys, "train", *argv)
    assert rc == 2 and f"config field `train_data`: file {typo} does not exist" in err
    assert not (tmp_path / "out").exists()
