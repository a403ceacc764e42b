"""Supervised fine-tuning: the warm start before GRPO.

Cross-entropy on completion tokens only (the EOS included, so the model learns to stop); the prompt is
context. It shares the tokenizer, prompt rendering and the chunked logprob code with the GRPO trainer,
so an SFT model and a GRPO model see their prompts byte for byte the same way.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.config import ConfigError, SFTConfig
from grpokit.data.rows import (
    DataError,
    InputWarning,
    check_columns,
    check_prompt,
    encode_prompts,
    load_rows,
    pad_batch,
    where,
)
from grpokit.data.tasks import get_task
from grpokit.model.loading import check_positions, check_vocabulary, load_model
from grpokit.model.policy import Policy
from grpokit.model.saving import resume_policy, save_trained, write_policy_checkpoint
from grpokit.report.runlog import RunLog
from grpokit.runtime.checkpoint import RunDirectory, python_random_state
from grpokit.runtime.weight_files import MAX_SHARD_SIZE
from grpokit.stages.arguments import python_arguments
from grpokit.stages.loop import LoopSettings, StepReport, run_stage
from grpokit.stages.setup import RunSetup, stage_policy


def sft_rows(cfg: SFTConfig) -> list[dict[str, Any]]:
    """Training rows with a completion: from a file, or the task's imperfect demonstrator (one
    demonstration per problem, drawn once, as a fixed data set would be)."""
    if cfg.train_data is not None:
        rows = load_rows(cfg.train_data, field="train_data")
    else:
        task = get_task(cfg.task, num_digits=cfg.task_num_digits, forget_carry=cfg.forget_carry)
        rng = random.Random(cfg.seed)
        rows = [
            {**row, cfg.completion_column: task.demonstrate(row, rng)}
            for row in task.rows(cfg.num_train_prompts, split="train", seed=cfg.seed)
        ]
    return rows


def check_sft_rows(rows: list[dict[str, Any]], cfg: SFTConfig, source: str = "SFT data") -> None:
    """Every row has a prompt (text or chat messages) and non-empty completion text, before any model loads."""
    if not rows:
        raise DataError(f"{source} holds no rows")
    check_columns(rows, [cfg.prompt_column, cfg.completion_column], source)
    for i, row in enumerate(rows):
        check_prompt(row[cfg.prompt_column], f"{where(rows, i, source)}, column {cfg.prompt_column!r}")
        if not isinstance(row[cfg.completion_column], str) or not row[cfg.completion_column].strip():
            raise DataError(
                f"{where(rows, i, source)}: column {cfg.completion_column!r} must be text that is not blank, "
                f"got {row[cfg.completion_column]!r:.60}"
            )


def encode_examples(tokenizer: Any, rows: list[dict[str, Any]], cfg: SFTConfig) -> list[tuple[list[int], list[int]]]:
    prompts = encode_prompts(tokenizer, [r[cfg.prompt_column] for r in rows], cfg.max_prompt_length)
    examples, cut = [], 0
    for i, (row, p_ids) in enumerate(zip(rows, prompts.ids)):
        completion = row[cfg.completion_column]
        if not isinstance(completion, str):
            raise ValueError(f"SFT data row {i}: column {cfg.completion_column!r} must be text, got {completion!r:.60}")
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        cut += len(c_ids) > cfg.max_completion_length - 1
        examples.append((p_ids, c_ids[: cfg.max_completion_length - 1] + [tokenizer.eos_token_id]))
    for count, what, field in (
        (prompts.cut, "prompts keep their last", "max_prompt_length"),
        (cut, "completions keep their first", "max_completion_length"),
    ):
        if count:
            limit = getattr(cfg, field) - (field == "max_completion_length")
            warnings.warn(
                f"SFT data: {count} of {len(rows)} {what} {limit} tokens ({field} = {getattr(cfg, field)})",
                InputWarning,
                stacklevel=2,
            )
    return examples


@dataclass(frozen=True)
class SFTBatch:
    """[left-padded prompt | right-padded completion + EOS] rows, the layout `Policy.forward` reads."""

    prompt_ids: torch.Tensor  # (B, Tp)
    prompt_mask: torch.Tensor  # (B, Tp)
    completion_ids: torch.Tensor  # (B, Tc)
    completion_mask: torch.Tensor  # (B, Tc)

    @classmethod
    def of(cls, examples: list[tuple[list[int], list[int]]], pad_id: int) -> SFTBatch:
        prompt_ids, prompt_mask = pad_batch([p for p, _ in examples], pad_id, side="left")  # (B, Tp)
        completion_ids, completion_mask = pad_batch([c for _, c in examples], pad_id, side="right")  # (B, Tc)
        return cls(prompt_ids, prompt_mask, completion_ids, completion_mask)


def sft_loss(policy: Policy, batch: SFTBatch) -> torch.Tensor:
    """Mean negative log-likelihood per completion token of the batch."""
    logp, _ = policy.forward(batch, torch.arange(batch.completion_ids.shape[0]))  # (B, Tc)
    mask = batch.completion_mask[:, : logp.shape[1]].to(logp.device).float()  # (B, Tc)
    return -(logp * mask).sum() / mask.sum()


@torch.no_grad()
def heldout_loss(policy: Policy, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean negative log-likelihood per completion token over the held-out examples (`sft_loss` without a graph)."""
    was_training = policy.model.training
    policy.model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = SFTBatch.of(examples[start : start + batch_size], pad_id)
        count = int(batch.completion_mask.sum())
        total += sft_loss(policy, batch).item() * count
        tokens += count
    policy.model.train(was_training)
    return total / tokens


