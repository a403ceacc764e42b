"""Faults of a torchrun launch (2 ranks, gloo, CPU), each started as a cluster would cause it: SIGTERM to torchrun
(preemption), one rank killed (SIGKILL: out of memory, a crashed GPU) or one rank that stops answering (a hang, a
node lost without its connections closing). SIGTERM finishes the step on every rank, writes one checkpoint and
every rank exits 143; a lost rank stops the others at once (killed) or after `ddp_timeout` (silent), each saying
what happened and which checkpoint to resume; and the run resumed after both faults ends where the straight run in
one process ends (completions and weights).

Each launch runs `torchrun ... -m helpers FOLDER train CONFIG.yaml`: `grpokit train` on each rank, with each rank's
exit code kept in FOLDER (torchrun reports none after a SIGTERM)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import FAULT_AT_CALL, STOP_LAUNCH_AT_CALL, read_jsonl
from test_distributed import (
    LAUNCH_TIMEOUT,
    TESTS,
    TORCHRUN,
    completions,
    llama_path,  # noqa: F401 - the module's tiny Llama, a fixture
    max_relative_difference,
    one_process,
    weights,
    write_config,
)

from grpokit.runtime.checkpoint import list_checkpoints

TORCHRUN_SIGNALLED = 1  # torchrun 2.13 itself: it forwards SIGTERM, waits for the ranks, then raises SignalException


def launch(folder: Path, config: Path, *extra: str, env: dict[str, str]) -> tuple[int, dict[int, int], str]:
    """torchrun's exit code, each rank's own (a rank killed by a signal: absent) and the launch's output."""
    for old in folder.glob("exit-*"):
        old.unlink()
    pythonpath = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **env}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "helpers", str(folder), "train", str(config)]
    # the timeout is the hang guard: a launch that never ends fails here, whatever the faults did
    proc = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          start_new_session=True)  # fmt: skip
    codes = {int(p.name.split("-")[1]): int(p.read_text()) for p in folder.glob("exit-*")}
    return proc.returncode, codes, proc.stdout + proc.stderr


@pytest.mark.parametrize(("mode", "fault"), [("ddp", "kill"), ("fsdp", "hang")])
def test_sigterm_then_a_lost_rank_then_resume_is_the_straight_run(mode, fault, llama_path, tmp_path):  # noqa: F811
    """SIGTERM in step 2; resumed, rank 1 lost in step 4 (after the checkpoint of step 3); resumed again: the run
    is the straight run's 5 steps. `ddp`: rank 1 is killed, which the other sees at once (its connection closed);
    `fsdp` (every rank writes its own shards of each checkpoint): rank 1 hangs, which only `ddp_timeout` ends."""
    config = write_config(tmp_path, llama_path, max_steps=5, save_every=3, distributed=mode, ddp_timeout=10,
                          reward_funcs=["helpers:digit_share_with_faults"])  # fmt: skip
    run = tmp_path / "run"

    code, ranks, out = launch(tmp_path, config, env={STOP_LAUNCH_AT_CALL: "2"})
    assert (code, ranks) == (TORCHRUN_SIGNALLED, {0: 143, 1: 143}), out[-3000:]
    assert [step for step, _ in list_checkpoints(run)] == [2]  # one checkpoint: the step every rank was in
    assert (run / "checkpoint-2" / "shards").is_dir() == (mode == "fsdp")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert out.count("stopped by SIGTERM after step 2") == 2  # each rank

    # the resumed process's 2nd reward call is in step 4, after checkpoint-3
    code, ranks, out = launch(tmp_path, config, "--resume-from-checkpoint", "latest",
                              env={FAULT_AT_CALL: f"2:1:{fault}"})  # fmt: skip
    assert code == 1 and 1 not in ranks, out[-3000:]  # rank 1 ended by a signal (its own, or torchrun's)
    assert ranks.get(0, 3) == 3  # (torchrun's SIGTERM may end rank 0 after it said why it stops)
    assert [step for step, _ in list_checkpoints(run)] == [2, 3]
    said = {"kill": "rank 1 left the launch", "hang": "rank 1 did not answer within ddp_timeout = 10 s"}[fault]
    assert f"grpokit: stopped: rank 0 of 2: {said}" in out, out[-3000:]
    assert f"the last complete checkpoint is {run / 'checkpoint-3'} (step 3)" in out

    code, ranks, out = launch(tmp_path, config, "--resume-from-checkpoint", "latest", env={})
    assert (code, ranks) == (0, {0: 0, 1: 0}), out[-3000:]
    straight = one_process(config, tmp_path / "straight")
    assert completions(run) == completions(straight)
    assert max_relative_difference(weights(run), weights(straight)) <= 1e-5
