"""A resume proves what it continues (DESIGN invariant 15; issue 19, class 2): every checkpoint records its run's
identity, stage, resolved config and fingerprints of its data and models, and a resume that would continue
something else is refused by name, before anything in the folder changes. `latest` with nothing to resume is an
error, never a fresh start over a trained model; a resume that fails deletes no checkpoint. A row's fingerprint
sees every element of an array, and a value only its repr could name is refused.

Through `grpokit.cli.main` in process (the CLI's entry point: exit code and stderr as a user sees them).
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import overriding, read_jsonl, save_tiny, save_tiny_reward_model

from grpokit.cli import main
from grpokit.runtime.checkpoint import RECORD_FILE, RUN_ID_FILE, ResumeWarning

COMMON = ["--no-progress", "--seed", "0"]


def rows(n: int, *, first_answer: str = "2") -> list[dict]:
    out = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(1, n + 1)]
    out[0]["answer"] = first_answer
    return out


def write_rows(path, data: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return path


def grpo_args(model, data, out, *extra: str) -> list[str]:
    return overriding([
        "train", "--model", str(model), "--train-data", str(data), "--output-dir", str(out),
        "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "4",
        "--learning-rate", "1e-3", "--beta", "0.1", "--no-tensorboard", *COMMON
    ], *extra)  # fmt: skip


def sft_args(model, data, out, *extra: str) -> list[str]:
    return overriding([
        "sft", "--model", str(model), "--train-data", str(data), "--output-dir", str(out),
        "--batch-size", "2", "--max-completion-length", "4", *COMMON
    ], *extra)  # fmt: skip


def resume_latest(model, data, out, *extra: str) -> list[str]:
    return grpo_args(model, data, out, "--resume-from-checkpoint", "latest", *extra)


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, 8 rows, and a finished GRPO run over them (beta 0.1: with a reference), checkpoints 2 and 4."""
    root = tmp_path_factory.mktemp("identity")
    model = save_tiny(root / "tiny", "llama")
    data = write_rows(root / "rows.jsonl", rows(8))
    run = root / "run"
    assert main(grpo_args(model, data, run, "--max-steps", "4", "--save-every", "2")) == 0
    assert checkpoints(run) == ["checkpoint-2", "checkpoint-4"]
    return {"root": root, "model": model, "data": data, "run": run}


def copy_run(world, tmp_path):
    return shutil.copytree(world["run"], tmp_path / "run")


def resume(world, out, *extra: str) -> list[str]:
    return resume_latest(world["model"], world["data"], out, *extra)


# ---------------------------------------------------------------- `latest` with nothing to resume


@pytest.mark.parametrize("folder", ["checkpoints deleted", "misspelled", "empty"])
def test_latest_with_nothing_to_resume_is_an_error_and_keeps_the_model(world, tmp_path, capsys, folder):
    out = tmp_path / "run"
    if folder == "checkpoints deleted":
        copy_run(world, tmp_path)
        for name in checkpoints(out):
            shutil.rmtree(out / name)
        trained = (out / "model" / "model.safetensors").read_bytes()
        expected = "holds no checkpoint-* folder (it holds completions.jsonl, config.yaml, curves.png"
    elif folder == "empty":
        out.mkdir()
        expected = "holds nothing: it is empty"
    else:
        expected = "does not exist (a misspelled path?):"
    rc, err = cli(capsys, resume(world, out, "--max-steps", "6"))
    assert rc == 2
    assert f"output_dir {out} {expected}" in err
    assert "nothing to resume; to start a fresh run, leave out resume_from_checkpoint (`--resume-from" in err
    if folder == "checkpoints deleted":
        assert "add `--overwrite-output-dir`" in err
        assert (out / "model" / "model.safetensors").read_bytes() == trained  # the trained model was not replaced
        assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    elif folder == "misspelled":
        assert not out.exists()


# ---------------------------------------------------------------- nothing pruned before the resume is proven


