"""Reward-model training: Bradley-Terry on preference pairs (scoring with a trained one is `reward_scorer`).

A reward model is an `AutoModelForSequenceClassification` with one output, started from a causal LM folder (an SFT
model, typically: its body is kept, the score head is new); its reward is the score head at the last real token of
prompt + completion + EOS (`reward_scorer.sequence_rewards`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from grpokit.config import RewardModelConfig
from grpokit.data.rows import (
    DataError,
    InputWarning,
    ShuffledEpochs,
    check_columns,
    check_prompt,
    load_rows,
    pad_batch,
    where,
)
from grpokit.model.loading import check_positions, check_vocabulary, load_reward_model
from grpokit.model.policy import Policy
from grpokit.model.saving import resume_policy, save_trained, write_policy_checkpoint
from grpokit.report.runlog import RunLog
from grpokit.rewards.scorer import encode_texts, sequence_rewards
from grpokit.runtime.checkpoint import RunDirectory
from grpokit.runtime.weight_files import MAX_SHARD_SIZE
from grpokit.stages.arguments import python_arguments
from grpokit.stages.loop import LoopSettings, StepReport, run_stage
from grpokit.stages.setup import RunSetup, stage_policy


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """mean -log sigmoid(r_chosen - r_rejected - margin) + center_coefficient * mean (r_chosen + r_rejected)^2.

    The Bradley-Terry model (Bradley & Terry 1952) says P(chosen > rejected) = sigmoid(r_c - r_r); the
    loss is its negative log-likelihood, as in InstructGPT's reward model (Ouyang et al. 2022, eq. 1).
    `margin` (B,) asks for a gap of at least m between the two rewards, Llama 2's margin for pairs rated
    far apart (Touvron et al. 2023, eq. 2). The centering term pins the otherwise free offset of the
    rewards near 0 (Eisenstein et al. 2023), so rewards from different runs are comparable.

    Args: r_chosen, r_rejected, margin: (B,). Returns a scalar.
    """
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    return loss


@dataclass
class RewardModelResult:
    """What `train_reward_model` leaves behind."""

    model_dir: Path
    """The reward model in `save_pretrained` form (OUTPUT_DIR/model)."""
    eval_accuracy: float | None
    """Held-out pairwise accuracy: fraction of pairs with r_chosen > r_rejected (None without held-out pairs)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final training and evaluation metrics (the last rows of metrics.jsonl)."""


def reward_model_pairs(cfg: RewardModelConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train pairs, held-out pairs): from `train_data` / `eval_data`, or the built-in task's synthetic
    labeler (`labeler_flaw` for training; held-out pairs from the eval split, always labeled cleanly). With neither
    `train_data` nor a task (the pairs handed in), no training pairs, and held-out ones only from `eval_data`."""
    if cfg.train_data is not None or cfg.task is None:  # (no task: the training pairs were handed in, train_pairs=)
        train = load_rows(cfg.train_data, field="train_data") if cfg.train_data is not None else []
        held_out = load_rows(cfg.eval_data, field="eval_data") if cfg.eval_data is not None else []
    else:
        from grpokit.data.tasks import get_task
        from grpokit.data.tasks.preferences import preference_pairs

        task = get_task(cfg.task, num_digits=cfg.task_num_digits)
        train = preference_pairs(task, cfg.num_train_pairs, split="train", seed=cfg.seed, labeler_flaw=cfg.labeler_flaw)
        held_out = preference_pairs(task, cfg.num_eval_pairs, split="eval", seed=cfg.seed, labeler_flaw="none")
    return train, held_out[: cfg.num_eval_pairs]


