"""torchrun: PPO on 2 ranks (gloo, CPU) is PPO in one process, split, under ddp and under fsdp: the same completions,
the same final policy and critic (to float rounding), the same figures of the whole step (the critic's included,
the whitening over every rank's tokens), the same held-out evaluation (each rank samples its share of an odd number
of rows); a checkpoint of the 2-rank run (the critic's DCP shards under fsdp) resumes in one process and ends where
the straight run ends. And `grpokit compare` under torchrun: both methods on both ranks, one record.

Each case launches `torchrun --nproc_per_node 2 grpokit ppo CONFIG.yaml` (test_distributed's `launch`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import read_jsonl
from safetensors.torch import load_file
from test_distributed import (  # noqa: F401  (llama_path: the module's tiny Llama fixture)
    completions,
    launch,
    llama_path,
    max_relative_difference,
    one_process,
    weights,
    write_config,
)

from grpokit.stages.ppo import CRITIC_FILE, CRITIC_SHARDS, PPOTrainer

# eval at steps 0, 2 and 3 over 3 held-out rows: 2 on one rank, 1 on the other; a checkpoint after step 2
EVAL_AND_SAVE = {"eval_every": 2, "num_eval_prompts": 3, "save_every": 2, "eval_temperature": 1.0}
# the figures of the whole step, reduced over the ranks: the policy's, the critic's, the KL reward's
FIGURES = (
    "reward", "loss", "grad_norm", "kl", "entropy", "value_loss", "critic/grad_norm", "value_clip_frac",
    "values/mean", "returns/mean", "advantages/mean", "explained_variance", "kl_reward", "clip_ratio/region_mean",
)  # fmt: skip


def one_process_ppo(config: Path, output_dir: Path, **overrides) -> Path:
    return one_process(config, output_dir, trainer=PPOTrainer, **overrides)


def critic(run: Path):
    return load_file(run / CRITIC_FILE)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"distributed": "ddp", "num_iterations": 2, "minibatch_size": 4}, id="ddp-mu2-minibatches"),
        pytest.param({"distributed": "fsdp", "lora": {"r": 4, "alpha": 8.0}}, id="fsdp-lora"),
    ],
)
def test_ppo_on_two_ranks_is_ppo_in_one_process(overrides, llama_path, tmp_path):  # noqa: F811
    config = write_config(tmp_path, llama_path, **EVAL_AND_SAVE, **overrides)
    launch(config, command="ppo")
    split, whole = tmp_path / "run", one_process_ppo(config, tmp_path / "whole")
    assert len(completions(whole)) == 3 * 4 * 2
    assert completions(split) == completions(whole)
    assert float(critic(whole)["head.weight"].abs().max()) > 0  # the critic trained (its head starts at 0)
    assert max_relative_difference(weights(split), weights(whole)) <= 1e-5
    assert max_relative_difference(critic(split), critic(whole)) <= 1e-5
    rows_split, rows_whole = read_jsonl(split / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
    assert [r["step"] for r in rows_split] == [r["step"] for r in rows_whole]  # rank 0 alone wrote the log
    evaluated = 0
    for a, b in zip(rows_split, rows_whole, strict=True):
        for key in [*FIGURES, *(k for k in b if k.startswith("eval/"))]:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6, nan_ok=True), (b["step"], key)
        evaluated += "eval/reward_sampled" in b
    assert evaluated == 3  # steps 0, 2 and 3
    assert (split / "checkpoint-2" / CRITIC_SHARDS).is_dir() == (overrides["distributed"] == "fsdp")

    # the 2-rank run's checkpoint of step 2 resumed in one process: step 3 is the straight run's
    resumed = tmp_path / "resumed"
    shutil.copytree(split, resumed)
    one_process_ppo(config, resumed, resume_from_checkpoint=str(resumed / "checkpoint-2"))
    assert completions(resumed) == completions(whole)
    assert max_relative_difference(weights(resumed), weights(whole)) <= 1e-5
    assert max_relative_difference(critic(resumed), critic(whole)) <= 1e-5


def test_compare_under_torchrun_writes_one_record(llama_path, tmp_path):  # noqa: F811
    """Both methods run on both ranks (each in a fresh process per rank, the ranks joined again for each method);
    rank 0 writes the record, with every rank's peak memory. Under fsdp each rank holds half the critic."""
    config = write_config(tmp_path, llama_path, max_steps=1, num_eval_prompts=3, distributed="fsdp")
    launch(config, command="compare")
    out = tmp_path / "run"
    record = json.loads((out / "comparison.json").read_text())
    for method in ("grpo", "ppo"):
        assert record[method]["steps"] == 1
        assert record[method]["ranks"] == 2
        assert len(record[method]["peak_memory_mb_per_rank"]) == 2
        assert record[method]["peak_memory_mb"] == max(record[method]["peak_memory_mb_per_rank"])
        assert len(completions(out / method)) == 4 * 2  # the whole step's completions, by rank 0
    assert record["ppo"]["critic_memory_mb"] > 0 == record["grpo"]["critic_memory_mb"]
    body = load_file(llama_path / "model.safetensors")  # the critic: the policy's body (float32) and a head
    whole_mb = sum(t.numel() for name, t in body.items() if name.startswith("model.")) * 4 / 2**20
    assert record["ppo"]["breakdown"]["critic_weights_mb"] < 0.6 * whole_mb  # a shard of it on each rank
