"""Review fixes to issue 19's merged work: a finished run from an older grpokit resumed to the end, a model folder
refused as a run's output_dir, `--overwrite-output-dir` beside (not over) the model, row fingerprints that do not
depend on object addresses, a mistyped data path never taken for a hub name, and reward inputs copied once."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from helpers import cli_run, save_tiny, tiny_run_args


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


cli = cli_run
train_args = tiny_run_args


def kind(folder: Path) -> str:
    return json.loads((folder / ".grpokit.json").read_text())["kind"]


# ---------------------------------------------------------------- run folders


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


# ---------------------------------------------------------------- reward inputs


def test_a_row_shared_by_a_group_is_copied_once_per_reward_call_and_never_shared_between_functions():
    from grpokit.rewards import score

    messages = [{"role": "user", "content": "1+1="}]  # one prompt row, shared by its group's 3 completions
    ids = [5, 6, 7]
    batch = {"prompts": [messages] * 3, "completions": ["2", "3", "4"], "completion_ids": [ids, [8], ids]}
    seen = []

    def keep(prompts, completion_ids, **_):
        seen.append((prompts, completion_ids))
        prompts[0][0]["content"] = "edited"  # an edit in place reaches neither the batch nor the next function
        completion_ids[0].append(0)
        return [1.0, 0.0, 0.5]

    score([("first", keep), ("second", keep)], batch)
    (first, first_ids), (second, second_ids) = seen
    assert first[0] is first[1] is first[2] and first_ids[0] is first_ids[2]  # copied once, as shared
    assert first[0] is not messages and second[0] is not first[0] and second_ids[0] is not first_ids[0]
    assert second[0][0]["content"] == "edited" and second_ids[0] == [5, 6, 7, 0]  # only its own edit
    assert messages == [{"role": "user", "content": "1+1="}] and ids == [5, 6, 7]


def test_a_reward_that_changes_the_working_directory_is_said_once_per_function_and_run(tmp_path, monkeypatch):
    import torch

    from grpokit.rewards import RewardSet, RewardWarning

    monkeypatch.chdir(tmp_path)

    def f2_wanders(completions, **_):
        os.chdir("/")
        return [float(len(c)) for c in completions]

    settings = {"group_size": 2, "scale": "group", "aggregation": "sum_then_normalize", "timeout": None}
    batch = {"prompts": ["p", "p"], "completions": ["a", "bb"]}
    for _run in range(2):  # each run says it once, the second one too
        rewards = RewardSet([("f2_wanders", f2_wanders)], torch.ones(1), [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rewards.score_step(batch, **settings)
            rewards.score_step(batch, **settings)
        moved = [w for w in caught if issubclass(w.category, RewardWarning)]
        assert len(moved) == 1 and "`f2_wanders` changed the working directory" in str(moved[0].message)
        assert Path.cwd() == tmp_path


# ---------------------------------------------------------------- data paths


@pytest.mark.parametrize("typo", ["data/trian.jsonl", "data/train.JSON", "d/t.parquet"])
def test_a_mistyped_two_part_data_path_is_refused_naming_the_field(tmp_path, capsys, model, monkeypatch, typo):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    argv = [a for a in train_args(model, tmp_path / "out", "--train-data", typo) if a not in ("--task", "addition")]
    rc, err = cli(capsys, "train", *argv)
    assert rc == 2 and f"config field `train_data`: file {typo} does not exist" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- row fingerprints


def test_row_fingerprints_see_every_array_element_and_refuse_what_only_a_repr_could_name():
    import numpy as np
    import torch

    from grpokit.checkpoint import fingerprint_rows
    from grpokit.data import DataError

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
