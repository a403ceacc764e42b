"""A run's folder and its checkpoints as users met them, through `grpokit.cli.main` in process and the TRL adapter:
where a run may be written (not inside another run or a model folder, not under a name the file system cannot hold
or that would surprise, not with resume and overwrite both asked), what replacing or pruning leaves (a file a user
added to a model folder, a checkpoint or tensorboard/, a checkpoint a link points to), which checkpoint a resume
takes (not a renamed copy, not one copied from another copy of the run, not a final model), and what `save_model`
may replace (its own saves only, never an input of the run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import cli_run, config, save_tiny, tiny_run_args

from grpokit.trl import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


cli = cli_run


def addition_rows(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)]


def exact(completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


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


@pytest.fixture(scope="module")
def two_step_run(model, tmp_path_factory):
    """A two-step run with checkpoint-1, checkpoint-2 and its model, made once; tests copy it."""
    from grpokit.cli import main

    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *tiny_run_args(str(model), str(out), "--max-steps", "2", "--save-every", "1")]) == 0
    return out


# ---------------------------------------------------------------- where a run may be written


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


@pytest.mark.parametrize("shape", ["a 300-character folder name", "a path of 4,200 characters"])
def test_an_output_dir_the_file_system_cannot_hold_is_named_before_any_work(tmp_path, capsys, model, shape):
    """A name over the file system's limits ended in `OSError: [Errno 36] File name too long` tracebacks, one of
    them after a step had trained (a checkpoint's files past PATH_MAX)."""
    out = tmp_path / ("a" * 300) if "300" in shape else tmp_path / "/".join(["b" * 200] * 21)
    rc, err = cli(capsys, *train_args(str(model), str(out)))
    assert rc == 2 and "config field `output_dir`" in err and "Traceback" not in err, err
    assert not os.path.exists(out)  # (Path.exists raises on a name this long)


@pytest.mark.parametrize("command", ["init", "fetch-model", "train"])
def test_a_folder_name_too_long_in_bytes_is_refused_not_a_traceback(tmp_path, capsys, model, command):
    """200 x `é` is 200 characters but 400 bytes, past a file system's 255: the check counted characters; init and
    fetch-model had no check (an OSError traceback)."""
    out = tmp_path / ("é" * 200)
    argv = {
        "init": ["init", "--output-dir", out],
        "fetch-model": ["fetch-model", "smollm2", out],
        "train": ["train", *tiny_run_args(model, out)],
    }[command]
    rc, err = cli(capsys, *argv)
    assert rc == 2 and "has a folder name of 400 bytes: keep names under 215" in err and "Traceback" not in err, err


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


def test_resume_and_overwrite_together_are_refused_naming_both(model, tmp_path, capsys):
    """`--resume-from-checkpoint latest --overwrite-output-dir`: one keeps the run, the other replaces it; the resume
    used to win without a word."""
    out = tmp_path / "run"
    assert cli(capsys, "train", *tiny_run_args(model, out, "--save-every", "1"))[0] == 0
    before = sorted(p.name for p in out.iterdir())
    rc, err = cli(
        capsys,
        "train",
        *tiny_run_args(
            model, out, "--max-steps", "2", "--resume-from-checkpoint", "latest", "--overwrite-output-dir"
        ),  # fmt: skip
    )
    assert rc == 2 and "config field `overwrite_output_dir`" in err and "resume_from_checkpoint ('latest')" in err, err
    assert sorted(p.name for p in out.iterdir()) == before


def test_model_destinations_of_init_are_checked_like_run_folders(two_step_run, tmp_path, capsys, monkeypatch):
    """init wrote inside a run's checkpoint, made a folder named `~`, and renamed its model over the working
    folder (`--output-dir .` / `''`)."""
    monkeypatch.chdir(tmp_path)
    for target, said in [
        (two_step_run / "checkpoint-1" / "sub", "lies inside"),
        ("~/m", "`~` is not expanded here"),
        (".", "the working folder"),
        ("", "give the folder to write"),
    ]:
        rc, err = cli(capsys, "init", "--output-dir", target)
        assert rc == 2 and said in err, (target, err)
    assert not (two_step_run / "checkpoint-1" / "sub").exists() and not (tmp_path / "~").exists()


def test_the_demo_replaces_only_its_own_earlier_runs(tmp_path, capsys):
    """Runs of your own in D/sft and D/grpo were replaced by `grpokit demo --output-dir D`, no flag asked."""
    mine = tmp_path / "d" / "sft"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my run")
    rc, err = cli(capsys, "demo", "--output-dir", tmp_path / "d", "--sft-steps", "1", "--grpo-steps", "1")
    assert rc == 2 and "holds sft, not what a grpokit demo wrote there" in err, err
    assert (mine / "notes.txt").read_text() == "my run"


def test_a_protected_file_is_named_not_its_writable_folder(two_step_run, model, tmp_path, capsys):
    import shutil
    import subprocess

    out = shutil.copytree(two_step_run, tmp_path / "r")
    if subprocess.run(["chattr", "+a", str(out / "metrics.jsonl")], capture_output=True).returncode != 0:
        pytest.skip("chattr +a is not allowed here")
    try:
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, "--max-steps", "3",
                                                       "--resume-from-checkpoint", "latest"))  # fmt: skip
    finally:
        subprocess.run(["chattr", "-a", str(out / "metrics.jsonl")], check=True)
    assert rc == 2 and f"could not write {out / 'metrics.jsonl'}: operation not permitted" in err, err


