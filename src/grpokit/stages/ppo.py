"""`grpokit ppo`: PPO with a learned critic, GRPO's loop with per-token advantages from a value model.

PPO (Schulman et al. 2017) as RLHF uses it (Ouyang et al. 2022, InstructGPT): the reward of a completion on its
last token, optionally a per-token KL penalty to the reference in the rewards, GAE (Schulman et al. 2016) over
the critic's values, whitened advantages, the clipped surrogate for the policy and a clipped value loss for the
critic. Everything else is GRPO's, reused rather than copied: the rollout, the reward functions, the reference,
the policy and its update machinery (`GRPOTrainer.sample`, `Policy`), evaluation, logging, monitors, signals and
checkpoints. The critic trains through a `Policy` of its own (`grpokit.model.critic`).

What the critic costs is the point of the comparison with GRPO (`grpokit compare`): a second model's weights, its
gradients and its AdamW moments, and a second forward and backward per micro-batch.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grpokit.config import ConfigError, PPOConfig
from grpokit.core import algo
from grpokit.core.types import Rollout
from grpokit.model.critic import ValueModel, build_critic, check_critic, completion_values, critic_on_meta
from grpokit.model.loading import ModelFolderError, check_model_source, check_same_tokenizer, check_vocabulary
from grpokit.model.lora import uses_lora
from grpokit.model.policy import NumericsError
from grpokit.model.saving import load_training_state, training_state
from grpokit.rollout.sampler import push_weights
from grpokit.runtime.distributed import Cluster
from grpokit.stages import update
from grpokit.stages.arguments import ArgumentError, stage_config
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.setup import stage_policy

CRITIC_FILE = "critic.safetensors"
CRITIC_SHARDS = "critic-shards"  # in a checkpoint folder under FSDP: the critic's torch.distributed.checkpoint files


class PPOTrainer(GRPOTrainer):
    """GRPO's loop (`GRPOTrainer`) with a critic: `critic` a `ValueModel` replaces what `critic_model` would load."""

    name = "PPO"
    config_class = PPOConfig

    def __init__(self, config: PPOConfig, *, critic: ValueModel | None = None, **grpo_arguments: Any):
        """`grpo_arguments`: those of `GRPOTrainer` (model, tokenizer, reward_funcs, datasets, sampler)."""
        config = stage_config(type(self).__name__, PPOConfig, config)
        check_critic(critic)
        if config.critic_model is not None and critic is None:
            check_model_source(config.critic_model, field="critic_model", tokenizer=False, kind="body")
        super().__init__(config, **grpo_arguments)
        cfg = self.cfg
        # a group whose completions all got one reward still has the critic's advantages: no "teaches nothing"
        self.monitor.group_advantages = False
        policy_weights = {id(p) for p in self.policy.model.parameters()}
        if critic is not None and (shared := sum(id(p) in policy_weights for p in critic.parameters())):
            raise ArgumentError(
                f"`critic` shares {shared} weight tensors with the policy: its updates would move the policy. Build "
                "it on a copy: ValueModel(copy.deepcopy(model).get_decoder()), or leave it out (grpokit copies)"
            )
        fill = None  # (under FSDP the default critic is built on the meta device and copies the policy's shards)
        if critic is None and cfg.critic_model is None and self.cluster.sharded:
            critic, fill = critic_on_meta(self.policy.model)
        elif critic is None:
            critic = build_critic(None if cfg.critic_model else self._starting_model(), cfg.critic_model, self.device)
        try:  # the critic reads the policy's token ids
            check_vocabulary(
                critic.decoder, self.tokenizer, field="critic_model", tokenizer_of="the policy's tokenizer"
            )
            if cfg.critic_model is not None:
                check_same_tokenizer(cfg.critic_model, self.tokenizer, field="critic_model")
        except ModelFolderError as err:
            raise ConfigError(str(err)) from None
        optimizer_steps = cfg.max_steps * cfg.num_iterations * (self.generation_size // self.minibatch_size)
        self.critic = stage_policy(
            critic,
            cfg,
            learning_rate=cfg.critic_learning_rate or cfg.learning_rate,
            total_steps=optimizer_steps,
            device=self.device,
            dtype=self.policy.compute_dtype,
            layout=cfg.training_forward,
            max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
            micro_batch_size=cfg.micro_batch_size,
            per_token=completion_values,
            cluster=self.cluster,  # its gradients summed over the ranks (ddp) or it sharded like the policy (fsdp)
            fill=fill,
        )
        self.beside = {CRITIC_SHARDS: self.critic}  # under FSDP its checkpoint is DCP shards beside the policy's

    def _starting_model(self) -> torch.nn.Module:
        """The policy's weights as they start (the default critic copies them): with LoRA its base, which is what
        merging the fresh adapters gives (their B matrices start at 0), on a copy."""
        model = self.policy.model
        return copy.deepcopy(model).merge_and_unload() if uses_lora(model) else model

    # ---------------------------------------------------------------- one step
    def step(self, rows: list[dict[str, Any]] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """rollout -> score -> (reference, old logprobs, values) -> per-token rewards -> GAE -> mu passes of
        policy and critic updates."""
        cfg, policy, critic, cluster = self.cfg, self.policy, self.critic, self.cluster
        b = self.sample(rows)  # this rank's rows (from b.first_row among the step's N), the whole step's rewards
        rollout = b.rollout
        mine = slice(b.first_row, b.first_row + rollout.num_sequences)
        scorable = b.scorable.to(self.device)  # (N,)
        # a completion no reward function could score has no reward to learn from: out of both losses
        mask = b.mask * scorable[mine].unsqueeze(-1).to(b.mask.dtype)  # (n, Tc)
        step_mask = b.step_mask * scorable.unsqueeze(-1).to(b.step_mask.dtype)  # (N, max_completion_length)
        ref_logp = policy.reference_logprobs(rollout)  # (n, Tc) or None
        in_reward = cfg.kl_penalty == "reward"
        # the sampling policy's logprobs, without a graph, only where they are needed before the update: for the
        # KL reward, or as the old policy of reused samples; one on-policy pass takes them detached (ratio 1)
        reuses_samples = cfg.num_iterations > 1 or self.minibatch_size < self.generation_size
        needs_old = reuses_samples or (ref_logp is not None and in_reward)
        old_logp = policy.logprobs(rollout) if needs_old else None  # (n, Tc)
        old_values = critic.logprobs(rollout)  # (n, Tc): V before this step's update
        finite = cluster.sum({"bad": float(not bool(old_values[mask.bool()].isfinite().all()))})["bad"] == 0
        if not finite:  # (on every rank: they stop together)
            raise NumericsError("the critic's values are NaN or inf: its weights no longer train")
        kl = None
        if ref_logp is not None and old_logp is not None:
            kl = algo.KL_ESTIMATORS[cfg.kl_estimator](old_logp, ref_logp)  # (n, Tc)
        scores = torch.where(scorable, b.total.to(self.device), 0.0)[mine]  # (n,)
        rewards = algo.token_rewards(scores, mask, kl=kl if in_reward else None, beta=cfg.beta)  # (n, Tc)
        advantages, returns = algo.gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)  # (n, Tc) x 2
        figures = value_figures(old_values, returns, advantages, mask, cluster)  # of the whole step
        if kl is not None and in_reward:
            rows_in_loss = float((mask.sum(-1) > 0).sum())  # a truncated (masked) or unscorable row pays nothing
            paid = cluster.sum({"kl": float((kl * mask).sum()), "rows": rows_in_loss})
            figures["kl_reward"] = -cfg.beta * paid["kl"] / max(paid["rows"], 1.0)
        if cfg.whiten_advantages:  # over the whole step's tokens, every rank's
            advantages = algo.whiten(advantages, mask, total=cluster_total(cluster))
        b.clock.append(time.perf_counter())
        stats = self._ppo_update(rollout, mask, step_mask, b.first_row, advantages, returns, old_logp, old_values,
                                 ref_logp)  # fmt: skip
        push_weights(self.sampler, policy.sampler_weights())
        b.clock.append(time.perf_counter())
        # beside each logged sample: its mean advantage over its tokens
        b.step_advantages = cluster.gather_uneven((advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)).cpu()
        metrics, samples = self.figures(b, {**stats, **figures})
        if cfg.num_generations == 1:  # no groups: their spread and diversity do not exist
            for key in ("frac_reward_zero_std", "diversity"):
                metrics.pop(key, None)
        return metrics, samples

    def _ppo_update(self, rollout: Rollout, mask, step_mask, first_row, advantages, returns, old_logp, old_values,
                    ref_logp):  # fmt: skip
        """GRPO's update loop (`update.run_update`) with the critic trained beside the policy: one optimizer step of
        each per minibatch, its value loss on the micro-batches the policy's pass took (its forwards take the
        policy's rows, after the policy's backward: one model's graph alive at a time). `mask` (n, T): this rank's
        rows' loss tokens, which start at `first_row` among the step's N; `step_mask` (N, T'): every rank's. The
        figures are summed over the ranks."""
        cfg, policy, critic = self.cfg, self.policy, self.critic
        lr, critic_lr = policy.lr, critic.lr  # (the rates of the step's first update)
        sums: dict[str, float] = defaultdict(float)

        def critic_pass(idx, m, minibatch) -> None:
            width = m.shape[1]
            values, _ = critic.forward(rollout, idx)  # (n, w)
            value_token_loss, value_clipped = algo.value_loss(
                values, old_values[idx, :width], returns[idx, :width], clip_range=cfg.cliprange_value
            )
            # the value loss: a mean over the minibatch's tokens, every rank's
            value_normalizer = max(float(step_mask[minibatch].sum()), 1.0)
            value_loss = cfg.vf_coef * algo.aggregate_loss(
                value_token_loss, m, loss_type="bnpo", normalizer=value_normalizer
            )
            if not math.isfinite(value := value_loss.item()):
                raise NumericsError(f"the value loss is {value}; the optimizer step was not applied")
            critic.backward(value_loss)
            sums["value_loss"] += value
            sums["value_clip_frac"] += float((value_clipped * m).sum())

        def critic_step() -> None:
            sums["critic/grad_norm"] += critic.optimizer_step()

        n_opt_steps = update.run_update(
            policy, rollout, mask=mask, step_mask=step_mask, first_row=first_row, advantages=advantages,
            old_logp=old_logp, ref_logp=ref_logp, loss_type=cfg.loss_type, surrogate=cfg.surrogate(),
            beta=cfg.beta if cfg.kl_penalty == "loss" else 0.0, num_iterations=cfg.num_iterations,
            minibatch_size=self.minibatch_size, max_completion_length=cfg.max_completion_length,
            shuffle=self.shuffle_generator, sums=sums, on_micro_batch=critic_pass, on_optimizer_step=critic_step,
            entropy=update.EntropyTerms(cfg.top_entropy_quantile, cfg.entropy_coef),
        )  # fmt: skip
        summed = (*update.FIGURES, "value_loss", "value_clip_frac")  # (the critic's gradient norm: of summed ones)
        update.sums_over_ranks(sums, self.cluster, rollout, old_logp, summed=summed)
        tokens = max(sums["tokens"], 1.0)
        stats = {
            **update.policy_figures(sums, n_opt_steps, with_kl=ref_logp is not None),
            "value_loss": sums["value_loss"] / n_opt_steps,
            "critic/grad_norm": sums["critic/grad_norm"] / n_opt_steps,
            "value_clip_frac": sums["value_clip_frac"] / tokens,
        }
        return {**stats, "learning_rate": lr, "critic/learning_rate": critic_lr}

    # ---------------------------------------------------------------- the run
    def save_beside_model(self, out: Path) -> None:
        """The critic, as `critic.safetensors`, written before the final model: a PPO run folder with model/ holds
        its critic, and a write the disk refuses leaves the run resumable from its last checkpoint. Rank 0 writes it;
        under FSDP every rank takes part in gathering it one tensor at a time, which rank 0 writes and lets go
        (`weight_files.write_streamed_file`): no rank holds the whole critic."""
        from safetensors.torch import save_model

        from grpokit.runtime.checkpoint import atomic_file
        from grpokit.runtime.weight_files import write_streamed_file

        path = out / CRITIC_FILE
        self.critic.check_finite(f"so {path} was not written")
        if not self.critic.fsdp_roots:
            if self.cluster.is_main:
                with atomic_file(path) as partial:  # whole or absent
                    save_model(self.critic.model, str(partial))
            return
        tensors = list(self.critic.model.state_dict().items())  # each rank's shards (DTensors): none gathered yet
        if not self.cluster.is_main:
            write_streamed_file(None, tensors)
            return
        with atomic_file(path) as partial, open(partial, "wb") as file:
            write_streamed_file(file, tensors)

    def stage_state(self) -> dict[str, Any]:
        """GRPO's, plus the critic: its weights, AdamW and schedule (under FSDP its weights and AdamW are shards in
        the checkpoint's CRITIC_SHARDS folder, `beside`)."""
        critic: dict[str, Any] = {"training": training_state(self.critic)}
        if not self.critic.fsdp_roots:
            critic["weights"] = {k: v.detach().to("cpu", copy=True) for k, v in self.critic.model.state_dict().items()}
        return {**super().stage_state(), "critic": critic}

    def _resume(self, folder: Path) -> dict[str, Any]:
        state = super()._resume(folder)  # (with the critic's shards, when the checkpoint has them)
        from grpokit.runtime.checkpoint import RunDirectoryError

        if "critic" not in state:
            raise RunDirectoryError(f"checkpoint {folder} holds no critic: it was written by a GRPO run, not PPO")
        if "weights" in state["critic"]:  # (a checkpoint written without fsdp: `resume_policy` refused it under fsdp)
            self.critic.model.load_state_dict(state["critic"]["weights"])
        elif not (folder / CRITIC_SHARDS).is_dir():
            raise RunDirectoryError(f"checkpoint {folder} holds neither the critic's weights nor {CRITIC_SHARDS}/")
        load_training_state(self.critic, state["critic"]["training"])
        return state


def value_figures(values, returns, advantages, mask, cluster: Cluster) -> dict[str, float]:
    """The critic's figures of the whole step from this rank's rows (n, T) and the others' (`cluster`): the means
    of the values, returns and advantages (before whitening: the critic's bias shows there) over the real tokens
    (`mask`; NaN when there are none) and the explained variance (`algo.explained_variance`) of every rank's tokens,
    gathered in row order."""
    sums = cluster.sum({"tokens": float(mask.sum()), **{k: float((x * mask).sum()) for k, x in
                        (("values", values), ("returns", returns), ("advantages", advantages))}})  # fmt: skip
    count = sums.pop("tokens")
    figures = {f"{k}/mean": total / count if count else float("nan") for k, total in sums.items()}
    real = mask.bool()
    step_values, step_returns = cluster.gather_uneven(values[real]), cluster.gather_uneven(returns[real])  # (M,)
    every = torch.ones_like(step_values, dtype=torch.bool)
    return {**figures, "explained_variance": algo.explained_variance(step_values, step_returns, every)}


def cluster_total(cluster: Cluster) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A 0-d tensor summed over the ranks (float64 on the wire), for `algo.whiten`; None in one process."""
    if not cluster.active:
        return None
    return lambda t: t.new_tensor(cluster.sum({"t": float(t)})["t"])
