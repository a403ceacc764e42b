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
