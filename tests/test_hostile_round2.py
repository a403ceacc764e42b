"""Cases the second hostile round (on the merged issue-19 code, dedbcd7) found, each fixed at its root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import cli_run, save_tiny, tiny_run_args

from grpokit.trl import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def addition_rows(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)]


def exact(completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_reward_weights_count_the_reward_functions_handed_to_the_trainer(model, tmp_path):
    """A name and a function in one list with two weights: the weights count the functions handed in, not the
    config's default `reward_funcs` (it used to say "2 entries for 1 reward_funcs")."""
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no", reward_weights=[1.0, 0.5],
    )  # fmt: skip
    trainer = GRPOTrainer(model=str(model), reward_funcs=["accuracy", exact], args=args, train_dataset=addition_rows())
    trainer.train()
    assert trainer.trainer.rewards.names == ["accuracy", "exact"]
    assert trainer.trainer.rewards.weights.tolist() == [1.0, 0.5]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/exact/mean" in rows[-1]


# ---------------------------------------------------------------- folders (the CLI, in-process)


cli = cli_run


def train_args(model, out, *extra) -> list[str]:
    return ["train", *tiny_run_args(model, out, *extra)]


@pytest.fixture(scope="module")
def finished_run(model, tmp_path_factory):
    """A one-step run with its checkpoint-1 and final model, made once; tests copy it."""
    from grpokit.cli import main

    out = tmp_path_factory.mktemp("run") / "r1"
    assert main(train_args(str(model), str(out), "--save-every", "1")) == 0
    return out


def copy_of(run, tmp_path):
    import shutil

    return Path(shutil.copytree(run, tmp_path / "copy", symlinks=True))


@pytest.mark.parametrize("inside", ["checkpoint-1/sub", "model/sub", "metrics.jsonl.d"])
def test_a_run_inside_what_another_run_replaces_is_refused(finished_run, tmp_path, capsys, model, inside):
    """A run written inside another run's checkpoint or final model went with it when that run pruned, resumed or
    was overwritten (the whole nested run lost, no word); a folder beside the run's files is fine."""
    r1 = copy_of(finished_run, tmp_path)
    rc, err = cli(capsys, *train_args(str(model), str(r1 / inside)))
    if inside == "metrics.jsonl.d":  # not a name the run owns: a run may live there
        assert rc == 0, err
        return
    assert rc == 2 and "lies inside" in err and str(r1 / inside.split("/")[0]) in err, err
    assert not (r1 / inside).exists()


def test_a_run_inside_a_model_folder_grpokit_wrote_is_refused(tmp_path, capsys):
    """`grpokit sft --model tiny --output-dir tiny/sub` then `grpokit init --output-dir tiny --overwrite-output-dir`
    replaced tiny whole, the SFT run inside it too: the run is refused where a model folder would take it along."""
    rc, err = cli(capsys, "init", "--output-dir", tmp_path / "tiny")
    assert rc == 0, err
    rc, err = cli(capsys, *train_args(str(tmp_path / "tiny"), str(tmp_path / "tiny" / "sub")))
    assert rc == 2 and f"lies inside {tmp_path / 'tiny'}, a model folder grpokit wrote" in err, err


def test_a_file_a_user_added_to_a_model_folder_is_never_deleted_by_replacing_it(finished_run, tmp_path, capsys, model):
    """A model card written into a run's model/ was deleted by `--overwrite-output-dir` and by a resume's final save
    (the folder is grpokit's, the card is not): both are refused before any work, naming the file."""
    r1 = copy_of(finished_run, tmp_path)
    (r1 / "model" / "README.md").write_text("my card")
    for extra in (["--overwrite-output-dir"], ["--resume-from-checkpoint", "latest", "--max-steps", "2"]):
        rc, err = cli(capsys, *train_args(str(model), str(r1), *extra))
        assert rc == 2 and "README.md in it are not files grpokit wrote" in err, err
        assert (r1 / "model" / "README.md").read_text() == "my card"
        assert [p.name for p in r1.glob("checkpoint-*")] == ["checkpoint-1"]
    (r1 / "model" / "README.md").unlink()  # moved out: the run goes on
    rc, err = cli(capsys, *train_args(str(model), str(r1), "--resume-from-checkpoint", "latest", "--max-steps", "2"))
    assert rc == 0, err


def test_a_final_model_given_as_the_checkpoint_to_resume_is_named_as_a_model_folder(
    finished_run, tmp_path, capsys, model
):
    """It said "is incomplete (no checkpoint_complete.json): its writing was interrupted", a wrong cause."""
    r1 = copy_of(finished_run, tmp_path)
    rc, err = cli(capsys, *train_args(str(model), str(r1), "--resume-from-checkpoint", r1 / "model"))
    assert rc == 2 and "is not a checkpoint" in err and "it is a model folder: give it as `model`" in err, err


@pytest.mark.parametrize("shape", ["a 300-character folder name", "a path of 4,200 characters"])
def test_an_output_dir_the_file_system_cannot_hold_is_named_before_any_work(tmp_path, capsys, model, shape):
    """A name over the file system's limits ended in `OSError: [Errno 36] File name too long` tracebacks, one of
    them after a step had trained (a checkpoint's files past PATH_MAX)."""
    out = tmp_path / ("a" * 300) if "300" in shape else tmp_path / "/".join(["b" * 200] * 21)
    rc, err = cli(capsys, *train_args(str(model), str(out)))
    assert rc == 2 and "config field `output_dir`" in err and "Traceback" not in err, err
    assert not os.path.exists(out)  # (Path.exists raises on a name this long)


