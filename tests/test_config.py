"""Bad configs fail before any model is loaded, with the field's name in the message (invariant 9): impossible
model sizes for init and the demo, a field of the built-in task beside rows from a file, a path starting with `~`
(refused where it would not be expanded; a folder named `~tiny` that exists is taken as written)."""

from __future__ import annotations

import json

import pytest
from helpers import cli_run, save_tiny, tiny_run_args

from grpokit.config import ConfigError, GRPOConfig, LoRAConfig, SFTConfig, from_dict, load_yaml


def grpo(**overrides) -> GRPOConfig:
    return GRPOConfig(**{"model": "some/path", "task": "addition", **overrides})


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        ({"num_generations": 1}, "num_generations", "must be >= 2"),
        ({"prompts_per_step": 3, "num_generations": 4, "minibatch_size": 5}, "minibatch_size", "must divide"),
        (
            {"minibatch_size": 16, "micro_batch_size": 6},
            "micro_batch_size",
            "must divide minibatch_size = 16",
        ),
        ({"loss_type": "ppo"}, "loss_type", "'grpo', 'bnpo', 'dapo', 'dr_grpo'"),
        ({"scale_rewards": "zscore"}, "scale_rewards", "'group'"),
        ({"kl_estimator": "k4"}, "kl_estimator", "'k3'"),
        ({"reward_funcs": ["accuracy"], "reward_weights": [1.0, 2.0]}, "reward_weights", "2 entries for 1"),
        ({"temperature": 0.0}, "temperature", "must be > 0"),
        ({"learning_rate": "fast"}, "learning_rate", "expects float"),
        ({"beta": -0.1}, "beta", "must be >= 0"),
        ({"task": "sorting"}, "task", "known tasks: ['addition', 'tool_addition']"),
        ({"ref_sync_every": 10}, "ref_sync_every", "needs beta > 0"),
        ({"lora": LoRAConfig(save="adapter")}, "lora.save", "no adapter to save"),
    ],
)
def test_bad_grpo_field_is_named(overrides, field, detail):
    with pytest.raises(ConfigError) as err:
        grpo(**overrides).validate()
    assert f"`{field}`" in str(err.value)
    assert detail in str(err.value)


def test_valid_config_passes_and_batch_arithmetic_is_checked_on_the_product():
    grpo(prompts_per_step=3, num_generations=4, minibatch_size=6, micro_batch_size=2).validate()


def test_exactly_one_data_source():
    with pytest.raises(ConfigError, match="exactly one of `task`"):
        GRPOConfig(model="m").validate()
    with pytest.raises(ConfigError, match="exactly one of `task`"):
        GRPOConfig(model="m", task="addition", train_data="x.jsonl").validate()


def test_unknown_yaml_key_suggests_the_real_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nlearning_rte: 0.1\n")
    with pytest.raises(ConfigError, match="unknown field `learning_rte`.*did you mean `learning_rate`"):
        load_yaml(GRPOConfig, path)


def test_yaml_int_for_float_field_becomes_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nlearning_rate: 1\n")
    cfg = load_yaml(GRPOConfig, path)
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1.0
    cfg.validate()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_yaml(GRPOConfig, tmp_path / "nope.yaml")


def test_sft_config_checks_its_own_fields():
    with pytest.raises(ConfigError, match="`forget_carry`"):
        from_dict(SFTConfig, {"model": "m", "task": "addition", "forget_carry": 1.5}).validate()


def test_model_path_may_be_empty_only_when_a_model_object_is_given():
    cfg = GRPOConfig(task="addition")
    with pytest.raises(ConfigError, match="`model` is empty"):
        cfg.validate()
    cfg.validate(model_given=True)


# ---------------------------------------------------------------- through the command line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


cli = cli_run


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


def test_init_config_validate_is_the_check_init_uses():
    from grpokit.config import InitConfig

    with pytest.raises(ConfigError, match="`num_layers` must be >= 1, got 0"):
        InitConfig(num_layers=0).validate()


@pytest.mark.parametrize(
    "stage, field, value",
    [
        ("sft", "--forget-carry", "0.3"),
        ("train", "--task-num-digits", "3"),
        ("reward-model", "--labeler-flaw", "longer"),
        ("train", "--num-train-prompts", "8"),
        ("sft", "--num-train-prompts", "8"),
        ("reward-model", "--num-train-pairs", "8"),
        ("reward-model", "--num-train-prompts", "8"),
        ("reward-model", "--num-eval-prompts", "8"),
    ],
)
def test_a_field_of_the_built_in_task_with_rows_from_a_file_is_refused(tmp_path, capsys, model, stage, field, value):
    """`--forget-carry 0.3` with SFT data from a file, `--task-num-digits 3` or `--labeler-flaw longer` with a data
    file: recorded in config.yaml and doing nothing, exit 0; refused naming the field before any work."""
    data = tmp_path / "rows.jsonl"
    row = {"prompt": "1+1=", "answer": "2", "completion": "2", "chosen": "2", "rejected": "3"}
    data.write_text("\n".join(json.dumps(row) for _ in range(4)) + "\n")
    rc, err = cli(capsys, stage, "--model", model, "--train-data", data, "--output-dir", tmp_path / "out", field, value)
    assert rc == 2 and f"config field `{field[2:].replace('-', '_')}`" in err and "it would do nothing" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["model", "eval_data", "reward_funcs"])
def test_a_path_starting_with_a_tilde_in_yaml_is_refused_naming_the_field(model, tmp_path, capsys, field):
    """`model: ~/tiny` in a YAML file read as a folder named `~`: "does not exist", with no field named."""
    import yaml

    values = {"model": str(model), "task": "addition", "output_dir": str(tmp_path / "out"), field: "~/somewhere"}
    if field == "reward_funcs":
        values[field] = ["accuracy", "~/rm"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    rc, err = cli(capsys, "train", path)
    where = "reward_funcs[1]" if field == "reward_funcs" else field
    assert rc == 2 and f"config field `{where}` is '~/" in err and "`~` is not expanded here" in err, err


def test_a_model_folder_named_with_a_leading_tilde_trains(model, tmp_path, capsys, monkeypatch):
    """`~tiny` that exists is a folder's name (no user called tiny): it crashed in the run's fingerprints."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(model, tmp_path / "~tiny")
    rc, err = cli(capsys, "train", *tiny_run_args("~tiny", tmp_path / "out"))
    assert rc == 0, err
