"""`grpokit compare`: a second comparison into the same folder follows `grpokit train`'s run-directory rules,
SIGTERM to the comparison reaches its method's process, which checkpoints; nothing is left running, the printed
resume command continues what was kept, and a worker that ends without its report is said."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import config, digit_share, save_tiny, step_rows

from grpokit.cli import main
from grpokit.config import GRPOConfig

TESTS = Path(__file__).resolve().parent
SIGNAL_PARENT_AT_CALL = "GRPOKIT_TEST_SIGNAL_PARENT_AT_CALL"
SIGNAL_IN_METHOD = "GRPOKIT_TEST_SIGNAL_IN_METHOD"
_calls = 0


def digit_share_or_signal_parent(prompts, completions, **kwargs):
    """`digit_share`, except that its call number N in a process, $GRPOKIT_TEST_SIGNAL_PARENT_AT_CALL = `N` or
    `N:SIGNAME`, sends SIGTERM (or SIGNAME) to the process's parent (the `grpokit compare` that started this
    method's process), as a user's `kill` would; with $GRPOKIT_TEST_SIGNAL_IN_METHOD, only in that method's process
    (`grpokit compare --worker METHOD ...`)."""
    global _calls
    only_in = os.environ.get(SIGNAL_IN_METHOD)
    if only_in and sys.argv[sys.argv.index("--worker") + 1 :][:1] != [only_in]:
        return digit_share(prompts, completions)
    _calls += 1
    at, _, name = os.environ.get(SIGNAL_PARENT_AT_CALL, "").partition(":")
    if at == str(_calls):
        os.kill(os.getppid(), signal.Signals[name or "SIGTERM"])
    return digit_share(prompts, completions)


def write_config(tmp_path: Path, **overrides) -> Path:
    model = save_tiny(tmp_path / "tiny", "llama")
    cfg = config(model, tmp_path / "cmp", num_eval_prompts=4, **overrides)
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GRPOConfig) if f.name != "lora"}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_second_comparison_into_the_same_folder_is_refused_naming_it(tmp_path, capsys):
    path = write_config(tmp_path, max_steps=1)
    assert main(["train", str(path), "--output-dir", str(tmp_path / "cmp" / "grpo")]) == 0  # an earlier GRPO run
    (tmp_path / "cmp" / "compare-config.yaml").write_text("earlier: comparison\n")
    capsys.readouterr()
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"grpokit compare: error: output_dir {tmp_path / 'cmp' / 'grpo'} holds another run" in err
    assert "--resume-from-checkpoint latest" in err and "--overwrite-output-dir" in err
    assert "Traceback" not in err
    assert (tmp_path / "cmp" / "compare-config.yaml").read_text() == "earlier: comparison\n"  # nothing touched
    assert [r["step"] for r in step_rows(tmp_path / "cmp" / "grpo")] == [1]
    checkpoint = tmp_path / "cmp" / "grpo" / "checkpoint-1"
    assert main(["compare", str(path), "--resume-from-checkpoint", str(checkpoint)]) == 2
    assert "a comparison continues each method from its own latest checkpoint; use `latest`" in capsys.readouterr().err


def test_a_ppo_only_field_given_to_compare_says_why_it_is_refused(capsys):
    assert main(["compare", "--gamma", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "unknown option `--gamma`" in err and "one of PPO's own fields" in err and "`grpokit ppo`" in err


def test_sigterm_stops_the_comparison_with_a_checkpoint_and_prints_its_resume_command(tmp_path):
    path = write_config(tmp_path, max_steps=50, save_every=0, reward_funcs=[f"{__name__}:digit_share_or_signal_parent"])
    pythonpath = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "grpokit.cli", "compare", str(path)]
    stopped = subprocess.run(
        command, env={**env, SIGNAL_PARENT_AT_CALL: "2"}, capture_output=True, text=True, timeout=600
    )  # the GRPO worker's second reward call sends SIGTERM to `grpokit compare`
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    worker_pid = int(stopped.stdout.split("(pid ")[1].split(")")[0])
    try:
        os.kill(worker_pid, 0)
        raise AssertionError(f"the GRPO worker {worker_pid} still runs after its parent exited")
    except ProcessLookupError:
        pass
    grpo = tmp_path / "cmp" / "grpo"
    (checkpoint,) = grpo.glob("checkpoint-*")  # written because of the signal (save_every 0: only at the end)
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < 50
    assert f"grpo stopped after step {step} of 50 (checkpoint: {checkpoint}); ppo not started" in stopped.stderr
    assert not (tmp_path / "cmp" / "ppo").exists()
    resume = stopped.stderr.split("resume with: ")[1].splitlines()[0]
    assert shlex.split(resume) == ["grpokit", "compare", str(path), "--resume-from-checkpoint", "latest"]

    # the printed command is accepted, and continues GRPO's checkpoint while PPO, never started, starts fresh
    from grpokit.config import load_yaml
    from grpokit.stages.compare import check_comparison, method_config

    resumed = dataclasses.replace(load_yaml(GRPOConfig, path), resume_from_checkpoint="latest")
    check_comparison(resumed)
    assert method_config(resumed, "grpo").resume_from_checkpoint == "latest"
    assert method_config(resumed, "ppo").resume_from_checkpoint is None


def test_a_worker_whose_comparison_is_killed_checkpoints_and_exits(tmp_path):
    """kill -9 of `grpokit compare` cannot be forwarded: its worker gets SIGTERM from the kernel (parent-death
    signal), finishes its step, checkpoints and exits instead of training on alone."""
    import select

    path = write_config(tmp_path, max_steps=50, save_every=0, reward_funcs=[f"{__name__}:digit_share_or_signal_parent"])
    pythonpath = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", SIGNAL_PARENT_AT_CALL: "2:SIGKILL"}
    command = [sys.executable, "-m", "grpokit.cli", "compare", str(path)]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    worker_pid = int(killed.stdout.split("(pid ")[1].split(")")[0])
    try:
        exited = os.pidfd_open(worker_pid)  # readable once the worker has exited (it is not this test's child)
    except ProcessLookupError:
        pass  # already gone
    else:
        try:
            assert select.select([exited], [], [], 300)[0], f"the GRPO worker {worker_pid} still runs"
        finally:
            os.close(exited)
    (checkpoint,) = (tmp_path / "cmp" / "grpo").glob("checkpoint-*")  # written on the SIGTERM (save_every 0)
    assert 1 <= int(checkpoint.name.split("-")[1]) < 50


def test_a_comparison_stopped_in_ppo_resumes_ppo_and_keeps_the_finished_grpo_figures(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, max_steps=3, save_every=0, reward_funcs=[f"{__name__}:digit_share_or_signal_parent"])
    pythonpath = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", SIGNAL_IN_METHOD: "ppo"}
    command = [sys.executable, "-m", "grpokit.cli", "compare", str(path)]
    stopped = subprocess.run(
        command, env={**env, SIGNAL_PARENT_AT_CALL: "2"}, capture_output=True, text=True, timeout=600
    )  # the PPO worker's second reward call sends SIGTERM to `grpokit compare`; GRPO had finished
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    cmp = tmp_path / "cmp"
    (checkpoint,) = (cmp / "ppo").glob("checkpoint-*")
    assert int(checkpoint.name.split("-")[1]) < 3 and not (cmp / "ppo" / "model").exists()
    assert f"grpo finished ({cmp / 'grpo'}); ppo stopped after step" in stopped.stderr
    grpo_figures = json.loads((cmp / ".grpo-report.json").read_text())  # kept for the resume
    assert grpo_figures["steps"] == 3

    monkeypatch.setenv("PYTHONPATH", pythonpath)  # the workers import this file's reward
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    capsys.readouterr()
    assert main(["compare", str(path), "--resume-from-checkpoint", "latest"]) == 0, capsys.readouterr().err[-3000:]
    assert "grpo finished before the interruption; its figures are kept" in capsys.readouterr().out
    assert [r["step"] for r in step_rows(cmp / "grpo")] == [1, 2, 3]  # GRPO was not run again
    assert [r["step"] for r in step_rows(cmp / "ppo")] == [1, 2, 3]
    record = json.loads((cmp / "comparison.json").read_text())
    assert record["grpo"] == grpo_figures and record["ppo"]["steps"] == 3
    assert not list(cmp.glob(".*-report.json"))  # in comparison.json now


# ---------------------------------------------------------------- a worker without its report


def test_a_comparison_worker_that_ends_with_status_0_and_no_report_is_said():
    from grpokit.stages.compare import ComparisonFailed

    failed = ComparisonFailed("grpo", 0)
    assert failed.exit_code == 1 and "ended (exit status 0) without writing its report" in str(failed)


def reward_that_fails(prompts, completions, **kwargs):
    raise ValueError("a fault in this worker alone")


def test_a_worker_that_fails_on_its_own_error_leaves_its_ranks_without_the_closing_barrier(tmp_path, monkeypatch):
    """Under torchrun the other ranks would sit in a step's collective, which the closing barrier would answer
    (both then waiting for ddp_timeout): a worker failing on an error of its own leaves at once, as `grpokit train`
    does (`loop.leaving_cluster`)."""
    from grpokit.runtime.distributed import Cluster
    from grpokit.stages.compare import worker

    left = []
    monkeypatch.setattr(Cluster, "close", lambda self, *, together=True: left.append(together))
    path = write_config(tmp_path, max_steps=1, reward_funcs=[f"{__name__}:reward_that_fails"])
    with pytest.raises(Exception, match="a fault in this worker alone"):  # (the reward's error, as the run says)
        worker("grpo", str(path), str(tmp_path / "report.json"))
    assert left == [False]