def _check_pairs(rows: list[dict[str, Any]], cfg: RewardModelConfig, source: str, *, margin: bool) -> None:
    """Columns present and typed; the margin column only where it is used (training, not the accuracy)."""
    margin_column = cfg.margin_column if margin else None
    if rows and cfg.margin_column is None and "margin" in rows[0]:
        raise DataError(
            f"{source} has a `margin` column, which TRL's RewardTrainer subtracts in its loss and grpokit uses only "
            "when asked: set margin_column: margin (`--margin-column margin`) to use it, or drop the column"
        )
    columns = [cfg.prompt_column, cfg.chosen_column, cfg.rejected_column]
    check_columns(rows, columns + ([margin_column] if margin_column else []), source)
    same = sum(row[cfg.chosen_column] == row[cfg.rejected_column] for row in rows)
    if rows and same == len(rows):
        raise DataError(
            f"{source}: every one of its {same} pairs has chosen == rejected: there is no preference to learn"
        )
    if same:
        warnings.warn(
            f"{source}: {same} of {len(rows)} pairs have chosen == rejected (no signal)", InputWarning, stacklevel=3
        )
    blank = [
        i
        for i, row in enumerate(rows)
        if isinstance(row[cfg.chosen_column], str) and not row[cfg.chosen_column].strip()
    ]
    if blank:  # (a blank rejected completion is a lesson: an empty answer, which a policy can write, is worse)
        warnings.warn(
            f"{source}: {len(blank)} of {len(rows)} pairs have a blank {cfg.chosen_column!r} completion (first: row "
            f"{blank[0]}): the reward model learns to prefer an empty answer there",
            InputWarning,
            stacklevel=3,
        )
    for i, row in enumerate(rows):
        place = where(rows, i, source)
        check_prompt(row[cfg.prompt_column], f"{place}, column {cfg.prompt_column!r}")
        for name in (cfg.chosen_column, cfg.rejected_column):
            if not isinstance(row[name], str):
                raise DataError(f"{place}: column {name!r} must be text, got {row[name]!r:.60}")
        if margin_column and _finite_number(row[margin_column]) is None:
            got = row[margin_column]
            raise DataError(f"{place}: column {margin_column!r} must be a finite number, got {got!r:.60}")


def _finite_number(value: Any) -> float | None:
    """A margin as a float: a number, or the text of one (a .csv file's cells are text); None if neither."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def encode_pairs(
    tokenizer: Any, rows: list[dict[str, Any]], cfg: RewardModelConfig, *, margin: bool
) -> list[tuple[list[int], list[int], float]]:
    """(chosen ids, rejected ids, margin) per pair; the margin is 0 unless `margin` and a margin column."""
    max_length = cfg.max_prompt_length + cfg.max_completion_length
    prompts = [row[cfg.prompt_column] for row in rows]
    chosen = encode_texts(tokenizer, prompts, [row[cfg.chosen_column] for row in rows], max_length)
    rejected = encode_texts(tokenizer, prompts, [row[cfg.rejected_column] for row in rows], max_length)
    margins = [float(row[cfg.margin_column]) if margin and cfg.margin_column else 0.0 for row in rows]
    return list(zip(chosen, rejected, margins))


def pair_rewards(
    model: Any, batch: list[tuple[list[int], list[int], float]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (r_chosen (B,), r_rejected (B,), margin (B,)): both sides of every pair in one forward pass."""
    ids, mask = pad_batch([c for c, _, _ in batch] + [r for _, r, _ in batch], pad_id, side=side)  # (2B, T)
    rewards = sequence_rewards(model, ids.to(model.device), mask.to(model.device))  # (2B,)
    margin = torch.tensor([m for _, _, m in batch], dtype=torch.float32, device=rewards.device)  # (B,)
    return rewards[: len(batch)], rewards[len(batch) :], margin


@torch.no_grad()
def evaluate_pairs(
    model: Any,
    tokenizer: Any,
    examples: list[tuple[list[int], list[int], float]],
    *,
    batch_size: int = 64,
    kinds: list[str] | None = None,
) -> dict[str, float]:
    """Held-out pairwise accuracy (r_chosen > r_rejected; a tie counts as wrong), the mean loss, the mean
    rewards, and the accuracy per `kinds` entry when given (one label per pair)."""
    was_training = model.training
    model.eval()
    r_c, r_r = [], []
    side = getattr(tokenizer, "padding_side", "right")
    for start in range(0, len(examples), batch_size):
        c, r, _ = pair_rewards(model, examples[start : start + batch_size], tokenizer.pad_token_id, side)
        r_c.append(c)
        r_r.append(r)
    model.train(was_training)
    chosen, rejected = torch.cat(r_c), torch.cat(r_r)  # (N,), (N,)
    correct = chosen > rejected  # (N,)
    metrics = {
        "eval/pairwise_accuracy": correct.float().mean().item(),
        "eval/loss": bradley_terry_loss(chosen, rejected).item(),
        "eval/reward_chosen": chosen.mean().item(),
        "eval/reward_rejected": rejected.mean().item(),
    }
    for kind in sorted(set(kinds or [])):
        picked = torch.tensor([k == kind for k in kinds])
        metrics[f"eval/pairwise_accuracy/{kind}"] = correct[picked].float().mean().item()
    return metrics


