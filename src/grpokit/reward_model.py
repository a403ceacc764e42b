"""Reward models: Bradley-Terry training on preference pairs, and scoring completions behind the reward contract.

A reward model is an `AutoModelForSequenceClassification` with one output, started from a causal LM
folder (an SFT model, typically: its body is kept, the score head is new). It reads
prompt + completion + EOS and its reward is the score head at the LAST real token of the row.

Deviations from the common recipe, and why:
- Pooling picks the last token by the attention mask, not by `input_ids != pad_token_id` as
  transformers' own forward does: with a pad == eos tokenizer the latter would skip the EOS that ends
  every completion. Positions skip left padding, so padding never changes a reward.
- The scorer re-renders and re-tokenizes every completion with the reward model's own tokenizer and
  chat template, so the policy and the reward model may use different tokenizers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from grpokit.arguments import python_arguments
from grpokit.checkpoint import numerics_stop
from grpokit.config import RewardModelConfig
from grpokit.data import (
    DataError,
    InputWarning,
    ShuffledEpochs,
    check_columns,
    check_prompt,
    completion_text,
    load_rows,
    pad_batch,
    render_prompt,
    text_messages,
    where,
)
from grpokit.modeling import (
    check_model_source,
    check_positions,
    check_vocabulary,
    load_pretrained,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from grpokit.packing import position_ids_from_mask
from grpokit.policy import NumericsError
from grpokit.run_setup import RunSetup, stage_policy
from grpokit.runlog import RunLog, progress


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


def sequence_rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward (B,) float32 of each row: the score head applied at the row's last token with mask 1.

    Works for left and right padding alike, and for pad == eos. A model without a `score` head (not
    one of transformers' decoder classifiers) falls back to its own forward and pooling.
    """
    mask = attention_mask.long()  # (B, T)
    position_ids = position_ids_from_mask(mask)  # (B, T)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        return logits[:, 0].float()  # (B,)
    out = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)  # (B,) last position with mask 1
    pooled = out.last_hidden_state[torch.arange(mask.shape[0], device=mask.device), last]  # (B, H)
    return head(pooled)[:, 0].float()  # (B,)


