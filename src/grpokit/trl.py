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
from grpokit.trl_names import (
    LOSS_TYPES,
    RENAMED,
    SAME_NAME,
    SCHEDULES,
    TRL_DEFAULTS,
    UNSUPPORTED,
)


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
        unknown = [r for r in reports if r not in ("none", "tensorboard", "wandb", "all")]
        if unknown:
            raise native.ConfigError(
                f"TRL field `report_to` = {unknown[0]!r}: grpokit logs to tensorboard, wandb, both (all) or none"
            )
        out["tensorboard"] = any(r in ("tensorboard", "all") for r in reports)
        out["wandb"] = any(r in ("wandb", "all") for r in reports)
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
        """The policy in `save_pretrained` form (default: OUTPUT_DIR/model, where `train` also saves it). As TRL's,
        it replaces an earlier save there, but only a model folder grpokit wrote: never a run directory (OUTPUT_DIR
        itself) or a user's folder."""
        from pathlib import Path

        target = Path(output_dir) if output_dir else Path(self.trainer.cfg.output_dir) / "model"
        lora_form = self.trainer.cfg.lora.save
        return self.trainer.policy.save(target, self.trainer.tokenizer, lora_form=lora_form, overwrite=True)


def lora_from_peft(peft_config: Any) -> native.LoRAConfig:
    """A peft LoraConfig as grpokit's `lora:` section (rank, alpha, dropout, target modules)."""
    targets = peft_config.target_modules
    targets = (
        ["all-linear"] if targets in (None, "all-linear") else [targets] if isinstance(targets, str) else list(targets)
    )
    return native.LoRAConfig(
        r=peft_config.r, alpha=float(peft_config.lora_alpha), dropout=peft_config.lora_dropout, target_modules=targets
    )
