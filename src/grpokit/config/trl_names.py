"""TRL 1.16's GRPOConfig fields as grpokit reads them: defaults, renames, what grpokit lacks, and the answer
grpokit's own YAML / command line gives a TRL name. Pure data, imported by `grpokit.trl` and `grpokit.config`."""

from __future__ import annotations

from typing import Any

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
    "overwrite_output_dir": False,  # transformers 4's field (gone in 5): the adapter's way to replace a run
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
    "deepspeed": "DeepSpeed is not used: launch under torchrun with grpokit's `distributed: fsdp` (FSDP2)",
    "fsdp": "accelerate's FSDP is not used: launch under torchrun with grpokit's `distributed: fsdp` (FSDP2)",
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
# The type of each field grpokit reads, as TRL 1.16's dataclass (and transformers 5's TrainingArguments) declares
# it; a value of another type is refused by name before any arithmetic. Python callers get no HfArgumentParser:
# `learning_rate="1e-5"` is text, as it would be in TRL's own dataclass. The unsupported fields need no entry:
# anything but their default is refused.
TRL_TYPES: dict[str, Any] = {
    "output_dir": str | None,
    "learning_rate": float,
    "beta": float,
    "num_generations": int,
    "max_completion_length": int,
    "temperature": float,
    "top_p": float,
    "top_k": int | None,
    "num_iterations": int,
    "mask_truncated_completions": bool,
    "reward_weights": list[float] | None,
    "seed": int,
    "weight_decay": float,
    "adam_beta1": float,
    "adam_beta2": float,
    "max_grad_norm": float,
    "gradient_checkpointing": bool | None,
    "save_total_limit": int | None,
    "max_prompt_length": int | None,
    "importance_sampling_level": str,
    "multi_objective_aggregation": str,
    "ref_model_mixup_alpha": float,
    "epsilon": float,
    "epsilon_high": float | None,
    "loss_type": str,
    "scale_rewards": str | bool,
    "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int,
    "steps_per_generation": int | None,
    "generation_batch_size": int | None,
    "max_steps": int,
    "num_train_epochs": float,
    "warmup_steps": float,  # transformers 5: a value below 1 is a fraction of the run (warmup_ratio is gone)
    "lr_scheduler_type": str,
    "save_steps": float,  # transformers: below 1, a fraction of the run (as logging_steps and eval_steps)
    "save_strategy": str,
    "logging_steps": float,
    "log_completions": bool,
    "report_to": str | list[str] | None,
    "bf16": bool | None,
    "fp16": bool,
    "sync_ref_model": bool,
    "ref_model_sync_steps": int,
    "eval_strategy": str,
    "eval_steps": float | None,
    "disable_tqdm": bool | None,
    "resume_from_checkpoint": str | bool | None,
    "overwrite_output_dir": bool,
    "use_cpu": bool,
    "run_name": str | None,
    "logging_dir": str | None,
    "dataloader_num_workers": int,
    "remove_unused_columns": bool,
    "per_device_eval_batch_size": int,
    "num_completions_to_print": int | None,
    "log_unique_prompts": bool,
    "shuffle_dataset": bool,
}
# The least value of a TRL field that counts or divides (TRL's and transformers' own checks), checked up front so
# that `gradient_accumulation_steps=0` is an error naming it, not a ZeroDivisionError.
TRL_MINIMUM: dict[str, float] = {
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": 1,
    "generation_batch_size": 1,
    "num_generations": 2,  # TRL: GRPO needs at least 2 generations per prompt
    "max_completion_length": 1,
    "num_iterations": 1,
    "ref_model_sync_steps": 1,
    "warmup_steps": 0,
    "per_device_eval_batch_size": 1,
    "dataloader_num_workers": 0,
}
TRL_ABOVE_ZERO = ("save_steps", "logging_steps", "eval_steps", "num_train_epochs")

# grpokit field -> the TRL field(s) it is computed from: a grpokit error about a field the user never wrote is
# told in the TRL names they did write (`grpokit.trl.trl_error`). Same-named fields map to themselves.
GRPOKIT_SOURCES: dict[str, tuple[str, ...]] = {
    "prompts_per_step": (
        "per_device_train_batch_size",
        "steps_per_generation",
        "gradient_accumulation_steps",
        "generation_batch_size",
        "num_generations",
    ),
    "minibatch_size": (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "steps_per_generation",
        "generation_batch_size",
    ),
    "micro_batch_size": ("per_device_train_batch_size",),
    "epsilon_low": ("epsilon",),
    "epsilon_high": ("epsilon_high", "epsilon"),
    "max_steps": ("max_steps", "num_train_epochs"),
    "warmup_steps": ("warmup_steps",),
    "save_every": ("save_steps", "save_strategy"),
    "save_total_limit": ("save_total_limit",),
    "eval_every": ("eval_steps", "eval_strategy", "logging_steps"),
    "log_completions_every": ("logging_steps", "log_completions"),
    "ref_sync_every": ("sync_ref_model", "ref_model_sync_steps"),
    "lr_schedule": ("lr_scheduler_type",),
    "dtype": ("bf16",),
    "device": ("use_cpu",),
    "tensorboard": ("report_to",),
    "wandb": ("report_to",),
    "progress": ("disable_tqdm",),
    "top_k": ("top_k",),
    "scale_rewards": ("scale_rewards",),
    "loss_type": ("loss_type",),
    **{new: (old,) for old, new in RENAMED.items()},
    **{name: (name,) for name in SAME_NAME},
    **{name: (name,) for name in ("resume_from_checkpoint", "overwrite_output_dir")},
    # a peft LoraConfig's options, as grpokit's `lora:` section
    "lora.r": ("peft_config.r",),
    "lora.alpha": ("peft_config.lora_alpha",),
    "lora.dropout": ("peft_config.lora_dropout",),
    "lora.target_modules": ("peft_config.target_modules",),
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
    "report_to": "`tensorboard: true` and / or `wandb: true`",
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