def train_reward_model(
    cfg: RewardModelConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_pairs: list[dict[str, Any]] | None = None,
    eval_pairs: list[dict[str, Any]] | None = None,
) -> RewardModelResult:
    """Bradley-Terry training of a one-output sequence classifier; saves it to OUTPUT_DIR/model.

    Pairs come from `train_pairs` / `eval_pairs`, else from the config (`reward_model_pairs`); they are
    checked before any model is loaded. `model`, when given, must be a sequence classifier with one
    output. Without held-out pairs, `eval_accuracy` is None. `cfg` may be a RewardModelConfig, its YAML file's
    path or a dict; every argument's type is checked first (`python_arguments`).
    """
    args = python_arguments(
        "train_reward_model", RewardModelConfig, cfg, model=model, tokenizer=tokenizer,
        datasets={"train_pairs": train_pairs, "eval_pairs": eval_pairs},
    )  # fmt: skip
    cfg, model = args.config, args.model
    train_pairs, eval_pairs = args.rows["train_pairs"], args.rows["eval_pairs"]
    setup = RunSetup(cfg)  # seeded, threads pinned
    cfg = setup.cfg
    if train_pairs is None or eval_pairs is None:
        loaded_train, loaded_eval = reward_model_pairs(cfg)
        train_pairs = loaded_train if train_pairs is None else train_pairs
        eval_pairs = loaded_eval if eval_pairs is None else eval_pairs
    if not train_pairs:
        raise DataError("reward-model train data holds no pairs")
    _check_pairs(train_pairs, cfg, "reward-model train data", margin=True)
    _check_pairs(eval_pairs, cfg, "reward-model eval data", margin=False)
    run_dir, tokenizer = setup.open(
        model=model, tokenizer=tokenizer, model_kind="body", train_data=train_pairs, eval_data=eval_pairs
    )
    if model is None:
        model = load_reward_model(
            cfg.model, setup.device, torch.float32, pad_token_id=tokenizer.pad_token_id, new_head=True, field="model"
        )
    if getattr(model.config, "num_labels", None) != 1:
        raise ValueError(
            f"the reward model must be a sequence classifier with one output (num_labels=1), got "
            f"{type(model).__name__} with num_labels={getattr(model.config, 'num_labels', None)}; "
            "load one with grpokit.stages.reward_model.load_reward_model"
        )
    policy = stage_policy(model, cfg, total_steps=cfg.max_steps, device=setup.device, dtype=setup.dtype)
    check_vocabulary(model, tokenizer)
    train_examples = encode_pairs(tokenizer, train_pairs, cfg, margin=True)
    eval_examples = encode_pairs(tokenizer, eval_pairs, cfg, margin=False)
    check_positions(
        model,
        max(len(ids) for c, r, _ in train_examples + eval_examples for ids in (c, r)),
        "the longest reward-model row (prompt + completion + EOS, its last `max_prompt_length` + "
        "`max_completion_length` tokens kept)",
    )
    eval_kinds = [row["kind"] for row in eval_pairs] if all("kind" in row for row in eval_pairs) else None

    margin = bool(cfg.margin_column)
    stage = RewardModelStage(
        policy, tokenizer, train_examples, eval_examples, eval_kinds, batch_size=cfg.batch_size, seed=cfg.seed,
        max_steps=cfg.max_steps, margin=margin, center_coefficient=cfg.center_rewards_coefficient,
        max_shard_size=cfg.max_shard_size,
    )  # fmt: skip
    settings = LoopSettings("reward-model", cfg.max_steps, cfg.save_every, cfg.progress, record=asdict(cfg))
    model_dir = run_stage(stage, run_dir, settings)
    return RewardModelResult(model_dir=model_dir, eval_accuracy=stage.eval_accuracy, metrics=stage.metrics)


