"""The seeded loss record (DESIGN invariant 12): two short seeded CPU runs of a tiny model reproduce their
recorded per-step loss, reward, grad norm and KL exactly. The record holds one set of figures per kind of CPU
(`helpers.cpu_kind`: vendor and vector width; the same code rounds differently on AMD and Intel); a kind without one
is skipped, saying so.

A refactor keeps tests/loss_record.json unchanged. An intended change of the numbers re-records it
(`python tests/test_loss_record.py`) and its commit says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import seeded_record, write_seeded_record

from grpokit.config import GRPOConfig, LoRAConfig
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.stages.grpo import GRPOTrainer

RECORD = Path(__file__).with_name("loss_record.json")
# metric name -> its key in the record (the record predates TRL's metric names; its numbers are what counts)
KEYS = {"loss": "loss", "reward": "reward/mean", "grad_norm": "grad_norm", "kl": "kl"}
RUNS = {
    # the defaults, sized down: beta 0, one optimizer step per generation batch, full fine-tune
    "default": {},
    # everything that reuses samples or changes the policy's shape: KL to a reference (the base with adapters
    # off), mu = 2 passes, 2 minibatches of 4 micro-batches each, LoRA
    "beta_mu2_minibatches_lora": {
        "beta": 0.04,
        "num_iterations": 2,
        "minibatch_size": 16,
        "micro_batch_size": 4,
        "lora": LoRAConfig(r=4, alpha=8.0),
        "learning_rate": 1e-2,
    },
}


def graded_reward(prompts, completions, **_):
    """Differs inside almost every group, so every step has advantages and a gradient."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.05 * len(c) for c in completions]


def run(name: str, output_dir: Path) -> list[dict[str, float]]:
    values = {
        "task": "addition",
        "output_dir": str(output_dir),
        "max_steps": 10,
        "prompts_per_step": 4,
        "num_generations": 8,
        "max_completion_length": 8,
        "num_train_prompts": 64,
        "num_eval_prompts": 0,
        "learning_rate": 1e-3,
        "progress": False,
        "tensorboard": False,
        "seed": 0,
        **RUNS[name],
    }
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
    GRPOTrainer(
        GRPOConfig(**values), model=model, tokenizer=tokenizer, reward_funcs=[("graded", graded_reward)]
    ).train()
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{KEYS[k]: r[k] for k in KEYS if k in r}} for r in rows if "loss" in r]


@pytest.mark.parametrize("name", list(RUNS))
def test_seeded_run_reproduces_its_loss_record(name, tmp_path):
    recorded = seeded_record(RECORD, name, "python tests/test_loss_record.py")
    assert [r["step"] for r in recorded] == list(range(1, 11))
    assert run(name, tmp_path) == recorded  # exact: float == float, every step, every key


if __name__ == "__main__":  # re-record: only for an intended change, said in the commit
    import tempfile

    from grpokit.runtime import machine

    torch.set_num_threads(1)  # as the test runs (conftest), so the sums happen in the same order
    machine.STARTING_THREADS = 1  # what the run takes without `num_threads`: one, as conftest sets it
    with tempfile.TemporaryDirectory() as tmp:
        record = {name: run(name, Path(tmp) / name) for name in RUNS}
    kind = write_seeded_record(RECORD, record)
    print(f"wrote {RECORD} for {kind}", file=sys.stderr)