def test_an_old_checkpoint_that_cannot_be_deleted_stays_and_the_run_goes_on(tmp_path, model, capsys):
    """Pruning an older checkpoint that holds an immutable file ended the run in a PermissionError traceback after
    the new checkpoint was written; it is a warning now (nothing is lost by keeping an old checkpoint)."""
    import shutil
    import subprocess

    out = tmp_path / "run"
    assert cli(capsys, *train_args(str(model), str(out), "--save-every", "1"))[0] == 0
    frozen = out / "checkpoint-1" / "trainer_state.pt"
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(frozen)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.warns(UserWarning, match="could not delete .*checkpoint-1"):
            rc, err = cli(capsys, *train_args(str(model), str(out), "--save-every", "1", "--save-total-limit", "1",
                                              "--resume-from-checkpoint", "latest", "--max-steps", "2"))  # fmt: skip
        assert rc == 0, err
        assert (out / "checkpoint-2").is_dir() and (out / "model").is_dir()
    finally:
        subprocess.run(["chattr", "-i", str(frozen)])


@pytest.mark.parametrize("target", ["the base model", "a reward model"])
def test_save_model_never_replaces_an_input_of_the_run(tmp_path, target):
    """`trainer.save_model(<the base model folder>)` overwrote the run's own base model (also its KL reference) with
    the trained weights, and `save_model(<the reward model's folder>)` the reward model, exit 0: both refused."""
    import shutil

    from helpers import save_tiny_reward_model

    from grpokit.checkpoint import OutputExistsError

    base = Path(shutil.copytree(save_tiny(tmp_path / "tiny", "llama"), tmp_path / "base"))
    reward_model = save_tiny_reward_model(tmp_path / "rm")
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no",
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=str(base), reward_funcs=[exact, str(reward_model)], args=args, train_dataset=addition_rows()
    )
    trainer.train()
    folder = base if target == "the base model" else reward_model
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(OutputExistsError, match="the run's input `(model|reward_funcs)`"):
        trainer.save_model(str(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_a_peft_config_of_rank_0_is_refused_not_trained_in_full(model, tmp_path):
    """`peft_config=LoraConfig(r=0)` ran a full fine-tune of every weight without a word (grpokit's `lora.r: 0`
    means no LoRA); peft itself refuses a rank below 1."""
    from peft import LoraConfig

    from grpokit.config import ConfigError

    args = GRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=2)
    with pytest.raises(ConfigError, match=r"peft_config.r = 0: a LoRA rank must be a positive integer"):
        GRPOTrainer(
            model=str(model), reward_funcs=exact, args=args, train_dataset=addition_rows(), peft_config=LoraConfig(r=0)
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["pruning", "resuming an earlier checkpoint", "overwrite"])
def test_a_file_a_user_added_to_a_checkpoint_or_tensorboard_is_never_deleted(model, tmp_path, capsys, how):
    """A NOTES.md in a checkpoint went with it when pruning or a resume removed the checkpoint, and a user's files
    in tensorboard/ went with --overwrite-output-dir, no word: pruning keeps such a checkpoint (said), a resume or
    an overwrite that would delete one is refused before any work, naming the file."""
    out = tmp_path / "run"
    rc, err = cli(capsys, *train_args(str(model), str(out), "--save-every", "1", "--max-steps", "2", "--tensorboard"))
    assert rc == 0, err
    if how == "pruning":
        (out / "checkpoint-1" / "NOTES.md").write_text("the best one")
        with pytest.warns(UserWarning, match="checkpoint-1 is kept past save_total_limit: it holds NOTES.md"):
            rc, err = cli(capsys, *train_args(str(model), str(out), "--save-every", "1", "--save-total-limit", "1",
                                              "--resume-from-checkpoint", "latest", "--max-steps", "3"))  # fmt: skip
        assert rc == 0, err
        assert (out / "checkpoint-1" / "NOTES.md").read_text() == "the best one"
        return
    if how == "overwrite":
        (out / "tensorboard" / "my_annotations.txt").write_text("mine")
        extra, doomed = ["--overwrite-output-dir"], out / "tensorboard" / "my_annotations.txt"
    else:
        (out / "checkpoint-2" / "NOTES.md").write_text("mine")
        extra, doomed = (
            ["--resume-from-checkpoint", str(out / "checkpoint-1"), "--max-steps", "2"],
            out / "checkpoint-2" / "NOTES.md",
        )
    rc, err = cli(capsys, *train_args(str(model), str(out), "--save-every", "1", *extra))
    assert rc == 2 and f"which holds {doomed.name}: grpokit did not write them" in err, err
    assert doomed.read_text() == "mine" and (out / "checkpoint-2").is_dir()


@pytest.mark.parametrize("value", ["dangling", "~/from_yaml"])
def test_an_output_dir_that_would_surprise_is_named(model, tmp_path, capsys, monkeypatch, value):
    """A dangling symlink as output_dir ended in a FileExistsError traceback; `~/x` from a YAML file made a folder
    literally named `~` in the working folder (and printed `model: ~/x/model`)."""
    monkeypatch.chdir(tmp_path)
    if value == "dangling":
        os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    rc, err = cli(capsys, *train_args(str(model), value))
    assert rc == 2 and "config field `output_dir`" in err and "Traceback" not in err, err
    assert not (tmp_path / "~").exists()


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