def train_sft(
    cfg: SFTConfig, *, model: Any = None, tokenizer: Any = None, rows: list[dict[str, Any]] | None = None
) -> Path:
    """Runs SFT and saves the model to OUTPUT_DIR/model; returns that folder. Checkpoints, resume and
    SIGINT / SIGTERM as in GRPO (`resume_from_checkpoint`, `save_every`). `cfg` may be an SFTConfig, its YAML
    file's path or a dict; every argument's type is checked first (`python_arguments`)."""
    args = python_arguments("train_sft", SFTConfig, cfg, model=model, tokenizer=tokenizer, datasets={"rows": rows})
    cfg, model, rows = args.config, args.model, args.rows["rows"]
    if rows is not None and cfg.task is not None:  # (as `train_data` with rows is): the task's only part in SFT is
        raise ConfigError(  # its rows, so the config saved with the run would record data that never trained
            f"train_sft: config field `task` is {cfg.task!r} but training rows were passed in (`rows`): use one "
            "(set task: null to train on the rows, or leave `rows` out to train on the task's demonstrations)"
        )
    setup = RunSetup(cfg)  # seeded, threads pinned
    cfg = setup.cfg
    rows = rows if rows is not None else sft_rows(cfg)
    check_sft_rows(rows, cfg)
    eval_rows = load_rows(cfg.eval_data, field="eval_data")[: cfg.num_eval_prompts] if cfg.eval_data else []
    if cfg.eval_data:
        check_sft_rows(eval_rows, cfg, f"SFT eval data {cfg.eval_data}")
    run_dir, tokenizer = setup.open(model=model, tokenizer=tokenizer, train_data=rows, eval_data=eval_rows)
    model = model if model is not None else load_model(cfg.model, setup.device, torch.float32)
    policy = stage_policy(model, cfg, total_steps=cfg.max_steps, device=setup.device, dtype=setup.dtype)
    check_vocabulary(model, tokenizer)
    examples = encode_examples(tokenizer, rows, cfg)
    eval_examples = encode_examples(tokenizer, eval_rows, cfg) if eval_rows else []
    check_positions(
        model,
        max(len(p) + len(c) for p, c in examples + eval_examples),
        "the longest SFT example (its prompt as cut by `max_prompt_length`, its completion + EOS as cut by "
        "`max_completion_length`)",
    )
    stage = SFTStage(
        policy, tokenizer, examples, eval_examples, batch_size=cfg.batch_size, seed=cfg.seed, max_steps=cfg.max_steps,
        max_shard_size=cfg.max_shard_size,
    )  # fmt: skip
    settings = LoopSettings("sft", cfg.max_steps, cfg.save_every, cfg.progress, record=asdict(cfg))
    return run_stage(stage, run_dir, settings)


class SFTStage:
    """SFT as the run loop drives it (`run_loop.Stage`): batches drawn with replacement from the examples by a
    seeded RNG (kept in checkpoints), the loss logged every 10 steps, the held-out loss after the last."""

    def __init__(
        self,
        policy: Policy,
        tokenizer: Any,
        examples: list[tuple[list[int], list[int]]],
        eval_examples: list[tuple[list[int], list[int]]],
        *,
        batch_size: int,
        seed: int,
        max_steps: int,
        max_shard_size: str = MAX_SHARD_SIZE,
    ):
        """`max_shard_size`: the largest weights file of a checkpoint and of the final model."""
        self.policy, self.tokenizer, self.batch_size, self.max_steps = policy, tokenizer, batch_size, max_steps
        self.examples, self.eval_examples = examples, eval_examples
        self.max_shard_size = max_shard_size
        self.batch_rng = random.Random(seed)

    def resume(self, checkpoint: Path) -> int:
        state = resume_policy(self.policy, checkpoint)
        self.batch_rng.setstate(python_random_state(state["batch_rng"]))
        return state["step"]

    def begin(self, log: RunLog | None, start: int) -> None:
        pass

    def train_step(self, step: int) -> StepReport:
        batch = [self.examples[self.batch_rng.randrange(len(self.examples))] for _ in range(self.batch_size)]
        lr = self.policy.lr  # the rate this step uses
        loss = sft_loss(self.policy, SFTBatch.of(batch, self.tokenizer.pad_token_id))
        self.policy.backward(loss)
        grad_norm = self.policy.optimizer_step()
        if step % 10 and step != self.max_steps:
            return StepReport()
        metrics = {"loss": loss.item(), "grad_norm": grad_norm, "learning_rate": lr}
        return StepReport(metrics, postfix={"loss": f"{metrics['loss']:.4f}"})

    def write_checkpoint(self, run: RunDirectory, step: int) -> Path:
        stage = {"batch_rng": self.batch_rng.getstate()}
        shard_size = self.max_shard_size
        return write_policy_checkpoint(self.policy, run, step, self.tokenizer, stage, max_shard_size=shard_size)

    def finish(self, log: RunLog | None, step: int) -> None:
        if self.eval_examples and log is not None:
            pad_id = self.tokenizer.pad_token_id
            eval_loss = heldout_loss(self.policy, self.eval_examples, pad_id, self.batch_size)
            log.log(step, {"eval/loss": eval_loss})

    def save(self, folder: Path) -> Path:
        shards = self.max_shard_size
        return save_trained(self.policy, folder / "model", self.tokenizer, max_shard_size=shards, overwrite=True)
