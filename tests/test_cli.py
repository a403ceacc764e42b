"""The command line as a user runs it: YAML plus command-line overrides, exit codes and messages that name the
field, generated help, `--version`, an override given twice, and the train / eval / sft commands on a tiny saved
model. A train run and an SFT run go through `python -m grpokit.cli` in a subprocess, as a user starts them; the
rest calls the CLI's entry point `grpokit.cli.main` in this process (the same exit code, stdout and stderr, without
a second interpreter importing torch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpokit import __version__
from grpokit.cli import main
from grpokit.config import GRPOConfig, check_override_names
from grpokit.data.tasks import build_char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tokenizer = build_char_tokenizer()
    tiny_model(tokenizer, "llama", hidden_size=32, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def grpokit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # one intra-op thread: the tiny models are faster that way, and much faster on shared cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "grpokit.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_yaml(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def train_yaml(path: Path, model: Path, **overrides) -> Path:
    values = {
        "model": str(model),
        "task": "addition",
        "max_steps": 50,
        "prompts_per_step": 2,
        "num_generations": 2,
        "max_completion_length": 6,
        "num_train_prompts": 16,
        "num_eval_prompts": 4,
        "tensorboard": False,
        "progress": False,
        "output_dir": "from-yaml",
        **overrides,
    }
    return write_yaml(path, **values)


def test_train_yaml_with_overrides(tmp_path, model_path):
    cfg = train_yaml(tmp_path / "run.yaml", model_path)
    proc = grpokit(tmp_path, "train", str(cfg), "--max-steps", "2", "--output-dir", "X")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "X"  # relative to the working directory, and the override won over the YAML
    assert not (tmp_path / "from-yaml").exists()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["output_dir"] == "X"
    assert saved["prompts_per_step"] == 2 and saved["model"] == str(model_path)  # the rest came from the YAML
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert (out / "model" / "config.json").is_file()
    assert f"model: {Path('X') / 'model'}" in proc.stdout
    assert "eval" in proc.stdout and "eval/accuracy_greedy" in proc.stdout


@pytest.mark.parametrize(
    ("yaml_overrides", "args", "expected"),
    [
        ({"loss_type": "ppo"}, [], ["`loss_type`", "'grpo'"]),
        ({"learning_rte": 0.1}, [], ["`learning_rte`", "did you mean `learning_rate`"]),
        ({}, ["--num-generations", "1"], ["`num_generations`", "must be >= 2"]),
        ({}, ["--model", "no/such/model"], ["no/such/model", "does not exist"]),
    ],
    ids=["bad-literal", "typo-key", "bad-override", "missing-model"],
)
def test_bad_input_exits_2_naming_the_field(tmp_path, model_path, yaml_overrides, args, expected, capsys, monkeypatch):
    cfg = train_yaml(tmp_path / "run.yaml", model_path, **yaml_overrides)
    monkeypatch.chdir(tmp_path)  # the working directory the YAML's relative output_dir is read against
    rc = main(["train", str(cfg), *args])
    out, err = capsys.readouterr()
    assert rc == 2, (out[-2000:], err[-2000:])
    for text in expected:
        assert text in err
    assert "Traceback" not in err
    assert not (tmp_path / "from-yaml").exists()  # it failed before the run started


def test_train_help_lists_field_docstrings(capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's --help exits; `python -m grpokit.cli` exits with its code
        main(["train", "--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err[-2000:]
    text = " ".join(out.split())  # help is wrapped to the terminal width
    assert "--num-generations" in text and "Completions per prompt" in text
    assert "--loss-type" in text and "--learning-rate" in text


def test_top_level_usage_and_unknown_command(capsys):
    rc = main(["--help"])
    out = capsys.readouterr().out
    assert rc == 0 and "train" in out and "sft" in out
    rc = main(["trian"])
    err = capsys.readouterr().err
    assert rc == 2 and "'trian'" in err


def test_eval_prints_greedy_and_sampled_accuracy(tmp_path, model_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--model", str(model_path), "--num-eval-prompts", "20"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    greedy = re.search(r"addition held-out accuracy, greedy: (\d+\.\d)% of 20", out)
    sampled = re.search(r"addition held-out accuracy, sampled \(T=1\): (\d+\.\d)% of 20", out)
    assert greedy and sampled, out
    assert 0 <= float(greedy.group(1)) <= 100 and 0 <= float(sampled.group(1)) <= 100


def test_sft_writes_the_model(tmp_path, model_path):
    from transformers import AutoModelForCausalLM

    proc = grpokit(
        tmp_path,
        "sft",
        "--model",
        str(model_path),
        "--task",
        "addition",
        "--max-steps",
        "5",
        "--output-dir",
        "Y",
        "--batch-size",
        "8",
        "--num-train-prompts",
        "64",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_dir = tmp_path / "Y" / "model"
    assert f"model: {Path('Y') / 'model'}" in proc.stdout
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(model_dir)  # loads with plain transformers
    rows = [json.loads(line) for line in (tmp_path / "Y" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5]


# ---------------------------------------------------------------- in process: --version, an override given twice


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grpokit {__version__}"


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


# ---------------------------------------------------------------- what a newcomer types


@pytest.mark.parametrize("args", [["--lr", "3e-5"], ["--lr=3e-5"]])
def test_lr_is_short_for_learning_rate(args):
    """`--lr` answered "did you mean `lora`?"."""
    from grpokit.cli import parse_config
    from grpokit.config import SFTConfig

    assert parse_config(GRPOConfig, ["examples/grpo_addition.yaml", *args], "grpokit train").learning_rate == 3e-5
    assert parse_config(SFTConfig, args, "grpokit sft").learning_rate == 3e-5


def test_lr_given_beside_learning_rate_is_a_repeat(capsys):
    rc, err = cli(capsys, "train", "--model", "never-loaded", "--lr", "1e-3", "--learning-rate", "1e-4")
    assert rc == 2 and "field learning_rate given twice" in err, err


def test_the_usage_names_each_commands_own_example_config(capsys):
    """`grpokit --help` showed `compare examples/grpo_addition.yaml` where the README and the example's own comment
    use compare_addition.yaml: each command's example is the config made for it, and it exists."""
    assert main(["--help"]) == 0
    shown = re.findall(r"grpokit ([\w-]+) (examples/\S+\.yaml)", capsys.readouterr().out)
    own = {"train": "grpo_", "ppo": "ppo_", "compare": "compare_", "sft": "sft_", "reward-model": "reward_model_"}
    assert {command for command, _ in shown} == set(own)
    root = Path(__file__).resolve().parents[1]
    for command, path in shown:
        assert Path(path).name.startswith(own[command]) and (root / path).is_file(), (command, path)


def test_the_usage_lists_the_readmes_commands_in_the_readmes_order(capsys):
    """The two lists a newcomer compares: the same commands, in the order the pipeline runs them."""
    assert main(["--help"]) == 0
    usage = re.findall(r"^  ([a-z][\w-]*) ", capsys.readouterr().out, flags=re.M)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = re.findall(r"^\| `grpokit ([\w-]+)", readme, flags=re.M)
    assert usage == table and len(usage) >= 10, (usage, table)
