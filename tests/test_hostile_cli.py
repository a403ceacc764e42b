"""A hostile tester's CLI cases (/work/coord/hostile-cli.md #6, #17, #38, #41-#45, #63): each was silent or a
traceback, and is now a clear refusal naming the field, file or row the user wrote (rc 2), or works."""

from __future__ import annotations

import calendar
import json
import sys

import pytest
from helpers import config, save_tiny, step_rows

from grpokit.cli import main
from grpokit.config import ConfigError, GRPOConfig, check_override_names
from grpokit.data import DataError, load_rows
from grpokit.modeling import ModelFolderError, check_model_source
from grpokit.rewards import import_reward


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def write_yaml(path, cfg: GRPOConfig) -> str:
    import dataclasses

    import yaml

    path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"}))
    return str(path)


# ---------------------------------------------------------------- #6: an override given twice


@pytest.mark.parametrize(
    "twice, field",
    [
        (["--learning-rate", "1e-3", "--learning-rate", "1e-4"], "learning_rate"),
        (["--learning_rate=1e-3", "--learning-rate", "1e-4"], "learning_rate"),
        (["--progress", "--no-progress"], "progress"),
        (["--lora.r", "4", "--lora.r", "8"], "lora.r"),
    ],
)
def test_an_override_given_twice_is_refused_naming_the_field(tmp_path, capsys, twice, field):
    rc, err = cli(capsys, "train", "--model", str(tmp_path / "never-loaded"), "--task", "addition", *twice)
    assert rc == 2
    assert f"field {field} given twice" in err, err


def test_different_fields_of_one_nested_config_are_not_a_repeat():
    check_override_names(GRPOConfig, ["--lora.r", "4", "--lora.alpha", "8", "--no-progress", "--seed", "1"])


# ---------------------------------------------------------------- #17: a LoRA target module matching nothing


def test_a_lora_target_module_matching_nothing_is_refused_beside_one_that_matches(tmp_path, model, capsys):
    out = tmp_path / "run"
    run_yaml = write_yaml(tmp_path / "run.yaml", config(model, out, max_steps=1))
    rc, err = cli(capsys, "train", run_yaml, "--lora.r", "4", "--lora.target-modules", "q_proj", "nosuch_proj")
    assert rc == 2
    assert "lora.target_modules" in err and "'nosuch_proj'" in err and "'q_proj'" not in err, err
    assert "q_proj" in err.split("linear layers are", 1)[1]  # the names that would match are listed
    assert not (out / "metrics.jsonl").exists() or not step_rows(out)


# ---------------------------------------------------------------- #38: parquet / csv data


ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]


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


# ---------------------------------------------------------------- #41-#45: impossible model sizes


@pytest.mark.parametrize(
    "option, value, field",
    [
        ("--hidden-size", "7", "hidden_size"),
        ("--hidden-size", "0", "hidden_size"),
        ("--num-layers", "-1", "num_layers"),
    ],
)
def test_init_refuses_impossible_sizes_naming_the_field_and_writes_nothing(tmp_path, capsys, option, value, field):
    folder = tmp_path / "m"
    rc, err = cli(capsys, "init", "--output-dir", str(folder), option, value)
    assert rc == 2
    assert f"config field `{field}`" in err and f"got {value}" in err, err
    assert not folder.exists()


def test_demo_refuses_an_impossible_width_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, err = cli(capsys, "demo", "--output-dir", str(out), "--hidden-size", "7", "--sft-steps", "1")
    assert rc == 2 and "config field `hidden_size`" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "sizes, words",
    [
        ({"num_hidden_layers": -1}, "config.json says num_hidden_layers -1"),
        ({"hidden_size": 30}, "config.json says hidden_size 30, which 4 attention heads"),
    ],
)
def test_a_model_folder_whose_config_json_has_impossible_sizes_is_refused(tmp_path, sizes, words):
    folder = save_tiny(tmp_path / "llama", "llama")
    spec = json.loads((folder / "config.json").read_text())
    spec.pop("head_dim", None)  # the width then comes from hidden_size / num_attention_heads
    (folder / "config.json").write_text(json.dumps(spec | sizes))
    with pytest.raises(ModelFolderError, match=rf"model folder {folder}: its {words}"):
        check_model_source(folder)


# ---------------------------------------------------------------- #63: a reward module named like a stdlib module


def test_a_reward_module_shadowed_by_the_standard_library_says_which_file_was_imported(tmp_path, monkeypatch):
    (tmp_path / "calendar.py").write_text("def score(completions, **_):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        import_reward("calendar:score")
    message = str(caught.value)
    assert calendar.__file__ in message and "standard library" in message and "rename your calendar.py" in message


def test_a_reward_module_that_shadows_the_standard_library_says_so(tmp_path, monkeypatch):
    (tmp_path / "tabnanny.py").write_text("def grade(completions, **_):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tabnanny", raising=False)
    try:
        with pytest.raises(ValueError) as caught:
            import_reward("tabnanny:score")
    finally:
        sys.modules.pop("tabnanny", None)  # the next importer of tabnanny gets Python's own
    message = str(caught.value)
    assert str(tmp_path / "tabnanny.py") in message and "shadows the standard library module 'tabnanny'" in message


def test_init_config_validate_is_the_check_init_uses():
    from grpokit.config import InitConfig

    with pytest.raises(ConfigError, match="`num_layers` must be >= 1, got 0"):
        InitConfig(num_layers=0).validate()