def test_a_damaged_earlier_checkpoint_keeps_the_later_ones(world, tmp_path, capsys):
    out = copy_run(world, tmp_path)
    state = out / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    argv = grpo_args(world["model"], world["data"], out, "--resume-from-checkpoint", str(out / "checkpoint-2"))
    rc, err = cli(capsys, overriding(argv, "--max-steps", "4"))
    assert rc == 2 and "checkpoint-2: trainer_state.pt is damaged" in err
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # checkpoint-4 is still there to resume
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_data_that_shrank_is_refused_before_any_checkpoint_goes(world, tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", rows(8))
    out = tmp_path / "run"
    assert main(grpo_args(world["model"], data, out, "--max-steps", "2", "--save-every", "1")) == 0
    write_rows(data, rows(2))  # the same file, 2 rows left
    argv = grpo_args(world["model"], data, out, "--resume-from-checkpoint", str(out / "checkpoint-1"))
    rc, err = cli(capsys, overriding(argv, "--max-steps", "2"))
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    assert rc == 2 and "the rows of `train_data`: 8 rows, sha256 " in err and " -> 2 rows, sha256 " in err


# ---------------------------------------------------------------- the checkpoint's record decides


@pytest.mark.parametrize(
    "changes, named",
    [
        (
            ["--learning-rate", "0.5", "--loss-type", "dapo", "--beta", "0.2"],
            ["`beta` 0.1 -> 0.2", "`learning_rate` 0.001 -> 0.5", "`loss_type` 'grpo' -> 'dapo'"],
        ),
        (["--seed", "1"], ["`seed` 0 -> 1"]),
        (["--num-generations", "4"], ["`num_generations` 2 -> 4"]),
    ],
    ids=["lr-loss-beta", "seed", "num_generations"],
)
def test_a_changed_config_is_refused_with_config_yaml_deleted(world, tmp_path, capsys, changes, named):
    out = copy_run(world, tmp_path)
    (out / "config.yaml").unlink()
    rc, err = cli(capsys, resume(world, out, "--max-steps", "6", *changes))
    assert rc == 2 and f"cannot resume {out / 'checkpoint-4'}: it continues another run" in err
    for field in named:
        assert field in err
    assert "`max_steps`" not in err  # a longer run is a resume, not a different one
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


def test_a_checkpoint_of_another_run_copied_in_is_refused(world, tmp_path, capsys):
    other = tmp_path / "other"  # the same config, another run
    assert main(grpo_args(world["model"], world["data"], other, "--max-steps", "2")) == 0
    out = copy_run(world, tmp_path)
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "checkpoint-2")
    shutil.copytree(other / "checkpoint-2", out / "checkpoint-2")
    rc, err = cli(capsys, resume(world, out, "--max-steps", "4"))
    assert rc == 2
    theirs, ours = (path.read_text().strip() for path in (other / RUN_ID_FILE, out / RUN_ID_FILE))
    assert f"it belongs to run {theirs}, but output_dir {out} holds run {ours}" in err


def test_a_folder_that_lost_its_run_id_says_how_to_restore_it(world, tmp_path, capsys):
    out = copy_run(world, tmp_path)
    run_id = (out / RUN_ID_FILE).read_text().strip()
    (out / RUN_ID_FILE).unlink()
    rc, err = cli(capsys, resume(world, out, "--max-steps", "5"))
    assert rc == 2 and f"holds no {RUN_ID_FILE} file" in err and f"write {run_id} into {out / RUN_ID_FILE}" in err
    (out / RUN_ID_FILE).write_text(run_id)  # as the message says
    rc, err = cli(capsys, resume(world, out, "--max-steps", "5"))
    assert rc == 0, err
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-5"]


