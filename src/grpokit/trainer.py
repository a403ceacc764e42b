"""The GRPO loop: rollout -> score -> advantages -> update -> log, top to bottom.

GRPO (Shao et al. 2024, DeepSeekMath, section 4.1): sample G completions per prompt, normalize their
rewards inside the group to get advantages, and take clipped policy-gradient steps with a KL penalty
to a frozen reference. No value network. Where grpokit deviates from the paper:
- the token-loss aggregation is a choice (`loss_type`): the paper's per-sequence mean (`grpo`), DAPO's
  token mean, Dr. GRPO's constant normalizer; every normalizer is counted over the whole optimizer
  step, so micro-batching never changes the gradient;
- `beta` defaults to 0 (no reference model is loaded) as DAPO and Dr. GRPO found the KL term
  unnecessary for verifiable rewards; set it > 0 for the paper's behaviour; with LoRA the reference is
  the policy with its adapters switched off (no second copy), without it a frozen copy that
  `ref_sync_every` can pull towards the policy (TR-DPO);
- the old-policy logprobs of a single on-policy pass are the current ones detached (ratio = 1), and
  are recomputed once before the update only when samples are reused (mu > 1 or several minibatches).
"""

from __future__ import annotations

import copy
import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit import algo
from grpokit.checkpoint import save_model
from grpokit.config import ConfigError, GRPOConfig
from grpokit.data import ShuffledEpochs, check_columns, encode_prompts, load_rows
from grpokit.evaluate import accuracy, decode_completions
from grpokit.lora import adapters_disabled, apply_lora, save_policy, sync_reference, uses_lora
from grpokit.modeling import (
    completion_logprobs,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from grpokit.monitor import SignalMonitor, group_diversity
from grpokit.optim import build_optimizer
from grpokit.rewards import RewardFn, build_reward_funcs, exact_match, score
from grpokit.rollout import SamplingParams, generate
from grpokit.runlog import RunLog, plot_curves, read_metrics
from grpokit.tasks import get_task
from grpokit.types import Rollout


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    plot_path: Path | None
    final_metrics: dict[str, float]
    eval_history: list[dict[str, float]]
    warnings: list[str]
    monitor_summary: list[str]  # one line per monitor: FIRED with its first warning, or its last figures
    monitor_fired: dict[str, str]  # monitor kind -> its first warning


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class GRPOTrainer:
    """Owns the policy, the optional frozen reference, the optimizer and the run directory."""

    def __init__(
        self,
        config: GRPOConfig,
        *,
        model: Any = None,
        tokenizer: Any = None,
        reward_funcs: list[tuple[str, RewardFn]] | None = None,
        train_rows: list[dict[str, Any]] | None = None,
        eval_rows: list[dict[str, Any]] | None = None,
    ):
        config.validate(model_given=model is not None)
        self.cfg = cfg = config
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        self.task = get_task(cfg.task, num_digits=cfg.task_num_digits) if cfg.task else None

        # Data and rewards are checked before the model is loaded: a typo costs a second, not a load.
        self.train_rows, self.eval_rows = self._load_rows(train_rows, eval_rows)
        build = functools.partial(
            build_reward_funcs,
            format_pattern=cfg.format_pattern,
            max_completion_length=cfg.max_completion_length,
            overlong_buffer=cfg.overlong_buffer,
            task=self.task,
            device=str(self.device),
            reward_model_batch_size=cfg.reward_model_batch_size,
        )
        self.reward_funcs = reward_funcs or build(cfg.reward_funcs)
        # Watched, never optimized: the honest yardstick beside a learned (proxy) reward.
        self.gold_funcs = build([cfg.gold_reward]) if cfg.gold_reward else []
        weights = cfg.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ConfigError(
                f"config field `reward_weights` has {len(weights)} entries for "
                f"{len(self.reward_funcs)} reward functions"
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)  # (K,)
        if "accuracy" in [name for name, _ in self.reward_funcs + self.gold_funcs]:
            check_columns(self.train_rows, ["answer"], "train data (the `accuracy` reward needs it)")

        self.tokenizer = ensure_pad_token(tokenizer) if tokenizer is not None else load_tokenizer(cfg.model)
        self.model = (model if model is not None else load_model(cfg.model, self.device, dtype)).to(self.device)
        if cfg.lora.r > 0:  # before the optimizer is built, so AdamW holds state for the adapters only
            self.model = apply_lora(self.model, cfg.lora)
        # beta = 0: no reference at all, which is most of GRPO's memory saving over PPO after the critic.
        # With LoRA the reference is the policy with its adapters off (`_reference_logprobs`): no copy either.
        self.ref_model = None
        if cfg.beta > 0 and not uses_lora(self.model):
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

        self.generation_size = cfg.prompts_per_step * cfg.num_generations  # N
        self.minibatch_size = cfg.minibatch_size or self.generation_size
        self.micro_batch_size = cfg.micro_batch_size or self.minibatch_size
        optimizer_steps = cfg.max_steps * cfg.num_iterations * (self.generation_size // self.minibatch_size)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, optimizer_steps)
        self.sampling = SamplingParams(
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop_strings=tuple(cfg.stop_strings),
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self._prompt_order = ShuffledEpochs(len(self.train_rows), cfg.seed)
        self.monitor = SignalMonitor(long_window=cfg.monitor_window)
        self.output_dir = Path(cfg.output_dir)
        self.log: RunLog | None = None

    def _load_rows(self, train_rows, eval_rows) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        if train_rows is None:
            if self.task is not None:
                train_rows = self.task.rows(cfg.num_train_prompts, split="train", seed=cfg.seed)
            else:
                train_rows = load_rows(cfg.train_data, field="train_data")
        if eval_rows is None:
            if cfg.eval_data is not None:
                eval_rows = load_rows(cfg.eval_data, field="eval_data")
            elif self.task is not None:
                eval_rows = self.task.rows(cfg.num_eval_prompts, split="eval", seed=cfg.seed)
            else:
                eval_rows = []
        # Reward functions get every column for every completion, so every row must carry the same ones.
        check_columns(train_rows, [cfg.prompt_column, *train_rows[0]], "train data")
        check_columns(eval_rows, [cfg.prompt_column], "eval data")
        return train_rows, eval_rows[: cfg.num_eval_prompts]

    def _next_rows(self) -> list[dict[str, Any]]:
        """P rows, walking a seeded shuffle of the training set epoch after epoch."""
        return [self.train_rows[i] for i in self._prompt_order.take(self.cfg.prompts_per_step)]

    # ---------------------------------------------------------------- one step
    def step(self, rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """rollout -> score -> advantages -> (reference, old logprobs) -> mu passes of updates."""
        cfg, G = self.cfg, self.cfg.num_generations
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's first update uses
        t0 = time.perf_counter()
        prompt_texts, prompt_ids, n_cut = encode_prompts(
            self.tokenizer, [r[cfg.prompt_column] for r in rows], cfg.max_prompt_length
        )
        rollout = generate(
            self.model,
            prompt_ids,
            num_generations=G,
            params=self.sampling,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            generator=self.generator,
            tokenizer=self.tokenizer,
        )
        t_rollout = time.perf_counter()

        completions = decode_completions(self.tokenizer, rollout.completion_ids, rollout.completion_mask)
        lengths = rollout.completion_mask.sum(-1)  # (N,)
        columns = {key: [row[key] for row in rows for _ in range(G)] for key in rows[0] if key != cfg.prompt_column}
        columns.update(
            completion_lengths=lengths.tolist(),
            truncated=rollout.truncated.tolist(),
            raw_prompts=[row[cfg.prompt_column] for row in rows for _ in range(G)],
        )
        prompts_n = [p for p in prompt_texts for _ in range(G)]
        rewards = score(self.reward_funcs, prompts_n, completions, columns)  # (N, K)
        total, _ = algo.combine_rewards(rewards, self.reward_weights)  # (N,)
        advantages = algo.multi_reward_advantages(
            rewards, self.reward_weights, group_size=G, scale=cfg.scale_rewards, aggregation=cfg.reward_aggregation
        ).to(self.device)  # (N,)
        gold = score(self.gold_funcs, prompts_n, completions, columns) if self.gold_funcs else None  # (N, 1)
        t_reward = time.perf_counter()

        mask = rollout.completion_mask.float()  # (N, Tc)
        if cfg.mask_truncated_completions:
            mask = mask * (~rollout.truncated).float().unsqueeze(-1).to(mask.device)
        ref_logp = self._reference_logprobs(rollout)
        reuses_samples = cfg.num_iterations > 1 or self.minibatch_size < self.generation_size
        old_logp = self._logprobs_no_grad(self.model, rollout) if reuses_samples else None
        t_ref = time.perf_counter()

        stats = self._update(rollout, mask, advantages, old_logp, ref_logp)
        t_update = time.perf_counter()

        group_std = total.view(-1, G).std(dim=-1)  # (P,)
        metrics = {
            "reward/mean": total.mean().item(),
            "reward/std": total.std().item(),
            **{f"reward/{name}": rewards[:, k].nanmean().item() for k, (name, _) in enumerate(self.reward_funcs)},
            **({"gold/mean": gold.nanmean().item()} if gold is not None else {}),
            "frac_zero_std_groups": (group_std == 0).float().mean().item(),
            "diversity": group_diversity(completions, G),
            "completion_length": lengths.float().mean().item(),
            "truncated_frac": rollout.truncated.float().mean().item(),
            "prompts_truncated": float(n_cut),
            **stats,
            "lr": lr,
            "time/rollout": t_rollout - t0,
            "time/reward": t_reward - t_rollout,
            "time/reference": t_ref - t_reward,
            "time/update": t_update - t_ref,
            "time/step": t_update - t0,
            "tokens_per_s": float(lengths.sum()) / (t_update - t0),
        }
        samples = [
            {
                "prompt": prompts_n[i],
                "completion": completions[i],
                "reward": total[i].item(),
                "advantage": advantages[i].item(),
            }
            for i in range(0, len(completions), max(1, G // 2))
        ]
        return metrics, samples

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        """(N, Tc) logprobs under the KL reference; None when beta = 0."""
        if self.cfg.beta == 0:
            return None
        if self.ref_model is not None:
            return self._logprobs_no_grad(self.ref_model, rollout)
        was_training = self.model.training
        self.model.eval()  # as the frozen copy is: the reference never sees dropout
        try:
            with adapters_disabled(self.model):
                return self._logprobs_no_grad(self.model, rollout)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _logprobs_no_grad(self, model: Any, rollout: Rollout) -> torch.Tensor:
        """Logprobs of the sampled tokens under `model`, in micro-batches, without a graph."""
        out = []
        for idx in torch.arange(rollout.num_sequences).split(self.micro_batch_size):
            logp, _ = self._forward(model, rollout, idx)
            out.append(_pad_to(logp, rollout.completion_ids.shape[1]))
        return torch.cat(out)  # (N, Tc)

    def _forward(self, model: Any, rollout: Rollout, idx: torch.Tensor, *, with_entropy: bool = False):
        """Completion logprobs for rows `idx`, trimmed to the columns those rows use (padding-invariant)."""
        prompt_mask = rollout.prompt_mask[idx]  # (n, Tp)
        completion_mask = rollout.completion_mask[idx]  # (n, Tc)
        first = int((prompt_mask.sum(0) > 0).nonzero()[0])  # left padding shared by all n rows
        width = int(completion_mask.sum(-1).max().clamp(min=1))
        return completion_logprobs(
            model,
            rollout.prompt_ids[idx, first:],
            prompt_mask[:, first:],
            rollout.completion_ids[idx, :width],
            completion_mask[:, :width],
            temperature=self.cfg.temperature,
            chunk_size=self.cfg.logprob_chunk_size,
            with_entropy=with_entropy,
        )

    def _update(
        self,
        rollout: Rollout,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        old_logp: torch.Tensor | None,
        ref_logp: torch.Tensor | None,
    ) -> dict[str, float]:
        """mu passes; each pass splits the batch into minibatches (one optimizer step each) and those into
        micro-batches (one backward each). Every normalizer is counted over the minibatch."""
        cfg, N = self.cfg, rollout.num_sequences
        self.model.train()
        sums: dict[str, float] = {
            "loss": 0.0,
            "grad_norm": 0.0,
            "kl": 0.0,
            "entropy": 0.0,
            "clip_frac/low": 0.0,
            "clip_frac/high": 0.0,
            "sampler_logp_diff": 0.0,
        }
        n_opt_steps, tokens_seen, first_pass_tokens = 0, 0.0, 0.0
        generation_tokens = int(mask.sum())
        for iteration in range(cfg.num_iterations):
            order = (
                torch.randperm(N, generator=self.shuffle_generator)
                if iteration > 0 or old_logp is not None
                else torch.arange(N)
            )
            for mb_idx in order.split(self.minibatch_size):
                normalizer = algo.step_normalizer(
                    cfg.loss_type,
                    mask[mb_idx],
                    generation_tokens=generation_tokens,
                    generation_sequences=N,
                    max_completion_length=cfg.max_completion_length,
                )
                for idx in mb_idx.split(self.micro_batch_size):
                    logp, entropy = self._forward(self.model, rollout, idx, with_entropy=iteration == 0)
                    width = logp.shape[1]
                    m = mask[idx, :width]  # (n, w)
                    old = old_logp[idx, :width] if old_logp is not None else logp.detach()
                    ref = ref_logp[idx, :width] if ref_logp is not None else None
                    token_loss, tok_stats = algo.per_token_loss(
                        logp,
                        old,
                        advantages[idx],
                        m,
                        ref_logp=ref,
                        beta=cfg.beta,
                        epsilon_low=cfg.epsilon_low,
                        epsilon_high=cfg.epsilon_high,
                        kl_estimator=cfg.kl_estimator,
                        importance_level=cfg.importance_level,
                    )
                    loss = algo.aggregate_loss(token_loss, m, loss_type=cfg.loss_type, normalizer=normalizer)
                    loss.backward()
                    n_tok = float(m.sum())
                    sums["loss"] += loss.item()
                    sums["clip_frac/low"] += float((tok_stats["clipped_low"] * m).sum())
                    sums["clip_frac/high"] += float((tok_stats["clipped_high"] * m).sum())
                    sums["kl"] += float((tok_stats["kl"] * m).sum())
                    tokens_seen += n_tok
                    if iteration == 0:
                        sums["entropy"] += float((entropy * m).sum())
                        first_pass_tokens += n_tok
                    if old_logp is None:  # one pass, one optimizer step: logp is still the sampling policy's
                        gap = _max_gap(logp.detach(), rollout.sampling_logp[idx, :width], m)
                        sums["sampler_logp_diff"] = max(sums["sampler_logp_diff"], gap)
                sums["grad_norm"] += self._optimizer_step()
                n_opt_steps += 1
        if old_logp is not None:
            sums["sampler_logp_diff"] = _max_gap(old_logp, rollout.sampling_logp, rollout.completion_mask.float())
        tokens_seen, first_pass_tokens = max(tokens_seen, 1.0), max(first_pass_tokens, 1.0)
        stats = {
            "loss": sums["loss"] / n_opt_steps,
            "grad_norm": sums["grad_norm"] / n_opt_steps,
            "entropy": sums["entropy"] / first_pass_tokens,
            "clip_frac/low": sums["clip_frac/low"] / tokens_seen,
            "clip_frac/high": sums["clip_frac/high"] / tokens_seen,
            "sampler_logp_diff": sums["sampler_logp_diff"],
        }
        stats["clip_frac/total"] = stats["clip_frac/low"] + stats["clip_frac/high"]
        if ref_logp is not None:
            stats["kl"] = sums["kl"] / tokens_seen
        return stats

    def _optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---------------------------------------------------------------- the run
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy with the task's gold checker (or exact match on `answer`), greedy and sampled."""
        if not self.eval_rows or "answer" not in self.eval_rows[0]:
            return {}
        is_correct = self.task.is_correct if self.task is not None else exact_match
        kwargs = {
            "max_new_tokens": self.cfg.max_completion_length,
            "seed": self.cfg.seed,
            "prompt_column": self.cfg.prompt_column,
            "max_prompt_length": self.cfg.max_prompt_length,
        }
        return {
            "eval/accuracy_greedy": accuracy(
                self.model, self.tokenizer, self.eval_rows, is_correct, temperature=0.0, **kwargs
            ),
            "eval/accuracy_sampled": accuracy(
                self.model,
                self.tokenizer,
                self.eval_rows,
                is_correct,
                temperature=self.cfg.eval_temperature,
                **kwargs,
            ),
        }

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.log = RunLog(self.output_dir, tensorboard=cfg.tensorboard, config=cfg)
        eval_history = []
        if result := self.evaluate():
            eval_history.append({"step": 0, **result})
            self.log.log(0, result)
        bar = tqdm(range(1, cfg.max_steps + 1), desc="grpo", disable=not cfg.progress, dynamic_ncols=True)
        metrics: dict[str, float] = {}
        try:
            for step in bar:
                metrics, samples = self.step(self._next_rows())
                if self.ref_model is not None and cfg.ref_sync_every and step % cfg.ref_sync_every == 0:
                    sync_reference(self.ref_model, self.model, cfg.ref_sync_alpha)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    result = self.evaluate()
                    metrics.update(result)
                    eval_history.append({"step": step, **result})
                self.log.log(step, metrics)
                if cfg.log_completions_every and (step % cfg.log_completions_every == 0 or step == 1):
                    self.log.log_completions(step, samples)
                for warning in self.monitor.update(step, metrics, group_size=cfg.num_generations):
                    bar.write(f"WARNING {warning}")
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save(self.output_dir / f"checkpoint-{step}")
            if result := self.evaluate():
                eval_history.append({"step": cfg.max_steps, **result})
                self.log.log(cfg.max_steps, result)
        finally:
            bar.close()
            self.log.close()
        model_dir = self.save(self.output_dir / "model")
        plot = plot_curves(read_metrics(self.log.metrics_path), self.output_dir / "curves.png", title="GRPO")
        return TrainResult(
            self.output_dir,
            model_dir,
            plot,
            metrics,
            eval_history,
            list(self.monitor.warnings),
            self.monitor.summary(),
            dict(self.monitor.fired),
        )

    def save(self, path: Path) -> Path:
        """The policy in `save_pretrained` form; with LoRA merged into the weights or as an adapter (`lora.save`)."""
        if uses_lora(self.model):
            return save_policy(self.model, self.tokenizer, path, self.cfg.lora.save)
        return save_model(self.model, self.tokenizer, path)


def _max_gap(logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |trainer - sampler| logprob over real tokens: should be ~1e-6 in fp32; a large value means
    the sampler and the trainer do not see the same model (dtype, kernels, or a bug)."""
    return float(((logp - sampling_logp.to(logp.device)).abs() * mask).max())


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))