@pytest.mark.parametrize("what", ["folder", "lock"])
def test_a_run_whose_folder_or_lock_goes_away_stops_by_name(model, tmp_path, what):
    """The output folder deleted mid-run: a raw errno and a TensorBoard thread's traceback. Its `.lock` deleted: a
    second run wrote into the same folder (metrics.jsonl read steps [117, 1, 2])."""
    import shutil

    from grpokit.runtime.checkpoint import RunDirectoryError
    from grpokit.stages.grpo import GRPOTrainer

    out = tmp_path / "run"
    calls = []

    def meddles(completions, **_):
        calls.append(1)
        if len(calls) == 2:  # during step 2
            shutil.rmtree(out) if what == "folder" else (out / ".lock").unlink()
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(config(model, out, max_steps=3, tensorboard=True), reward_funcs=[meddles])
    expected = (
        "was deleted or moved while the run was writing it" if what == "folder" else "this run's lock, was deleted"
    )
    with pytest.raises(RunDirectoryError, match=expected):
        trainer.train()
    assert len(calls) == 2


# ---------------------------------------------------------------- files a user added


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


# ---------------------------------------------------------------- checkpoints: pruning and resuming


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


def test_a_renamed_copy_of_a_checkpoint_is_neither_resumed_nor_pruned(two_step_run, model, tmp_path, capsys):
    """A backup of checkpoint-1 named checkpoint-100: `latest` took it as step 100 ("past max_steps")."""
    import shutil

    out = shutil.copytree(two_step_run, tmp_path / "r")
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-100")
    with pytest.warns(UserWarning, match=r"checkpoint-100 in .* records another step in its checkpoint_complete"):
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, "--max-steps", "3", "--save-every", "1",
                                                       "--resume-from-checkpoint", "latest"))  # fmt: skip
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-2", "checkpoint-3"]
    rc, err = cli(capsys, "train", *tiny_run_args(model, out, "--max-steps", "4",
                                                   "--resume-from-checkpoint", out / "checkpoint-100"))  # fmt: skip
    assert rc == 2 and "checkpoint_complete.json records step 1, not the step its name says" in err, err