class RewardModelStage:
    """Bradley-Terry training as the run loop drives it (`run_loop.Stage`): the pairs in a seeded order that
    reshuffles every epoch (its position kept in checkpoints), the figures logged every 10 steps, the held-out
    pairwise accuracy after the last."""

    def __init__(
        self,
        policy: Policy,
        tokenizer: Any,
        train_examples: list[tuple[list[int], list[int], float]],
        eval_examples: list[tuple[list[int], list[int], float]],
        eval_kinds: list[str] | None,
        *,
        batch_size: int,
        seed: int,
        max_steps: int,
        margin: bool,
        center_coefficient: float | None,
        max_shard_size: str = MAX_SHARD_SIZE,
    ):
        """`max_shard_size`: the largest weights file of a checkpoint and of the final model."""
        self.policy, self.tokenizer, self.batch_size, self.max_steps = policy, tokenizer, batch_size, max_steps
        self.max_shard_size = max_shard_size
        self.train_examples, self.eval_examples, self.eval_kinds = train_examples, eval_examples, eval_kinds
        self.margin, self.center_coefficient = margin, center_coefficient
        self.pair_order = ShuffledEpochs(len(train_examples), seed)
        self.side = getattr(tokenizer, "padding_side", "right")
        self.metrics: dict[str, float] = {}  # the last logged figures (and the held-out ones after the run)
        self.eval_accuracy: float | None = None  # None without held-out pairs

    def resume(self, checkpoint: Path) -> int:
        state = resume_policy(self.policy, checkpoint)
        self.pair_order.load_state_dict(state["pair_order"])
        self.metrics = state["metrics"]
        return state["step"]

    def begin(self, log: RunLog | None, start: int) -> None:
        pass

    def train_step(self, step: int) -> StepReport:
        policy = self.policy
        batch = [self.train_examples[i] for i in self.pair_order.take(self.batch_size)]
        chosen, rejected, margin = policy.run(pair_rewards, batch, self.tokenizer.pad_token_id, self.side)
        loss = bradley_terry_loss(
            chosen, rejected, margin=margin if self.margin else None, center_coefficient=self.center_coefficient
        )
        policy.backward(loss)
        lr = policy.lr
        grad_norm = policy.optimizer_step()
        if step % 10 and step != self.max_steps:
            return StepReport()
        self.metrics = {
            "loss": loss.item(),
            "accuracy": (chosen > rejected).float().mean().item(),
            "reward_chosen": chosen.mean().item(),
            "reward_rejected": rejected.mean().item(),
            "grad_norm": grad_norm,
            "learning_rate": lr,
        }
        postfix = {"loss": f"{self.metrics['loss']:.4f}", "acc": f"{self.metrics['accuracy']:.2f}"}
        return StepReport(self.metrics, postfix=postfix)

    def write_checkpoint(self, run: RunDirectory, step: int) -> Path:
        stage = {"pair_order": self.pair_order.state_dict(), "metrics": self.metrics}
        shard_size = self.max_shard_size
        return write_policy_checkpoint(self.policy, run, step, self.tokenizer, stage, max_shard_size=shard_size)

    def finish(self, log: RunLog | None, step: int) -> None:
        if not self.eval_examples:
            return
        eval_metrics = evaluate_pairs(
            self.policy.model, self.tokenizer, self.eval_examples, batch_size=self.batch_size, kinds=self.eval_kinds
        )
        log.log(step, eval_metrics)
        self.metrics = {**self.metrics, **eval_metrics}
        self.eval_accuracy = eval_metrics["eval/pairwise_accuracy"]

    def save(self, folder: Path) -> Path:
        shards = self.max_shard_size
        return save_trained(self.policy, folder / "model", self.tokenizer, max_shard_size=shards, overwrite=True)
