"""Nothing destroyed that grpokit did not write (issue 19, classes 1 and 4): one guarded way to write a folder
(`checkpoint.check_replaceable`), no input deleted or replaced by the run that reads it, a write the disk refuses
said as such (what happened, what was kept, how to go on), and a reward function's `os.chdir` undone; a run of an
older grpokit still resumes, a model folder is no run's output_dir, and a model beside a run survives its
overwrite. The run-folder cases users met (nested runs, pruning, save_model) are in test_run_folders.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    cli_run,
    config,
    digit_share,
    save_tiny,
    save_tiny_reward_model,
    step_rows,
    tiny_run_args,
)

from grpokit.model.saving import save_trained
from grpokit.runtime.checkpoint import list_checkpoints
from grpokit.stages.grpo import GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


cli = cli_run
train_args = tiny_run_args


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_run(folder: Path) -> Path:
    """A run directory as `grpokit train` leaves it (its files' names, its lock and marks, a checkpoint)."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / ".lock").write_text("")
    (folder / ".grpokit.json").write_text('{"kind": "run"}')
    (folder / "checkpoint-2" / "checkpoint_complete.json").write_text('{"step": 2}')
    (folder / "checkpoint-2" / "trainer_state.pt").write_bytes(b"state")
    (folder / "config.yaml").write_text("model: tiny\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    return folder


# ---------------------------------------------------------------- a folder written only where nothing is lost


@pytest.mark.parametrize("target", ["run", "home", "file"])
def test_init_refuses_a_run_a_users_folder_or_a_file_and_leaves_it_whole(tmp_path, capsys, target):
    path = tmp_path / target
    if target == "run":  # `grpokit train --output-dir r1`, then `grpokit init --output-dir r1`
        fake_run(path)
    elif target == "home":  # `grpokit init --output-dir $HOME`
        path.mkdir()
        (path / ".bashrc").write_text("export PATH\n")
        (path / "notes").mkdir()
        (path / "notes" / "thesis.tex").write_text("chapter 1")
    else:
        path.write_text("a file the user keeps")
    before = snapshot(path) if path.is_dir() else path.read_bytes()

    rc, err = cli(capsys, "init", "--output-dir", path, "--hidden-size", "32")
    assert rc == 2 and str(path) in err and "nothing was written" in err
    assert (snapshot(path) if path.is_dir() else path.read_bytes()) == before
    rc, err = cli(capsys, "init", "--output-dir", path, "--hidden-size", "32", "--overwrite-output-dir")
    assert rc == 2 and ("grpokit replaces only a model folder it wrote" in err or "is a file" in err)
    assert (snapshot(path) if path.is_dir() else path.read_bytes()) == before


def test_init_replaces_its_own_model_folder_only_when_asked(tmp_path, capsys):
    path = tmp_path / "tiny"
    path.mkdir()  # an empty folder is fine
    assert cli(capsys, "init", "--output-dir", path, "--hidden-size", "32")[0] == 0
    first = snapshot(path)
    rc, err = cli(capsys, "init", "--output-dir", path, "--hidden-size", "32", "--seed", "1")
    assert rc == 2 and "grpokit wrote earlier" in err and "--overwrite-output-dir" in err
    assert snapshot(path) == first
    replace = ("--seed", "1", "--overwrite-output-dir")
    assert cli(capsys, "init", "--output-dir", path, "--hidden-size", "32", *replace)[0] == 0
    assert snapshot(path)["model.safetensors"] != first["model.safetensors"]


def test_fetch_model_refuses_a_run_directory_before_loading_anything(tmp_path, capsys):
    run = fake_run(tmp_path / "r1")
    before = snapshot(run)
    rc, err = cli(capsys, "fetch-model", "smollm2", run)
    assert rc == 2 and str(run) in err and "holds a grpokit run (checkpoint-2, config.yaml" in err
    assert snapshot(run) == before


def test_a_policy_save_into_a_run_directory_is_refused(tmp_path, model):
    """`trainer.save_model(args.output_dir)`, a TRL habit: the run directory is not a model folder to swap out."""
    trainer = GRPOTrainer(config(model, tmp_path / "out"))
    run = fake_run(tmp_path / "r1")
    before = snapshot(run)
    with pytest.raises(ValueError, match="holds a grpokit run .*replaces only a model folder it wrote"):
        save_trained(trainer.policy, run, trainer.tokenizer)
    assert snapshot(run) == before


# ---------------------------------------------------------------- no input deleted by the run that reads it


@pytest.mark.parametrize(
    "command, field, flag",
    [("train", "reward_funcs", "--reward-funcs"), ("ppo", "critic_model", "--critic-model")],
)
def test_overwrite_output_dir_refuses_an_input_inside_what_it_replaces(tmp_path, capsys, model, command, field, flag):
    out = tmp_path / "out"
    reward_model = save_tiny_reward_model(out, name="model")  # OUT/model: the run's final model path
    before = snapshot(reward_model)
    rc, err = cli(capsys, command, *train_args(model, out, flag, reward_model, "--overwrite-output-dir"))
    assert rc == 2 and f"`{field}`" in err and str(reward_model) in err
    assert snapshot(reward_model) == before


def test_a_users_folder_named_model_or_checkpoint_in_output_dir_is_not_deleted(tmp_path, capsys, model):
    out = tmp_path / "out"
    (out / "checkpoint-best").mkdir(parents=True)  # another trainer's folder; no grpokit name
    (out / "checkpoint-best" / "model.safetensors").write_bytes(b"weights")
    assert cli(capsys, "train", *train_args(model, out))[0] == 0
    assert (out / "checkpoint-best" / "model.safetensors").read_bytes() == b"weights"

    (out / "checkpoint-500").mkdir()  # a name like grpokit's, but not written by it
    (out / "checkpoint-500" / "optimizer.pt").write_bytes(b"adam")
    rc, err = cli(capsys, "train", *train_args(model, out, "--overwrite-output-dir"))
    assert rc == 2 and "checkpoint-500" in err and "did not write" in err
    assert (out / "checkpoint-500" / "optimizer.pt").read_bytes() == b"adam"

    (out / "checkpoint-500" / "optimizer.pt").unlink()
    (out / "checkpoint-500").rmdir()
    mine = tmp_path / "mine"
    fake_run(mine)
    (mine / "model").mkdir()  # the user's own folder, not a model grpokit wrote
    (mine / "model" / "config.json").write_text("{}")
    (mine / "model" / "notes.txt").write_text("mine")
    rc, err = cli(capsys, "train", *train_args(model, mine, "--overwrite-output-dir"))
    assert rc == 2 and str(mine / "model") in err and "did not write as a model folder" in err
    assert (mine / "model" / "notes.txt").read_text() == "mine"


def test_overwrite_in_a_folder_no_grpokit_run_wrote_deletes_nothing(tmp_path, capsys, model):
    """`--output-dir . --overwrite-output-dir` in a project folder: its own `wandb/` and `config.yaml` share
    RUN_FILES' names, and stay."""
    project = tmp_path / "project"
    (project / "wandb" / "run-1").mkdir(parents=True)
    (project / "wandb" / "run-1" / "events").write_text("another project's run")
    (project / "config.yaml").write_text("# my settings\n")
    before = snapshot(project)
    rc, err = cli(capsys, "train", *train_args(model, project, "--overwrite-output-dir"))
    assert rc == 2 and "config.yaml, wandb" in err and "no grpokit run wrote" in err
    assert snapshot(project) == before


def test_a_run_written_before_provenance_files_is_still_replaced_on_request(tmp_path, capsys, model):
    out = tmp_path / "out"
    assert cli(capsys, "train", *train_args(model, out))[0] == 0
    for marker in (out / ".grpokit.json", out / "model" / ".grpokit.json"):  # as 6455fb2 left a run
        marker.unlink()
    assert cli(capsys, "train", *train_args(model, out, "--overwrite-output-dir", "--seed", "1"))[0] == 0
    assert json.loads((out / "model" / ".grpokit.json").read_text())["kind"] == "model"
    assert json.loads((out / ".grpokit.json").read_text())["kind"] == "run"


# ---------------------------------------------------------------- a write the disk refuses


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process, SIGXFSZ ignored: a write past `nbytes` in one file fails with EFBIG, mid-file,
    as a full disk fails a write (an unprivileged, real refusal by the kernel; no small file system needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_checkpoint_write_cut_short_says_what_happened_and_what_was_kept(tmp_path, capsys, model):
    out = tmp_path / "out"
    assert cli(capsys, "train", *train_args(model, out))[0] == 0
    weights = (out / "checkpoint-1" / "model.safetensors").stat().st_size
    state = (out / "checkpoint-1" / "trainer_state.pt").stat().st_size
    assert state > weights + 1000  # AdamW's moments: the state file is the larger one
    kept = snapshot(out / "checkpoint-1")
    with file_size_limit((weights + state) // 2):  # the weights fit, the trainer state is cut mid-file
        resumed = train_args(model, out, "--max-steps", "2", "--resume-from-checkpoint", "latest")
        rc, err = cli(capsys, "train", *resumed)
    assert rc == 2 and "Traceback" not in err and "unexpected pos" not in err
    assert f"could not write {out / 'checkpoint-2'}: file too large" in err
    assert f"the last whole checkpoint is {out / 'checkpoint-1'} (step 1)" in err
    assert "the final model was not written" in err
    assert f"then resume with: {shlex.join(['grpokit', 'train', *map(str, resumed)])}" in err
    assert [s for s, _ in list_checkpoints(out)] == [1] and snapshot(out / "checkpoint-1") == kept
    assert not list(out.glob(".tmp-*"))


def test_no_space_left_is_named_through_torch_save_and_safetensors(tmp_path):
    """/dev/full refuses every write with ENOSPC: torch.save's "unexpected pos" becomes it; safetensors' "(os error
    N)" text too (safetensors writes beside its target and renames: it must never be pointed at /dev/full)."""
    from safetensors.torch import save_file

    from grpokit.runtime.checkpoint import WriteError, save_state, writing  # noqa: PLC0415 - new in this change

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.pt").symlink_to("/dev/full")  # the file torch.save writes, on a full "disk"
    with pytest.raises(WriteError) as caught, writing(folder):
        save_state(folder, {"moments": torch.zeros(50_000)})
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith(f"could not write {folder}: no space left on device (free space")
    weights = tmp_path / "model.safetensors"
    with pytest.raises(WriteError, match="file too large"), writing(weights), file_size_limit(50_000):
        save_file({"w": torch.zeros(50_000)}, str(weights))
    with pytest.raises(WriteError, match="read-only file system"), writing(tmp_path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    with pytest.raises(ZeroDivisionError), writing(tmp_path):  # not a write: passes through untouched
        raise ZeroDivisionError


def _can_freeze(folder: Path) -> bool:
    """chattr +i works here (root on ext4/xfs with CAP_LINUX_IMMUTABLE): root ignores permission bits, not it."""
    folder.mkdir()
    try:
        frozen = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    except OSError:
        return False
    if frozen:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    return frozen


def test_an_output_folder_made_read_only_mid_run_stops_with_what_was_kept(tmp_path, model):
    if not _can_freeze(tmp_path / "probe"):
        pytest.skip("chattr +i is not available here")
    out = tmp_path / "out"
    calls = []

    def freeze_at_step_2(prompts, completions, **_):  # the machine misbehaves mid-run: the folder turns read-only
        calls.append(1)
        if len(calls) == 2:
            subprocess.run(["chattr", "+i", str(out)], check=True)
        return digit_share(prompts, completions)

    cfg = config(model, out, max_steps=3, save_every=1)
    trainer = GRPOTrainer(cfg, reward_funcs=[("freeze_at_step_2", freeze_at_step_2)])
    try:
        with pytest.raises(OSError) as caught:
            trainer.train()
        with pytest.raises(OSError, match=f"could not write {out / 'model'}: operation not permitted"):
            save_trained(trainer.policy, out / "model", trainer.tokenizer, overwrite=True)  # the final save, on its own
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    message = str(caught.value)
    assert message.startswith(f"could not write {out / 'checkpoint-2'}: operation not permitted")
    assert f"the last whole checkpoint is {out / 'checkpoint-1'} (step 1)" in message
    assert "--resume-from-checkpoint latest" in message
    assert [s for s, _ in list_checkpoints(out)] == [1]


# ---------------------------------------------------------------- a reward function's os.chdir


def test_a_reward_that_changes_the_working_directory_does_not_move_the_run(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()

    def wanders_off(prompts, completions, **_):
        os.chdir(tmp_path / "elsewhere")
        return digit_share(prompts, completions)

    cfg = config(model, "run", max_steps=2, save_every=1)  # a relative output_dir, as users write it
    with pytest.warns(UserWarning, match="reward function `wanders_off` changed the working directory"):
        result = GRPOTrainer(cfg, reward_funcs=[("wanders_off", wanders_off)]).train()
    assert Path.cwd() == tmp_path
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert [r["step"] for r in step_rows(tmp_path / "run")] == [1, 2]
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "elsewhere" / "run").exists()
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "checkpoint_complete.json").read_text())["step"] == 2
    assert result.model_dir.resolve() == (tmp_path / "run" / "model").resolve()


# ---------------------------------------------------------------- an older run, a model folder, a model beside


def kind(folder: Path) -> str:
    return json.loads((folder / ".grpokit.json").read_text())["kind"]


def test_a_finished_run_of_an_older_grpokit_resumes_to_its_end_and_stays_usable(tmp_path, capsys, model):
    """A run from before provenance files (its `.lock`, a `model/` with no mark): resumed with a raised max_steps
    it trains and replaces its final model, and the folder can be resumed again."""
    out = tmp_path / "out"
    assert cli(capsys, "train", *train_args(model, out))[0] == 0
    for marker in (out / ".grpokit.json", out / "model" / ".grpokit.json"):  # as an older grpokit left a run
        marker.unlink()
    rc, err = cli(capsys, "train", *train_args(model, out, "--max-steps", "2", "--resume-from-checkpoint", "latest"))
    assert rc == 0, err
    assert kind(out) == "run" and kind(out / "model") == "model"
    assert (out / "checkpoint-2").is_dir()
    rc, err = cli(capsys, "train", *train_args(model, out, "--max-steps", "3", "--resume-from-checkpoint", "latest"))
    assert rc == 0, err


def test_a_model_folder_grpokit_wrote_is_refused_as_a_runs_output_dir(tmp_path, capsys, model):
    """`grpokit init --output-dir runs/tiny`, then `grpokit train --output-dir runs/tiny`: the model folder is not
    written into, and its mark stays `model`."""
    tiny = tmp_path / "runs" / "tiny"
    rc, err = cli(capsys, "init", "--output-dir", tiny)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in tiny.iterdir() if p.is_file()}
    rc, err = cli(capsys, "train", *train_args(model, tiny))
    assert rc == 2 and f"output_dir {tiny} is a model folder grpokit wrote" in err and "choose another" in err
    assert {p.name: p.read_bytes() for p in tiny.iterdir() if p.is_file()} == before
    assert kind(tiny) == "model"


def test_overwrite_output_dir_beside_the_model_is_accepted_and_the_model_kept(tmp_path, capsys, model):
    """Model runs/exp/base, output runs/exp: `--overwrite-output-dir` deletes only the run's own files, so the
    model beside them is no reason to refuse; a model at runs/exp/model (the run's final model path) still is."""
    exp = tmp_path / "runs" / "exp"
    base = save_tiny(exp / "base", "llama")
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    assert cli(capsys, "train", *train_args(base, exp))[0] == 0
    rc, err = cli(capsys, "train", *train_args(base, exp, "--overwrite-output-dir", "--seed", "1"))
    assert rc == 0, err
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before
    inside = exp / "model"
    rc, err = cli(capsys, "train", *train_args(inside, exp, "--overwrite-output-dir"))
    assert rc == 2 and "config field `model`" in err and f"in {inside.resolve()}" in err
    assert (inside / "config.json").is_file()


def test_a_single_file_is_written_whole_or_not_at_all(tmp_path):
    """`atomic_file` (the critic beside a PPO model, a trimmed metrics.jsonl, a model folder's provenance): an error
    while writing leaves the old file and no temporary beside it; a finished write replaces the file in one rename."""
    from grpokit.runtime.checkpoint import atomic_file

    target = tmp_path / "critic.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_file(target) as partial:
        partial.write_text("half")
        raise RuntimeError("stopped mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["critic.safetensors"]
    with atomic_file(target) as partial:
        assert partial.parent == tmp_path and partial.name != target.name
        partial.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["critic.safetensors"]