def test_pruning_keeps_a_checkpoint_a_link_points_to_and_never_takes_a_copy_named_checkpoint_01(
    two_step_run, model, tmp_path, capsys
):
    import shutil

    out = shutil.copytree(two_step_run, tmp_path / "r", symlinks=True)
    (out / "checkpoint-best").symlink_to("checkpoint-1")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-02")
    with pytest.warns(UserWarning, match=r"checkpoint-1 is kept past save_total_limit: a link in .* points to it"):
        args = [
            "--max-steps",
            "4",
            "--save-every",
            "1",
            "--save-total-limit",
            "1",
            "--resume-from-checkpoint",
            "latest",
        ]
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, *args))
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-02",
        "checkpoint-1",
        "checkpoint-4",
        "checkpoint-best",
    ]
    assert (out / "checkpoint-best").resolve() == (out / "checkpoint-1").resolve()


def test_a_link_to_a_file_inside_a_checkpoint_protects_it(two_step_run, model, tmp_path, capsys):
    import shutil

    out = shutil.copytree(two_step_run, tmp_path / "r", symlinks=True)
    (out / "marks").mkdir()
    (out / "marks" / "w1.safetensors").symlink_to("../checkpoint-1/model.safetensors")
    args = ["--max-steps", "4", "--save-every", "1", "--save-total-limit", "1", "--resume-from-checkpoint", "latest"]
    with pytest.warns(UserWarning, match=r"checkpoint-1 is kept past save_total_limit: a link"):
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, *args))
    assert rc == 0 and (out / "marks" / "w1.safetensors").resolve().is_file(), err


def test_a_checkpoint_from_a_copy_of_the_run_is_not_continued_with_a_gap(two_step_run, model, tmp_path, capsys):
    """Two copies share a run id; a later checkpoint of one, copied into the other, was continued: its record read
    steps 1, 2, 5, 6."""
    import shutil

    x1, x2 = shutil.copytree(two_step_run, tmp_path / "x1"), shutil.copytree(two_step_run, tmp_path / "x2")
    rc, err = cli(capsys, "train", *tiny_run_args(model, x1, "--max-steps", "3", "--save-every", "1",
                                                   "--resume-from-checkpoint", "latest"))  # fmt: skip
    assert rc == 0, err
    shutil.copytree(x1 / "checkpoint-3", x2 / "checkpoint-3")
    rc, err = cli(capsys, "train", *tiny_run_args(model, x2, "--max-steps", "4", "--save-every", "1",
                                                   "--resume-from-checkpoint", "latest"))  # fmt: skip
    assert rc == 2 and "metrics.jsonl stops at step 2, before the checkpoint's step 3" in err, err