def test_changed_training_data_with_the_same_row_count_is_refused(world, tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", rows(8))
    out = tmp_path / "run"
    assert main(grpo_args(world["model"], data, out, "--max-steps", "1")) == 0
    write_rows(data, rows(8, first_answer="7"))  # one answer edited, same path, same count
    rc, err = cli(
        capsys, grpo_args(world["model"], data, out, "--resume-from-checkpoint", "latest", "--max-steps", "2")
    )
    assert rc == 2 and "the rows of `train_data`: 8 rows, sha256 " in err and " -> 8 rows, sha256 " in err


def test_a_replaced_reference_model_is_refused_and_a_moved_one_accepted(world, tmp_path, capsys):
    model = shutil.copytree(world["model"], tmp_path / "model")
    out = tmp_path / "run"
    assert main(grpo_args(model, world["data"], out, "--max-steps", "1")) == 0
    original = shutil.move(model, tmp_path / "original")
    save_tiny(model, "llama", seed=1)  # another model in the same folder: the KL reference of beta 0.1
    rc, err = cli(
        capsys, grpo_args(model, world["data"], out, "--resume-from-checkpoint", "latest", "--max-steps", "2")
    )
    assert rc == 2 and "the contents of `model`: " in err and " bytes, sha256 " in err
    assert checkpoints(out) == ["checkpoint-1"] and not (out / "checkpoint-2").exists()

    moved = tmp_path / "moved"  # the run's own model, in another folder: the same contents, so it resumes
    shutil.rmtree(model)
    shutil.move(original, moved)
    rc, err = cli(
        capsys, grpo_args(moved, world["data"], out, "--resume-from-checkpoint", "latest", "--max-steps", "2")
    )
    assert rc == 0, err
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_a_replaced_reward_model_folder_is_refused(world, tmp_path, capsys):
    scorer = save_tiny_reward_model(tmp_path, name="scorer")
    out = tmp_path / "run"
    argv = grpo_args(world["model"], world["data"], out, "--reward-funcs", str(scorer), "--max-steps", "1")
    assert main(argv) == 0
    from safetensors.torch import load_file, save_file

    weights = load_file(scorer / "model.safetensors")  # the score head retrained, in the same folder
    save_file({**weights, "score.weight": -weights["score.weight"]}, scorer / "model.safetensors", {"format": "pt"})
    rc, err = cli(capsys, overriding(argv, "--resume-from-checkpoint", "latest", "--max-steps", "2"))
    assert rc == 2 and f"reward model {scorer}: " in err and " bytes, sha256 " in err


def test_a_finished_run_is_not_resumed_again(world, tmp_path, capsys):
    out = copy_run(world, tmp_path)
    rc, err = cli(capsys, resume(world, out, "--max-steps", "4"))
    assert rc == 2 and "is the last step of a finished run (max_steps = 4" in err and "raise max_steps" in err


def test_a_grpo_checkpoint_is_not_resumed_by_ppo(world, tmp_path, capsys):
    out = copy_run(world, tmp_path)
    rc, err = cli(capsys, ["ppo", *resume(world, out, "--max-steps", "6")[1:]])
    assert rc == 2 and "it was written by `grpokit train`, not `grpokit ppo`" in err
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


def test_trl_resume_from_checkpoint_true_with_nothing_to_resume_raises(world, tmp_path):
    """TRL's Trainer raises "No valid checkpoint found in output directory" for `resume_from_checkpoint=True` with
    none; so does the adapter, instead of training from the base model."""
    from grpokit.runtime.checkpoint import RunDirectoryError
    from grpokit.trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4
    )
    trainer = GRPOTrainer(model=str(world["model"]), reward_funcs="accuracy", args=args, train_dataset=rows(8))
    with pytest.raises(RunDirectoryError, match=f"output_dir {tmp_path / 'trl'} holds no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert not (tmp_path / "trl").exists()


def test_a_checkpoint_without_a_record_resumes_with_a_warning(world, tmp_path, capsys):
    """A checkpoint of an older grpokit: resumed (refusing would strand runs across an upgrade), with a warning
    that says what cannot be checked, and config.yaml's check as before."""
    out = copy_run(world, tmp_path)
    for folder in out.glob("checkpoint-*"):
        (folder / RECORD_FILE).unlink()
    (out / RUN_ID_FILE).unlink()
    with pytest.warns(ResumeWarning):
        rc, err = cli(capsys, resume(world, out, "--max-steps", "5", "--learning-rate", "0.5"))
    assert rc == 2 and "`learning_rate` 0.001 -> 0.5" in err  # config.yaml still checked
    with pytest.warns(ResumeWarning, match=f"checkpoint {out / 'checkpoint-4'} has no {RECORD_FILE}"):
        rc, err = cli(capsys, resume(world, out, "--max-steps", "5"))
    assert rc == 0, err
    assert (out / RUN_ID_FILE).is_file()  # its new checkpoints carry an identity again
    record = json.loads((out / "checkpoint-5" / RECORD_FILE).read_text())
    assert record["run_id"] == (out / RUN_ID_FILE).read_text().strip() and record["step"] == 5


# ---------------------------------------------------------------- SFT: the same record


@pytest.fixture
def sft_run(world, tmp_path):
    """An SFT run over 8 rows of its own file, checkpoints 1 and 2."""
    data = write_rows(tmp_path / "sft.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(8)])
    out = tmp_path / "sft"
    assert main(sft_args(world["model"], data, out, "--max-steps", "2", "--save-every", "1")) == 0
    return {"data": data, "run": out}


def test_sft_refuses_data_that_shrank(world, sft_run, capsys):
    out, data = sft_run["run"], sft_run["data"]
    write_rows(data, read_jsonl(data)[:2])  # the same file, 2 rows left
    argv = sft_args(world["model"], data, out, "--resume-from-checkpoint", str(out / "checkpoint-1"))
    rc, err = cli(capsys, overriding(argv, "--max-steps", "3"))
    assert rc == 2 and "the rows of `train_data`: 8 rows, sha256 " in err and " -> 2 rows, sha256 " in err
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]


def test_an_sft_checkpoint_past_max_steps_is_refused(world, sft_run, capsys):
    out = sft_run["run"]
    argv = sft_args(world["model"], sft_run["data"], out, "--resume-from-checkpoint", "latest", "--max-steps", "1")
    rc, err = cli(capsys, argv)
    assert rc == 2 and f"{out / 'checkpoint-2'} is past max_steps = 1: raise max_steps to resume it" in err
    assert (out / "model" / "model.safetensors").is_file() and checkpoints(out) == ["checkpoint-1", "checkpoint-2"]


def test_an_sft_checkpoint_is_not_resumed_by_grpo(world, sft_run, capsys):
    out = sft_run["run"]
    (out / "config.yaml").unlink()
    argv = grpo_args(world["model"], world["data"], out, "--resume-from-checkpoint", "latest", "--max-steps", "4")
    rc, err = cli(capsys, argv)
    assert rc == 2 and "it was written by `grpokit sft`, not `grpokit train`" in err


def test_reward_model_refuses_changed_pairs(world, tmp_path, capsys):
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]
    data = write_rows(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "rm"
    argv = ["reward-model", "--model", str(world["model"]), "--train-data", str(data), "--output-dir", str(out),
            "--batch-size", "2", "--max-steps", "1", *COMMON]  # fmt: skip
    assert main(argv) == 0
    write_rows(data, [{**pairs[0], "chosen": "9", "rejected": "2"}, *pairs[1:]])  # one pair flipped, same count
    rc, err = cli(capsys, overriding(argv, "--resume-from-checkpoint", "latest", "--max-steps", "2"))
    assert rc == 2 and "the rows of `train_data`: 8 rows, sha256 " in err and " -> 8 rows, sha256 " in err


# ---------------------------------------------------------------- row fingerprints


def test_row_fingerprints_see_every_array_element_and_refuse_what_only_a_repr_could_name():
    import numpy as np
    import torch

    from grpokit.data.rows import DataError
    from grpokit.runtime.checkpoint import fingerprint_rows

    values = np.arange(2000, dtype=np.int64)
    edited = values.copy()
    edited[1000] = -1  # inside what numpy's repr elides as `...`
    assert fingerprint_rows([{"ids": values}]) != fingerprint_rows([{"ids": edited}])
    tensor = torch.arange(2000)
    assert fingerprint_rows([{"ids": tensor}]) == fingerprint_rows([{"ids": tensor.clone()}])
    changed = tensor.clone()
    changed[1000] = 7
    assert fingerprint_rows([{"ids": tensor}]) != fingerprint_rows([{"ids": changed}])

    class Opaque:  # its repr holds its address: new in every process
        pass

    with pytest.raises(DataError, match=r"row 1, key 'meta' holds a .*Opaque, which a run's record cannot"):
        fingerprint_rows([{"prompt": "a"}, {"prompt": "b", "meta": Opaque()}])
