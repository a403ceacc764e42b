"""TRL's names on grpokit: a TRL GRPO script runs after one changed import line.

    from grpokit.trl import GRPOConfig, GRPOTrainer      # was: from trl import GRPOConfig, GRPOTrainer

`GRPOConfig` takes the field names, units and defaults of TRL 1.16's GRPOConfig and maps them onto grpokit's
own config (`to_grpokit`); `GRPOTrainer` takes TRL's arguments and runs grpokit's trainer. A TRL option that
grpokit does not have is an error naming it as soon as it is set to anything but TRL's default (`use_vllm=True`,
`deepspeed=...`), never silently ignored. This module never imports `trl`; the native config stays grpokit's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from grpokit import config as native

# TRL field -> (grpokit field, how the value converts). Fields with a converter of their own are in `to_grpokit`.
SAME_NAME = (
    "output_dir",
    "learning_rate",
    "beta",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "num_iterations",
    "mask_truncated_completions",
    "reward_weights",
    "seed",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "gradient_checkpointing",
    "save_total_limit",
    "max_prompt_length",  # TRL < 1.0
)
RENAMED = {
    "importance_sampling_level": "importance_level",
    "multi_objective_aggregation": "reward_aggregation",
    "ref_model_mixup_alpha": "ref_sync_alpha",
}
# TRL 1.16's defaults of every field this module reads: the drop-in trains as TRL would, where grpokit's own
# defaults differ (learning rate, loss type, completion length, AdamW beta2, schedule, seed, checkpointing).
TRL_DEFAULTS: dict[str, Any] = {
    "output_dir": None,
    "learning_rate": 1e-6,
    "beta": 0.0,
    "num_generations": 8,
    "max_completion_length": 512,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "num_iterations": 1,
    "mask_truncated_completions": False,
    "reward_weights": None,
    "seed": 42,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "max_grad_norm": 1.0,
    "gradient_checkpointing": True,
    "save_total_limit": None,
    "max_prompt_length": None,
    "importance_sampling_level": "token",
    "multi_objective_aggregation": "sum_then_normalize",
    "ref_model_mixup_alpha": 0.6,
    "epsilon": 0.2,
    "epsilon_high": None,
    "loss_type": "dapo",
    "scale_rewards": "group",
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": None,
    "generation_batch_size": None,
    "max_steps": -1,
    "num_train_epochs": 3.0,
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "save_steps": 500,
    "save_strategy": "steps",
    "logging_steps": 10,
    "log_completions": False,
    "report_to": "none",
    "bf16": None,
    "fp16": False,
    "sync_ref_model": False,
    "ref_model_sync_steps": 512,
    "eval_strategy": "no",
    "eval_steps": None,
    "disable_tqdm": None,
    "resume_from_checkpoint": None,
    "use_cpu": False,
    # accepted, no effect on what grpokit computes (cosmetic, or grpokit has no such machinery to tune)
    "run_name": None,
    "logging_dir": None,
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,
    "per_device_eval_batch_size": 8,
    "num_completions_to_print": None,
    "log_unique_prompts": False,
    "shuffle_dataset": True,
    # grpokit has none of these: anything but the default is an error naming the field
    "use_vllm": False,
    "deepspeed": None,
    "fsdp": None,
    "torch_compile": False,
    "use_liger_kernel": False,
    "push_to_hub": False,
    "delta": None,
    "min_p": None,
    "repetition_penalty": 1.0,
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "disable_dropout": False,
    "adam_epsilon": 1e-8,
    "optim": "adamw_torch_fused",
    "generation_kwargs": None,
    "chat_template_kwargs": None,
    "model_init_kwargs": None,
    "cast_lm_head_to_fp32": False,
    "num_generations_eval": None,
}
NO_EFFECT = frozenset(
    {
        "run_name",
        "logging_dir",
        "dataloader_num_workers",
        "remove_unused_columns",
        "per_device_eval_batch_size",
        "num_completions_to_print",
        "log_unique_prompts",
        "shuffle_dataset",  # grpokit always walks a seeded shuffle, reshuffled every epoch
    }
)
UNSUPPORTED = {
    "use_vllm": "grpokit samples in-process (the `sampler=` seam takes another engine)",
    "deepspeed": "grpokit runs in one process; DeepSpeed is not used",
    "fsdp": "grpokit runs in one process",
    "torch_compile": "grpokit does not compile the model",
    "use_liger_kernel": "grpokit's LM-head logprob gradient is its own (no Liger kernels)",
    "push_to_hub": "grpokit writes the model folder; push it with huggingface_hub",
    "delta": "no two-sided clipping delta in grpokit's loss",
    "min_p": "no min-p sampling",
    "repetition_penalty": "no repetition penalty in the sampler",
    "top_entropy_quantile": "no entropy-masked loss",
    "entropy_coef": "no entropy bonus",
    "disable_dropout": "grpokit keeps the model's dropout as configured",
    "adam_epsilon": "grpokit's AdamW uses eps 1e-8",
    "optim": "grpokit trains with fused AdamW (adamw_torch_fused)",
    "generation_kwargs": "sampling is set by temperature, top_p, top_k",
    "chat_template_kwargs": "the chat template renders with add_generation_prompt only",
    "model_init_kwargs": "pass a model object for custom loading",
    "cast_lm_head_to_fp32": "grpokit computes the LM head's logprobs in float32 already",
    "num_generations_eval": "evaluation is greedy and sampled, once per prompt",
}
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


# What grpokit's own YAML / CLI answers when given a TRL field name (`trl_hint`).
CONVERSIONS = {
    "per_device_train_batch_size": "prompts, not completions: `prompts_per_step` = per_device_train_batch_size x world "
    "size x steps_per_generation / num_generations, and `micro_batch_size` = completions per forward",
    "gradient_accumulation_steps": "`minibatch_size` = completions per optimizer step (per_device_train_batch_size x "
    "world size x gradient_accumulation_steps); memory per forward is bounded by `max_tokens_per_micro_batch`",
    "steps_per_generation": "`minibatch_size`: one generation batch of prompts_per_step x num_generations "
    "completions is split into optimizer steps of minibatch_size",
    "generation_batch_size": "`prompts_per_step` = generation_batch_size / num_generations",
    "epsilon": "`epsilon_low` (and `epsilon_high`, which TRL's epsilon_high overrides)",
    "save_steps": "`save_every`",
    "save_strategy": "`save_every` (0: only after the last step)",
    "logging_steps": "grpokit logs every step; `log_completions_every` for sampled completions",
    "log_completions": "`log_completions_every` (0: never)",
    "report_to": "`tensorboard: true` or `false`",
    "bf16": "`dtype: bfloat16`",
    "fp16": "nothing: float16 needs loss scaling; `dtype: bfloat16`",
    "use_cpu": "`device: cpu`",
    "lr_scheduler_type": "`lr_schedule` (constant, linear, cosine)",
    "num_train_epochs": "`max_steps` (generation steps of prompts_per_step prompts each)",
    "sync_ref_model": "`ref_sync_every` (steps; 0 never syncs)",
    "ref_model_sync_steps": "`ref_sync_every`",
    "eval_strategy": "`eval_every` (steps; 0: before and after training)",
    "eval_steps": "`eval_every`",
    "disable_tqdm": "`progress: false`",
    **{old: f"`{new}`" for old, new in RENAMED.items()},
    **{name: f"nothing ({reason})" for name, reason in UNSUPPORTED.items()},
}


def trl_hint(name: str) -> str | None:
    """`name` is a TRL GRPOConfig field: the grpokit field(s) to use instead and the conversion, else None."""
    return CONVERSIONS.get(name)


class GRPOConfig:
    """TRL's GRPOConfig fields (TRL 1.16 names, units and defaults); `to_grpokit()` gives grpokit's config."""

    def __init__(self, **fields: Any):
        unknown = sorted(set(fields) - set(TRL_DEFAULTS))
        if unknown:
            raise native.ConfigError(
                f"TRL field `{unknown[0]}` is not one grpokit maps (see the README's TRL table); "
                "use grpokit's own GRPOConfig for grpokit-only fields"
            )
        for name, reason in UNSUPPORTED.items():
            if name in fields and fields[name] != TRL_DEFAULTS[name]:
                raise native.ConfigError(f"TRL field `{name}` = {fields[name]!r} is not supported: {reason}")
        if fields.get("fp16"):
            raise native.ConfigError("TRL field `fp16` = True is not supported: float16 needs loss scaling; use bf16")
        self.fields = {**TRL_DEFAULTS, **fields}

    def __getattr__(self, name: str) -> Any:
        if name != "fields" and name in self.fields:
            return self.fields[name]
        raise AttributeError(name)

    def to_grpokit(self, *, num_prompts: int | None = None, world_size: int = 1) -> native.GRPOConfig:
        """grpokit's GRPOConfig; `num_prompts` (the training set's size) turns TRL's epochs into steps."""
        f = self.fields
        out: dict[str, Any] = {name: f[name] for name in SAME_NAME if f[name] is not None}
        out.update({new: f[old] for old, new in RENAMED.items()})
        out["save_total_limit"] = f["save_total_limit"] or 0  # TRL None keeps all, as grpokit's 0
        G = f["num_generations"]
        # TRL counts completions: per device per forward; x devices x steps_per_generation per generation batch
        per_step = f["per_device_train_batch_size"] * world_size
        generation = f["generation_batch_size"] or per_step * (
            f["steps_per_generation"] or f["gradient_accumulation_steps"]
        )
        if generation % G:
            raise native.ConfigError(
                f"TRL fields: the generation batch of {generation} completions (per_device_train_batch_size x world "
                f"size x steps_per_generation) is not a multiple of num_generations = {G}"
            )
        out["prompts_per_step"] = generation // G
        minibatch = per_step * f["gradient_accumulation_steps"]  # completions per optimizer step
        out["minibatch_size"] = None if minibatch == generation else minibatch
        out["micro_batch_size"] = f["per_device_train_batch_size"]
        out["epsilon_low"] = f["epsilon"]
        out["epsilon_high"] = f["epsilon_high"] if f["epsilon_high"] is not None else f["epsilon"]
        if f["loss_type"] not in LOSS_TYPES:
            raise native.ConfigError(f"TRL field `loss_type` = {f['loss_type']!r}: grpokit has {', '.join(LOSS_TYPES)}")
        out["loss_type"] = f["loss_type"]
        scale = f["scale_rewards"]
        out["scale_rewards"] = {True: "group", False: "none"}.get(scale, scale)
        if f["lr_scheduler_type"] not in SCHEDULES:
            raise native.ConfigError(
                f"TRL field `lr_scheduler_type` = {f['lr_scheduler_type']!r}: grpokit has {', '.join(SCHEDULES)}"
            )
        out["lr_schedule"] = SCHEDULES[f["lr_scheduler_type"]]
        out["max_steps"] = self._max_steps(out["prompts_per_step"], num_prompts)
        warmup = f["warmup_steps"]  # transformers reads a value below 1 as a fraction of the run
        out["warmup_steps"] = math.ceil(warmup * out["max_steps"]) if 0 < warmup < 1 else int(warmup)
        out["save_every"] = 0 if f["save_strategy"] == "no" else f["save_steps"]
        if f["save_strategy"] not in ("steps", "no"):
            raise native.ConfigError(f"TRL field `save_strategy` = {f['save_strategy']!r}: grpokit saves by steps")
        out["log_completions_every"] = f["logging_steps"] if f["log_completions"] else 0
        reports = [f["report_to"]] if isinstance(f["report_to"], str) else list(f["report_to"] or [])
        unknown = [r for r in reports if r not in ("none", "tensorboard", "all")]
        if unknown:
            raise native.ConfigError(f"TRL field `report_to` = {unknown[0]!r}: grpokit logs to tensorboard or none")
        out["tensorboard"] = any(r in ("tensorboard", "all") for r in reports)
        out["dtype"] = "bfloat16" if f["bf16"] else "auto"
        out["device"] = "cpu" if f["use_cpu"] else "auto"
        if f["sync_ref_model"]:
            out["ref_sync_every"] = f["ref_model_sync_steps"]
        if f["eval_strategy"] == "steps":
            out["eval_every"] = int(f["eval_steps"] or f["logging_steps"])
        if f["disable_tqdm"]:
            out["progress"] = False
        if f["resume_from_checkpoint"]:
            out["resume_from_checkpoint"] = (
                "latest" if f["resume_from_checkpoint"] is True else f["resume_from_checkpoint"]
            )
        out.setdefault("output_dir", "trainer_output")  # TRL's own default folder
        return native.GRPOConfig(**out)

    def _max_steps(self, prompts_per_step: int, num_prompts: int | None) -> int:
        """TRL's max_steps (optimizer steps; -1: num_train_epochs over the data) as grpokit's generation steps."""
        f = self.fields
        optimizer_steps_per_generation = max(
            1, (f["steps_per_generation"] or f["gradient_accumulation_steps"]) // f["gradient_accumulation_steps"]
        )
        if f["max_steps"] > 0:
            return max(1, math.ceil(f["max_steps"] / optimizer_steps_per_generation))
        if num_prompts is None:
            raise native.ConfigError("TRL field `max_steps` = -1 needs the training set to count epochs")
        return max(1, math.ceil(f["num_train_epochs"] * num_prompts / prompts_per_step))