def reward_model_text(tokenizer: Any, prompt: str | list[dict[str, str]], completion: str) -> str:
    """What a reward model reads for one completion, built with ITS tokenizer.

    Chat messages with a chat template: the conversation with the completion as the assistant's turn.
    Otherwise: the rendered prompt + completion + EOS (the EOS marks where the answer ends, and is the
    token whose hidden state is scored).
    """
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        messages = [*text_messages(prompt), {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return render_prompt(tokenizer, prompt) + completion + tokenizer.eos_token


def encode_texts(
    tokenizer: Any, prompts: list[Any], completions: list[str], max_length: int | None = None
) -> list[list[int]]:
    """Token ids of each `reward_model_text`; an over-long row keeps its LAST tokens (the answer and its EOS).
    A chat template already holds any BOS, so it gets no special tokens added."""
    texts = [reward_model_text(tokenizer, p, c) for p, c in zip(prompts, completions)]
    out: list[list[int]] = [[] for _ in texts]
    for plain in (True, False):  # one batched tokenizer call per setting of add_special_tokens
        rows = [i for i, p in enumerate(prompts) if isinstance(p, str) == plain]
        if rows:
            encoded = tokenizer([texts[i] for i in rows], add_special_tokens=plain)["input_ids"]
            for i, ids in zip(rows, encoded):
                out[i] = list(ids)[-max_length:] if max_length is not None else list(ids)
    return out


def encode_text(tokenizer: Any, prompt: Any, completion: str, max_length: int | None = None) -> list[int]:
    """`encode_texts` of one completion."""
    return encode_texts(tokenizer, [prompt], [completion], max_length)[0]


def load_reward_model(
    path: str | Path,
    device: Any,
    dtype: torch.dtype,
    *,
    pad_token_id: int | None = None,
    new_head: bool = False,
    field: str = "reward_funcs",
) -> Any:
    """AutoModelForSequenceClassification (one output) from a local folder or a hub id (`modeling.load_pretrained`,
    which refuses weights that do not match the config). A trained reward model, whose score head must be in the
    weights; with `new_head` (the start of reward-model training, a critic), also a causal LM whose body it keeps,
    the score head then newly initialised from the global torch RNG. `field` names the config field in errors."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()  # the loading bar of a model that is not the one trained is noise
    try:
        model = load_pretrained(
            AutoModelForSequenceClassification,
            str(path),
            dtype,
            field=field,
            kind="body" if new_head else "reward_model",
            new_modules=("score.",) if new_head else (),
            num_labels=1,
        )
    finally:
        if bars:
            transformers.logging.enable_progress_bar()
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # transformers' own pooling (other tools) refuses batches without it
    return model.to(device)


class RewardModelScorer:
    """A reward model folder as a reward function: fn(prompts, completions, *, raw_prompts=None, **columns) -> floats.

    Each completion is rendered with the reward model's own tokenizer and chat template from its raw prompt
    (text or chat messages; the policy-rendered `prompts[i]` when no raw prompt is given), scored in batches
    of `batch_size` without gradients, and returned as Python floats.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int | None = None,
        dtype: str = "auto",
        model: Any = None,
        tokenizer: Any = None,
        field: str = "reward_funcs",
    ):
        """`model` / `tokenizer`: use these objects instead of loading them from `path`; `field`: the config field
        that named the folder, for errors."""
        self.path = Path(path)
        # `train_reward_model` always saves to RUN/model, so the run's folder is what tells scorers apart
        self.__name__ = f"{self.path.parent.name}/{self.path.name}"
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        if model is None:
            check_model_source(self.path, field=field, tokenizer=tokenizer is None, kind="reward_model")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.path)
        if model is None:
            model = load_reward_model(
                self.path,
                self.device,
                resolve_dtype(dtype, self.device),
                pad_token_id=self.tokenizer.pad_token_id,
                field=field,
            )
        check_vocabulary(model, self.tokenizer, field=field, tokenizer_of=f"the tokenizer of {self.path}")
        self.model = model.to(self.device).eval().requires_grad_(False)

    def __repr__(self) -> str:
        return f"RewardModelScorer({str(self.path)!r})"

    def texts(self, prompts: list[str], completions: list[str], raw_prompts: list[Any] | None = None) -> list[str]:
        """The text the reward model reads for each completion."""
        sources = raw_prompts if raw_prompts is not None else prompts
        return [reward_model_text(self.tokenizer, p, c) for p, c in zip(sources, completions)]

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], completions: list[str], *, raw_prompts: list[Any] | None = None, **columns: Any
    ) -> list[float]:
        sources = raw_prompts if raw_prompts is not None else prompts
        if len(sources) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(sources)} prompts")
        texts = [completion_text(c) for c in completions]  # plain or conversational
        ids = encode_texts(self.tokenizer, list(sources), texts, self.max_length)
        pad_id = self.tokenizer.pad_token_id
        side = getattr(self.tokenizer, "padding_side", "right")
        rewards: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            b_ids, b_mask = pad_batch(ids[start : start + self.batch_size], pad_id, side=side)  # (b, T)
            rewards += sequence_rewards(self.model, b_ids.to(self.device), b_mask.to(self.device)).tolist()
        return rewards


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
        from grpokit.tasks import get_task
        from grpokit.tasks.preferences import preference_pairs

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
            "load one with grpokit.reward_model.load_reward_model"
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

    pair_order = ShuffledEpochs(len(train_examples), cfg.seed)
    side = getattr(tokenizer, "padding_side", "right")
    metrics: dict[str, float] = {}
    with run_dir as run:
        start = 0
        if run.checkpoint is not None:
            state = policy.resume(run.checkpoint)
            pair_order.load_state_dict(state["pair_order"])
            metrics, start = state["metrics"], state["step"]
        run.discard_later_checkpoints()  # only now that the checkpoint resumed has loaded
        log = RunLog(run.path, tensorboard=False, config=cfg, resume_step=start or None)
        steps = range(start + 1, cfg.max_steps + 1)
        step = start
        bar = progress(steps, "reward-model", initial=start, total=cfg.max_steps, enabled=cfg.progress)
        try:
            for step in bar:
                b_idx = pair_order.take(cfg.batch_size)
                b_chosen, b_rejected, b_margin = policy.run(
                    pair_rewards, [train_examples[i] for i in b_idx], tokenizer.pad_token_id, side
                )
                loss = bradley_terry_loss(
                    b_chosen,
                    b_rejected,
                    margin=b_margin if cfg.margin_column else None,
                    center_coefficient=cfg.center_rewards_coefficient,
                )
                policy.backward(loss)
                lr = policy.lr
                grad_norm = policy.optimizer_step()
                if step % 10 == 0 or step == cfg.max_steps:
                    metrics = {
                        "loss": loss.item(),
                        "accuracy": (b_chosen > b_rejected).float().mean().item(),
                        "reward_chosen": b_chosen.mean().item(),
                        "reward_rejected": b_rejected.mean().item(),
                        "grad_norm": grad_norm,
                        "learning_rate": lr,
                    }
                    log.log(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
                if run.checkpoint_due(step, cfg.max_steps, cfg.save_every):
                    stage = {"pair_order": pair_order.state_dict(), "metrics": metrics}
                    run.check_stop(step, policy.write_checkpoint(run, step, tokenizer, stage))

            eval_accuracy = None
            if eval_examples:
                eval_metrics = evaluate_pairs(
                    policy.model, tokenizer, eval_examples, batch_size=cfg.batch_size, kinds=eval_kinds
                )
                log.log(cfg.max_steps, eval_metrics)
                metrics = {**metrics, **eval_metrics}
                eval_accuracy = eval_metrics["eval/pairwise_accuracy"]
        except NumericsError as err:  # say where the run stopped and what is left to resume
            raise NumericsError(numerics_stop(run.path, f"step {step} (learning rate {policy.lr:g})", err)) from None
        finally:
            bar.close()
            log.close()
        model_dir = policy.save(run.path / "model", tokenizer, overwrite=True)  # the run's own
    return RewardModelResult(model_dir=model_dir, eval_accuracy=eval_accuracy, metrics=metrics)
