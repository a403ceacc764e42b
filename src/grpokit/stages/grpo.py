"""The GRPO loop: rollout -> score -> advantages -> update -> log, top to bottom.

GRPO (Shao et al. 2024, DeepSeekMath, section 4.1): sample G completions per prompt, normalize their rewards inside
the group to get advantages, and take clipped policy-gradient steps with a KL penalty to a frozen reference. No
value network. Where grpokit deviates from the paper:
- the token-loss aggregation is a choice (`loss_type`): the paper's per-sequence mean (`grpo`), DAPO's token mean,
  Dr. GRPO's constant normalizer; every normalizer is counted over the whole optimizer step, so micro-batching
  never changes the gradient;
- `beta` defaults to 0 (no reference model is loaded) as DAPO and Dr. GRPO found the KL term unnecessary for
  verifiable rewards; set it > 0 for the paper's behaviour; with LoRA the reference is the policy with its adapters
  switched off (no second copy), without it a frozen copy that `ref_sync_every` can pull towards the policy (TR-DPO);
- the old-policy logprobs of a single on-policy pass are the current ones detached (ratio = 1), and are recomputed
  once before the update only when samples are reused (mu > 1 or several minibatches).
PPO (`grpokit.stages.ppo`) is this loop with a critic's per-token advantages in place of the group's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from grpokit.config import GRPOConfig
from grpokit.core.types import Generation, Rollout, StepBatch, TrainResult
from grpokit.data.rows import ShuffledEpochs, encode_prompts, grpo_rows, scan_all_prompts
from grpokit.model.loading import check_context_length
from grpokit.model.saving import resume_policy, save_trained, write_policy_checkpoint
from grpokit.model.sharded import training_model
from grpokit.report.monitor import SignalMonitor
from grpokit.report.runlog import RunLog, plot_curves, read_metrics
from grpokit.rewards.functions import RewardFn, reward_inputs
from grpokit.rollout.evaluate import decode_completions, heldout_eval, require_heldout_rows
from grpokit.rollout.sampler import KVCacheSampler, Sampler, call_generate, check_rollout, prompt_seeds, push_weights
from grpokit.runtime import machine
from grpokit.runtime.checkpoint import RunDirectory
from grpokit.runtime.distributed import Cluster
from grpokit.stages import dynamic_sampling, update
from grpokit.stages import setup as run_setup
from grpokit.stages.arguments import python_arguments
from grpokit.stages.figures import step_figures
from grpokit.stages.loop import LoopSettings, RunHooks, StepReport, run_stage
from grpokit.stages.progress import at_step, trainer_state
from grpokit.stages.setup import RunSetup, grpo_policy, grpo_rewards, grpo_sampler, sampling_params, step_sizes


class GRPOTrainer:
    """The GRPO loop over a `Policy` (model, reference, optimizer) and a `Sampler` (rollouts)."""

    name = "GRPO"  # on the progress bar and the plot
    config_class: type = GRPOConfig  # the config it runs (a subclass's trainer runs the subclass's)
    hooks: RunHooks = RunHooks()  # called at the run's events (`loop.RunHooks`; the TRL adapter's callbacks)
    beside: dict[str, Any] | None = None  # the other Policies by checkpoint folder, for their FSDP shards (a critic)

    def __init__(
        self,
        config: GRPOConfig,
        *,
        model: Any = None,
        tokenizer: Any = None,
        reward_funcs: RewardFn | list[RewardFn | tuple[str, RewardFn] | str] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        sampler: Sampler | None = None,
        tools: list[Any] | None = None,
        environment_factory: Any = None,
    ):
        """`config` is a GRPOConfig (or its YAML file's path, or a dict of its fields). `model` (a path, a hub id or a
        model object), `tokenizer`, `reward_funcs` (a function, a list of them, (name, fn) pairs or names),
        `train_dataset` / `eval_dataset` (a `datasets.Dataset`, a list of dicts or a path) and `sampler` replace what
        the config would load or build (`tools`, `environment_factory`: its `tools`, `environment`); their types are
        checked first (`python_arguments`). The config saved with the run records what ran (model, rewards, tools)."""
        args = python_arguments(
            type(self).__name__, self.config_class, config, model=model, tokenizer=tokenizer, reward_funcs=reward_funcs,
            sampler=sampler, datasets={"train_dataset": train_dataset, "eval_dataset": eval_dataset},
        )  # fmt: skip
        model, reward_funcs = args.model, args.reward_funcs
        train_dataset, eval_dataset = args.rows["train_dataset"], args.rows["eval_dataset"]
        self.cluster = Cluster.from_env(args.config.distributed, prompts_per_step=args.config.prompts_per_step,
                                        timeout_s=args.config.ddp_timeout)  # fmt: skip
        setup = RunSetup(args.config, self.cluster)  # seeded, threads pinned (1 rank: no torchrun)
        self.cfg = cfg = setup.cfg
        self.device, dtype = setup.device, setup.dtype
        self.task = run_setup.run_task(cfg)  # (None: the rows come from train_data or are handed in)
        # Data, rewards and the output folder are checked before the model loads: a typo costs a second, not a load.
        self.train_rows, self.eval_rows = grpo_rows(
            self.task, train_dataset, eval_dataset, train_data=cfg.train_data, eval_data=cfg.eval_data, seed=cfg.seed,
            num_train_prompts=cfg.num_train_prompts, num_eval_prompts=cfg.num_eval_prompts,
            prompt_column=cfg.prompt_column,
        )  # fmt: skip
        source = cfg.eval_data is not None or eval_dataset is not None or self.task is not None  # (cut to 0?)
        require_heldout_rows(cfg.eval_every, self.eval_rows, cfg.num_eval_prompts if source else None)
        self.state = trainer_state(cfg, len(self.train_rows), self.cluster)  # TRL's: what rewards (and callbacks) see
        self.make_environment = run_setup.environments(cfg, tools, environment_factory)  # (None: single-turn)
        self.rewards = grpo_rewards(cfg, self.task, reward_funcs, self.train_rows, self.eval_rows, self.state,
                                    self.make_environment)  # fmt: skip
        self.run_dir, self.tokenizer = setup.open(
            model=model, tokenizer=tokenizer, train_data=self.train_rows, eval_data=self.eval_rows
        )
        self.template = run_setup.prompt_template(cfg, self.tokenizer, self.make_environment, self.train_rows)
        # what grpokit will change in the prompts, said once (InputWarning), before the model loads
        self.input_warnings, longest_prompt = scan_all_prompts(
            self.tokenizer, self.train_rows, self.eval_rows, prompt_column=cfg.prompt_column,
            max_prompt_length=cfg.max_prompt_length, prompts_per_step=cfg.prompts_per_step,
            chat_template_kwargs=self.template,  # (the config's, with tool_format chat the tools' schemas too)
        )  # fmt: skip
        machine.check_grpo_memory(
            model if model is not None else cfg.model, step_sizes(cfg), longest_prompt, self.device, dtype,
            world_size=self.cluster.world_size, num_eval_rows=len(self.eval_rows),
            in_process_sampler=(sampler is None and not cfg.use_vllm) or isinstance(sampler, KVCacheSampler),
        )  # fmt: skip
        model = training_model(model, cfg.model, self.device, self.cluster)  # (fsdp: on the meta device, if it can)
        check_context_length(model, longest_prompt, cfg.max_completion_length, tokenizer=self.tokenizer)

        self.generation_size = cfg.prompts_per_step * cfg.num_generations  # N
        self.minibatch_size = cfg.minibatch_size or self.generation_size
        optimizer_steps = cfg.max_steps * cfg.num_iterations * (self.generation_size // self.minibatch_size)
        # beta = 0: no reference at all, which is most of GRPO's memory saving over PPO after the critic.
        policy = self.policy = grpo_policy(
            model, cfg, total_steps=optimizer_steps, device=self.device, dtype=dtype, cluster=self.cluster
        )
        self.vocab_size = policy.model.get_input_embeddings().num_embeddings  # a sampled id must have an embedding
        self.sampler, self.correction = grpo_sampler(  # (the correction: for another engine's logprobs)
            cfg, self.tokenizer, dtype, policy.sampler_weights(), sampler, device=self.device, model_given=args.model,
            longest_row=longest_prompt + cfg.max_completion_length, make_environment=self.make_environment,
            template=self.template,
        )  # fmt: skip
        self.sampling = sampling_params(cfg)
        self.steps_taken = 0  # the step number seeds its prompts' draws (`prompt_seeds`)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.prompt_order = ShuffledEpochs(len(self.train_rows), cfg.seed)
        self.monitor = SignalMonitor(long_window=cfg.monitor_window)
        self.eval_history: list[dict[str, float]] = []
        self.log: RunLog | None = None
        self.last_metrics: dict[str, float] = {}  # the last step's figures

    # ---------------------------------------------------------------- one step
    def step(self, rows: list[dict[str, Any]] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """rollout -> score -> advantages -> (reference, old logprobs) -> mu passes of updates, on `rows`
        (default: the next `prompts_per_step` rows of the seeded prompt order)."""
        b = self.sample(rows)
        ref_logp = self.policy.reference_logprobs(b.rollout)  # (n, Tc) or None
        reuses_samples = self.cfg.num_iterations > 1 or self.minibatch_size < self.generation_size
        old_logp = self.policy.logprobs(b.rollout) if reuses_samples else None
        b.clock.append(time.perf_counter())
        stats = self._update(b.rollout, b.mask, b.step_mask, b.first_row, b.advantages, old_logp, ref_logp)
        push_weights(self.sampler, self.policy.sampler_weights())
        b.clock.append(time.perf_counter())
        return self.figures(b, stats)

    def sample(self, rows: list[dict[str, Any]] | None = None) -> StepBatch:
        """This rank's share of the step's prompts (`rows`, default the next of the seeded order) sampled, and the
        whole step scored, its group advantages computed (`sample_round`); with `dynamic_sampling` (rows handed in
        are trained as they are), the flat groups replaced by further prompts' (`dynamic_sampling.fill_step`)."""
        cfg, cluster = self.cfg, self.cluster
        self.steps_taken += 1
        at_step(self.state, cfg, self.steps_taken - 1, len(self.train_rows))  # (the steps before it: TRL counts so)
        b, figures = self.sample_round(0, rows), {}
        if rows is None and cfg.dynamic_sampling:
            b, figures = dynamic_sampling.fill_step(
                b, self.sample_round, self.encode, self.rewards, cluster, group_size=cfg.num_generations,
                max_rounds=cfg.max_dynamic_sampling_rounds, scale=cfg.scale_rewards,
                aggregation=cfg.reward_aggregation, pad_token_id=self.tokenizer.pad_token_id,
            )  # fmt: skip
        mask = b.rollout.trained_mask.float()  # (n, Tc): the tokens in the loss
        if cfg.mask_truncated_completions:
            mask = mask * (~b.rollout.truncated).float().unsqueeze(-1).to(mask.device)
        step_mask = cluster.gather(torch.nn.functional.pad(mask, (0, cfg.max_completion_length - mask.shape[1])))
        mine_adv = b.advantages[b.first_row : b.first_row + len(mask)].to(self.device)
        return StepBatch(
            b.rollout, b.prompts, b.completions, b.rewards, b.total, b.scorable, b.gold, mine_adv, b.advantages, mask,
            step_mask, b.first_row, b.clock, figures,
        )  # fmt: skip

    def sample_round(self, first_place: int, rows: list[dict[str, Any]] | None = None) -> Generation:
        """`rows` (default: the next `prompts_per_step` of the seeded order), this rank's share sampled (each prompt's
        draws seeded by its place in the step, from `first_place`) and the whole round scored (`score_step`)."""
        cfg, G, cluster = self.cfg, self.cfg.num_generations, self.cluster
        if rows is None:
            rows = [self.train_rows[i] for i in self.prompt_order.take(cfg.prompts_per_step)]
        mine = cluster.share(len(rows))  # every rank walks the same order and samples its share of it
        here, t0 = [rows[i] for i in mine], time.perf_counter()
        prompts = self.encode(here)
        seeds = prompt_seeds(cfg.seed, self.steps_taken, [first_place + i for i in mine])
        rollout = call_generate(self.sampler, prompts.ids, here, num_generations=G, params=self.sampling, seeds=seeds)
        check_rollout(rollout, self.sampler, rows=len(here) * G, vocab_size=self.vocab_size, prompts=prompts.ids)
        t_rollout = time.perf_counter()
        completions = decode_completions(self.tokenizer, rollout.completion_ids, rollout.completion_mask)
        inputs = reward_inputs(here, cfg.prompt_column, G, prompts.texts, completions, rollout)  # the keyword args
        # of the whole round: (N, K) NaN where None, (N,) x 3, (N, 1) or None; a reward training cannot use stops here
        rewards, total, scorable, advantages, gold = self.rewards.score_step(
            inputs, group_size=G, scale=cfg.scale_rewards, aggregation=cfg.reward_aggregation,
            timeout=cfg.reward_timeout, cluster=cluster,
        )  # fmt: skip
        return Generation(rows, prompts, rollout, completions, rewards, total, scorable, advantages, gold,
                          self.rewards.logged, mine.start * G, [t0, t_rollout, time.perf_counter()])  # fmt: skip

    def encode(self, rows: list[dict[str, Any]]) -> Any:
        """The rows' prompts as the model sees them (`encode_prompts`)."""
        texts = [r[self.cfg.prompt_column] for r in rows]
        return encode_prompts(self.tokenizer, texts, self.cfg.max_prompt_length, self.template)

    def figures(self, batch: StepBatch, stats: dict[str, float]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The whole step's metrics with the update's `stats`, and its samples to log (`step_figures`)."""
        return step_figures(batch, stats, self.cluster, self.rewards, group_size=self.cfg.num_generations)

    def _update(self, rollout: Rollout, mask, step_mask, first_row, advantages, old_logp, ref_logp) -> dict[str, float]:
        """The step's update (`update.run_update`) and its figures, summed over the ranks."""
        cfg, lr = self.cfg, self.policy.lr  # (the step's first rate)
        sums = dict.fromkeys((*update.FIGURES, "grad_norm", "sampler_logp_diff"), 0.0)  # what the passes add up
        n_opt_steps = update.run_update(
            self.policy, rollout, mask=mask, step_mask=step_mask, first_row=first_row, advantages=advantages,
            old_logp=old_logp, ref_logp=ref_logp, loss_type=cfg.loss_type, surrogate=cfg.surrogate(), beta=cfg.beta,
            num_iterations=cfg.num_iterations, minibatch_size=self.minibatch_size,
            max_completion_length=cfg.max_completion_length, shuffle=self.shuffle_generator, sums=sums,
            correction=self.correction, entropy=update.EntropyTerms(cfg.top_entropy_quantile, cfg.entropy_coef),
        )  # fmt: skip
        update.sums_over_ranks(sums, self.cluster, rollout, old_logp)
        stats = update.policy_figures(sums, n_opt_steps, with_kl=ref_logp is not None)
        return {**stats, **update.correction_figures(sums, self.cluster), "learning_rate": lr}

    # ---------------------------------------------------------------- the run
    def evaluate(self, step: int, *, log: bool = False) -> dict[str, float]:
        """Held-out accuracy (the task's gold checker, or exact match on `answer`) and every reward's mean, greedy
        and sampled (`heldout_eval`); kept in the eval history at `step`, and logged as a row of its own when `log`."""
        cfg, check = self.cfg, run_setup.gold_check(self.task)
        settings = run_setup.heldout_settings(cfg, self.template)
        with self.policy.full_weights():  # (FSDP: gathered once; the ranks sample unequal shares of the rows)
            result = heldout_eval(self.sampler, self.tokenizer, self.eval_rows, settings, check, self.rewards,
                                  cluster=self.cluster)  # fmt: skip
        if result:
            self.eval_history.append({"step": step, **result})
            if log and self.log is not None:
                self.log.log(step, result)
        return result

    def train(self) -> TrainResult:
        """The run (`run_loop.run_stage`): resumes or starts it (`resume_from_checkpoint`), checkpoints every
        `save_every` steps and after the last, and on SIGINT / SIGTERM finishes the step, checkpoints and raises
        TrainingInterrupted."""
        cfg, out, main = self.cfg, self.run_dir.path, self.cluster.is_main  # rank 0 alone writes
        record = dataclasses.asdict(cfg)
        settings = LoopSettings(self.name, cfg.max_steps, cfg.save_every, cfg.progress, tensorboard=cfg.tensorboard,
                                record=record, wandb_project=cfg.wandb_project if cfg.wandb else None)  # fmt: skip
        model_dir = run_stage(self, self.run_dir, settings, self.cluster, self.hooks)
        logged = read_metrics(out / "metrics.jsonl") if main else []
        plot = plot_curves(logged, out / "curves.png", title=self.name) if main else None
        losses = [row["loss"] for row in logged if row.get("loss") is not None]
        m, warned, mean_loss = self.monitor, [*self.input_warnings, *self.monitor.warnings], float("nan")
        if losses:
            mean_loss = sum(losses) / len(losses)
        return TrainResult(out, model_dir, plot, self.last_metrics, self.eval_history, warned, m.summary(),
                           dict(m.fired), self.steps_taken, mean_loss)  # fmt: skip

    # ---------------------------------------------------------------- the run loop's hooks (`run_loop.Stage`)
    def begin(self, log: RunLog | None, start: int) -> None:
        self.log = log
        if start == 0:
            self.evaluate(0, log=True)

    def train_step(self, step: int) -> StepReport:
        """`step`, the reference sync, a held-out evaluation when due, the monitors' warnings."""
        cfg = self.cfg
        metrics, samples = self.step()
        at_step(self.state, cfg, step, len(self.train_rows))
        if cfg.ref_sync_every and step % cfg.ref_sync_every == 0:
            self.policy.sync_reference(cfg.ref_sync_alpha)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics.update(self.evaluate(step))
        warnings = self.monitor.update(step, metrics, group_size=cfg.num_generations)  # (its figures go in the row)
        self.last_metrics = metrics
        due = cfg.log_completions_every and (step % cfg.log_completions_every == 0 or step == 1)
        postfix = {"reward": f"{metrics['reward']:.3f}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
        return StepReport(metrics, postfix, warnings, samples if due else None)

    def finish(self, log: RunLog | None, step: int) -> None:
        if not self.eval_history or self.eval_history[-1]["step"] != step:  # (a hook's stop on an eval step: done)
            self.evaluate(step, log=True)

    def save(self, folder: Path) -> Path:
        """What goes beside the model first (a run folder with model/ holds all the run wrote), then the model."""
        self.save_beside_model(folder)
        form = {"lora_form": self.cfg.lora.save, "max_shard_size": self.cfg.max_shard_size}
        return save_trained(self.policy, folder / "model", self.tokenizer, overwrite=True, **form)

    def save_beside_model(self, out: Path) -> None:
        """What a stage saves beside the final model, inside the run folder's guard (a refused write says what was
        kept); GRPO saves nothing more."""

    def write_checkpoint(self, run: RunDirectory, step: int) -> Path:
        """checkpoint-STEP: the policy's weights (or the adapter), optimizer, schedule, every RNG, `stage_state`."""
        state, policy, shuffle = self.stage_state(), self.policy, self.shuffle_generator
        return write_policy_checkpoint(policy, run, step, self.tokenizer, state, max_shard_size=self.cfg.max_shard_size,
                                       beside=self.beside, shuffle=shuffle)  # fmt: skip

    def stage_state(self) -> dict[str, Any]:
        """The rest of a checkpoint: the prompt order and its position, the monitors, the evaluations so far."""
        return {"prompt_order": self.prompt_order.state_dict(), "monitor": self.monitor.state_dict(),
                "eval_history": self.eval_history}  # fmt: skip

    def resume(self, checkpoint: Path) -> int:
        return self._resume(checkpoint)["step"]

    def _resume(self, folder: Path) -> dict[str, Any]:
        state = resume_policy(self.policy, folder, beside=self.beside, shuffle=self.shuffle_generator)
        push_weights(self.sampler, self.policy.sampler_weights())  # an engine in another memory holds the old ones
        self.prompt_order.load_state_dict(state["prompt_order"])
        self.monitor.load_state_dict(state["monitor"])
        self.eval_history = list(state["eval_history"])
        self.steps_taken = state["step"]
        return state