class GRPOTrainer:
    """TRL's GRPOTrainer arguments on grpokit's trainer (`grpokit.trainer.GRPOTrainer`, as `.trainer`)."""

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        **unsupported: Any,
    ):
        from grpokit.trainer import GRPOTrainer as NativeTrainer

        set_ = [name for name, value in unsupported.items() if value not in (None, (None, None), [], ())]
        if set_:
            raise native.ConfigError(f"GRPOTrainer argument `{set_[0]}` is not supported by grpokit.trl")
        if reward_funcs is None:
            raise native.ConfigError("GRPOTrainer needs reward_funcs (a function, a list of them, or a model folder)")
        args = args if args is not None else GRPOConfig()
        cfg = args.to_grpokit(num_prompts=len(train_dataset) if train_dataset is not None else None)
        if peft_config is not None:
            cfg = dataclasses.replace(cfg, lora=lora_from_peft(peft_config))
        self.args = args
        self.trainer = NativeTrainer(
            cfg,
            model=model,
            tokenizer=processing_class,
            reward_funcs=reward_funcs,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None):
        if resume_from_checkpoint:
            self.trainer.cfg.resume_from_checkpoint = (
                "latest" if resume_from_checkpoint is True else resume_from_checkpoint
            )
            self.trainer.run_dir = type(self.trainer.run_dir).for_config(self.trainer.cfg)
        return self.trainer.train()

    def save_model(self, output_dir: str | None = None):
        """The policy in `save_pretrained` form (default: OUTPUT_DIR/model, where `train` also saves it)."""
        from pathlib import Path

        target = Path(output_dir) if output_dir else Path(self.trainer.cfg.output_dir) / "model"
        return self.trainer.policy.save(target, self.trainer.tokenizer, lora_form=self.trainer.cfg.lora.save)


def lora_from_peft(peft_config: Any) -> native.LoRAConfig:
    """A peft LoraConfig as grpokit's `lora:` section (rank, alpha, dropout, target modules)."""
    targets = peft_config.target_modules
    targets = (
        ["all-linear"] if targets in (None, "all-linear") else [targets] if isinstance(targets, str) else list(targets)
    )
    return native.LoRAConfig(
        r=peft_config.r, alpha=float(peft_config.lora_alpha), dropout=peft_config.lora_dropout, target_modules=targets
    )
