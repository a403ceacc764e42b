"""Two "nodes" on one machine: two `torchrun --nnodes 2 --nproc-per-node 1` launches meeting at a c10d rendezvous
on the loopback address, as two machines would at their first one's address. Each rank is its node's local rank 0,
so a run that took local rank 0 for the writer would have two writers (refused by the run folder's lock); rank 0
alone writes, and the run is the one-process run (completions, weights)."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid

import pytest
from test_distributed import (
    GRPOKIT,
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

from grpokit.runtime.checkpoint import RUN_ID_FILE, RunDirectory, list_checkpoints
from grpokit.runtime.distributed import Cluster, DistributedError
from grpokit.stages.loop import check_every_rank_sees


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_rank_train_as_one_process(llama_path, tmp_path):  # noqa: F811
    config = write_config(tmp_path, llama_path, distributed="fsdp")  # 3 steps; checkpoint-3: each node's shards
    pythonpath = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    # the command docs/distributed.md gives for each node, the endpoint being the first node's address
    node = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}", "--rdzv-id", uuid.uuid4().hex, str(GRPOKIT), "train", str(config)]  # fmt: skip
    nodes = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in nodes]  # (the timeout: a hang guard only)
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    split, whole = tmp_path / "run", one_process(config, tmp_path / "whole")
    assert completions(split) == completions(whole)
    assert max_relative_difference(weights(split), weights(whole)) <= 1e-5
    shards = sorted(p.name for p in (split / "checkpoint-3" / "shards").glob("*.distcp"))
    assert [step for step, _ in list_checkpoints(split)] == [3] and len(shards) == 2  # one from each node


class RankOne(Cluster):
    """Rank 1 of 2 in this process: rank 0's run identity is `run_id`, and rank 0 sees its own folder."""

    def __init__(self, run_id: str):
        super().__init__(rank=1, world_size=2)
        self.run_id = run_id

    def broadcast(self, obj):
        return self.run_id

    def gather_objects(self, items):
        return items  # rank 0's answer adds nothing (it sees its own folder); this rank's


def test_a_rank_that_cannot_see_rank_0s_run_folder_is_refused_before_any_work(tmp_path):
    """Nodes without a shared file system, or a relative output_dir read against another working folder: rank 1's
    folder is not rank 0's (no run_id, or another run's), and the run stops before a step, naming the field."""
    ours = RunDirectory(tmp_path / "run", settings=None, resume_from=None, overwrite=False, keep=0, writer=False)
    (tmp_path / "run").mkdir()
    for theirs in (None, "another-run"):
        if theirs is not None:
            (tmp_path / "run" / RUN_ID_FILE).write_text(theirs + "\n")
        with pytest.raises(DistributedError, match=r"`output_dir` .*: rank 1 cannot see the run folder rank 0"):
            check_every_rank_sees(ours, RankOne("rank-0s-run"))
    (tmp_path / "run" / RUN_ID_FILE).write_text("rank-0s-run\n")
    check_every_rank_sees(ours, RankOne("rank-0s-run"))  # the same folder: nothing said