def test_a_final_model_that_failed_to_write_is_written_by_the_resume_it_prints(two_step_run, model, tmp_path, capsys):
    """The resume printed after a refused final save was refused as "a finished run" (model/ was step 2's)."""
    import shutil
    import subprocess

    out = shutil.copytree(two_step_run, tmp_path / "r")
    if subprocess.run(["chattr", "+i", str(out / "model")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here")
    try:
        args = tiny_run_args(model, out, "--max-steps", "3", "--save-every", "1", "--resume-from-checkpoint", "latest")
        rc, err = cli(capsys, "train", *args)
    finally:
        subprocess.run(["chattr", "-i", str(out / "model")], check=True)
    assert rc == 2 and "the final model was not written" in err, err
    rc, err = cli(capsys, "train", *args)
    assert rc == 0, err
    assert (out / "model" / ".grpokit.json").stat().st_mtime >= (out / "checkpoint-3").stat().st_mtime


def test_a_final_model_given_as_the_checkpoint_to_resume_is_named_as_a_model_folder(
    finished_run, tmp_path, capsys, model
):
    """It said "is incomplete (no checkpoint_complete.json): its writing was interrupted", a wrong cause."""
    r1 = copy_of(finished_run, tmp_path)
    rc, err = cli(capsys, *train_args(str(model), str(r1), "--resume-from-checkpoint", r1 / "model"))
    assert rc == 2 and "is not a checkpoint" in err and "it is a model folder: give it as `model`" in err, err


@pytest.mark.parametrize("command", ["train", "sft", "eval"])
def test_an_incomplete_checkpoint_as_the_model_is_refused(two_step_run, model, tmp_path, capsys, command):
    """A checkpoint without its marker (a kill mid-write) loaded as `--model` by train, sft and eval, no word."""
    import shutil

    broken = shutil.copytree(two_step_run / "checkpoint-2", tmp_path / "checkpoint-2")
    (broken / "checkpoint_complete.json").unlink()
    argv = {
        "train": ["train", *tiny_run_args(broken, tmp_path / "out")],
        "sft": ["sft", "--model", broken, "--task", "addition", "--output-dir", tmp_path / "out", "--max-steps", "1"],
        "eval": ["eval", "--model", broken, "--num-eval-prompts", "2"],
    }[command]
    rc, err = cli(capsys, *argv)
    assert rc == 2 and f"config field `model`: {broken} is an incomplete checkpoint" in err, err


# ---------------------------------------------------------------- save_model


@pytest.mark.parametrize("target", ["the base model", "a reward model"])
def test_save_model_never_replaces_an_input_of_the_run(tmp_path, target):
    """`trainer.save_model(<the base model folder>)` overwrote the run's own base model (also its KL reference) with
    the trained weights, and `save_model(<the reward model's folder>)` the reward model, exit 0: both refused."""
    import shutil

    from helpers import save_tiny_reward_model

    from grpokit.runtime.checkpoint import OutputExistsError

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


def test_trl_save_model_replaces_only_what_this_trainer_saved(two_step_run, model, tmp_path):
    """save_model("runA/model") replaced another run's trained model (and a reward model, a tokenizer's folder)."""
    import shutil

    from grpokit.runtime.checkpoint import OutputExistsError
    from grpokit.trl import GRPOConfig, GRPOTrainer

    other = shutil.copytree(two_step_run, tmp_path / "other")
    before = (other / "model" / "model.safetensors").read_bytes()
    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=4, use_cpu=True, report_to="none",
                      save_strategy="no")  # fmt: skip
    trainer = GRPOTrainer(str(model), "accuracy", args=args,
                          train_dataset=[{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)])  # fmt: skip
    trainer.train()
    with pytest.raises(OutputExistsError, match=r"holds a model folder grpokit wrote for something else"):
        trainer.save_model(str(other / "model"))
    assert (other / "model" / "model.safetensors").read_bytes() == before
    mine = trainer.save_model(str(tmp_path / "export"))
    assert trainer.save_model(str(tmp_path / "export")) == mine  # its own save, saved again as TRL scripts do


def test_trl_save_model_may_replace_a_save_of_the_same_run_only(model, tmp_path):
    """A run's own `save_model("final")`, saved again after a resume, was refused as another run's model; a save of
    an earlier run that a new one replaced in the same output_dir (overwrite_output_dir) is another run's."""
    from grpokit.runtime.checkpoint import OutputExistsError
    from grpokit.trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]

    def trainer(**changes):
        args = {"output_dir": str(tmp_path / "r"), "max_steps": 1, "per_device_train_batch_size": 4,
                "num_generations": 2, "max_completion_length": 4, "use_cpu": True, "report_to": "none",
                "save_steps": 1, **changes}  # fmt: skip
        return GRPOTrainer(str(model), "accuracy", args=GRPOConfig(**args), train_dataset=rows)

    first = trainer()
    first.train()
    saved = first.save_model(str(tmp_path / "final"))
    resumed = trainer(max_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.save_model(str(tmp_path / "final")) == saved
    replaced = trainer(overwrite_output_dir=True)
    replaced.train()
    with pytest.raises(OutputExistsError, match=r"also an earlier run replaced in this output_dir"):
        replaced.save_model(str(tmp_path / "final"))
