"""TRL's names on grpokit: a TRL GRPO script runs after one changed import line.

    from grpokit.trl import GRPOConfig, GRPOTrainer      # was: from trl import GRPOConfig, GRPOTrainer

`GRPOConfig` takes the field names, units and defaults of TRL 1.16's GRPOConfig and maps them onto grpokit's
own config (`to_grpokit`); `GRPOTrainer` takes TRL's arguments and runs grpokit's trainer. Every TRL field has one
answer (`grpokit.config.trl_names`): mapped; accepted with no effect, those set named in one InputWarning
(`logging_first_step=True`, `hub_model_id=...`); or refused with its reason once set to anything but TRL's default
(`deepspeed=...`, `vllm_group_port=...`), never silently ignored. A value of the wrong type or out of range is an
error naming the TRL field, and an error grpokit's own validation raises about a field computed from TRL's names
those TRL fields (`trl_error`). `trainer.train(resume_from_checkpoint=True)` continues the latest checkpoint of
output_dir, as in TRL. The trainer has the transformers.Trainer face a TRL script touches: `callbacks=`
(transformers' TrainerCallback events, `grpokit.stages.callbacks`), `.state`, `.model`, `.evaluate()`, `.log()`,
`.push_to_hub()` (an error: grpokit makes no network calls). This module never imports `trl`; the native config stays
grpokit's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpokit import config as native
from grpokit.config.trl_names import (
    ADAMW_NAMES,
    GENERATION_KWARGS,
    GRPOKIT_SOURCES,
    LOSS_TYPES,
    NO_EFFECT,
    OTHER_OPTIMIZERS,
    OTHER_SCHEDULES,
    RENAMED,
    SAME_NAME,
    SCHEDULE_KWARGS,
    SCHEDULES,
    TRL_ABOVE_ZERO,
    TRL_DEFAULTS,
    TRL_MINIMUM,
    TRL_TYPES,
    UNSUPPORTED,
)
from grpokit.core.types import ArgumentError, InputWarning
from grpokit.rollout.chat_tools import TAGS_WAY_OUT
from grpokit.runtime.checkpoint import (
    PROVENANCE,
    FinishedRunError,
    OutputExistsError,
    RunDirectoryError,
    atomic_file,
    check_not_an_input,
    list_checkpoints,
    written_kind,
)
from grpokit.runtime.distributed import launch_world_size
from grpokit.stages.setup import input_paths, run_directory

PATH_FIELDS = frozenset({"output_dir", "logging_dir", "resume_from_checkpoint"})


class GRPOConfig:
    """TRL's GRPOConfig fields (TRL 1.16 names, units and defaults); `to_grpokit()` gives grpokit's config."""

    def __init__(self, **fields: Any):
        unknown = sorted(set(fields) - set(TRL_DEFAULTS))
        if unknown:
            raise native.ConfigError(_not_a_trl_field(unknown[0]))
        for name in PATH_FIELDS & fields.keys():  # TRL (transformers) takes a Path where it takes a folder's name
            if isinstance(fields[name], os.PathLike):
                fields[name] = os.fspath(fields[name])
        for name in JSON_FIELDS & fields.keys():  # TRL reads a dict field given as text (a command line's) as JSON
            fields[name] = _json_dict(name, fields[name])
        for name, value in fields.items():
            check_trl_field(name, value)
        for name, reason in UNSUPPORTED.items():
            if name in fields and fields[name] != TRL_DEFAULTS[name]:
                raise native.ConfigError(f"TRL field `{name}` = {fields[name]!r} is not supported: {reason}")
        check_optimizer(fields.get("optim", TRL_DEFAULTS["optim"]))
        check_generation_kwargs(fields.get("generation_kwargs") or {})
        self.given = frozenset(fields)  # what the user wrote: the names an error speaks of
        self.fields = {**TRL_DEFAULTS, **fields}
        if self.fields["steps_per_generation"] is not None and self.fields["generation_batch_size"] is not None:
            raise native.ConfigError(
                "TRL fields `steps_per_generation` and `generation_batch_size` are both set: give one (TRL refuses "
                "both as well)"
            )
        warn_no_effect(fields)

    def __getattr__(self, name: str) -> Any:
        if name not in ("fields", "given") and name in self.fields:
            return self.fields[name]
        raise AttributeError(name)

    def to_grpokit(self, *, num_prompts: int | None = None, world_size: int | None = None) -> native.GRPOConfig:
        """grpokit's GRPOConfig; `num_prompts` (the training set's size) turns TRL's epochs into steps, and
        `world_size` (None: the launch's, torchrun's WORLD_SIZE, 1 without it) multiplies TRL's per-device batch into
        the whole step's, as TRL's processes do.

        TRL counts steps in optimizer steps, grpokit in generation steps (one generation batch each, trained in
        num_iterations x steps_per_generation / gradient_accumulation_steps optimizer steps): max_steps, save_steps,
        logging_steps and eval_steps are converted, rounded up to whole generation steps."""
        f = self.fields
        world_size = launch_world_size() if world_size is None else world_size
        out: dict[str, Any] = {name: f[name] for name in SAME_NAME if f[name] is not None}
        out.update({new: f[old] for old, new in RENAMED.items()})
        out["save_total_limit"] = max(f["save_total_limit"] or 0, 0)  # TRL: None (or <= 0) keeps all, grpokit's 0
        out["top_k"] = f["top_k"] or 0
        out["min_p"] = f["min_p"] or 0.0  # TRL: None is off
        for key, value in (f["generation_kwargs"] or {}).items():  # TRL: they override the fields of that meaning
            if key in GENERATION_KWARGS:
                field = GENERATION_KWARGS[key]
                out[field] = ([value] if isinstance(value, str) else list(value)) if field == "stop_strings" else value
        out["chat_template_kwargs"] = f["chat_template_kwargs"] or None
        # TRL's tools go through the chat template (its only form) and wait as long as a tool takes; its iterations
        # count the tool rounds after the first turn, None none at all: then no row can take more turns than its
        # completion has tokens (each turn samples one), which bounds it as TRL's max_completion_length does
        out["tool_format"], out["tool_timeout"] = "chat", None
        iterations = f["max_tool_calling_iterations"]
        out["max_turns"] = f["max_completion_length"] if iterations is None else iterations + 1
        out["kl_importance_weight"] = f["use_bias_correction_kl"] and f["beta"] != 0  # (only a KL term is weighed)
        out["gradient_checkpointing"] = bool(f["gradient_checkpointing"])
        G = f["num_generations"]
        # TRL counts completions: per device per forward; x devices x steps_per_generation per generation batch
        per_step = f["per_device_train_batch_size"] * world_size
        accumulation = f["gradient_accumulation_steps"]
        if f["generation_batch_size"] is not None:
            generation = f["generation_batch_size"]
            if generation % per_step:
                raise native.ConfigError(
                    f"TRL field `generation_batch_size` = {generation} is not a multiple of "
                    f"per_device_train_batch_size x world size = {per_step} (TRL refuses it as well)"
                )
            steps_per_generation = generation // per_step
        else:
            steps_per_generation = f["steps_per_generation"] or accumulation
            generation = per_step * steps_per_generation
        if generation % G:
            source = "generation_batch_size" if f["generation_batch_size"] else (
                "per_device_train_batch_size x world size x steps_per_generation (default: gradient_accumulation_steps)"
            )  # fmt: skip
            raise native.ConfigError(
                f"TRL fields: the generation batch of {generation} completions ({source}) is not a multiple of "
                f"num_generations = {G}"
            )
        if steps_per_generation % accumulation:
            raise native.ConfigError(
                f"TRL fields: gradient_accumulation_steps = {accumulation} does not divide the generation batch's "
                f"{steps_per_generation} steps (steps_per_generation, or generation_batch_size / "
                "per_device_train_batch_size): grpokit's optimizer steps split one generation batch evenly"
            )
        out["prompts_per_step"] = generation // G
        minibatch = per_step * accumulation  # completions per optimizer step
        out["minibatch_size"] = None if minibatch == generation else minibatch
        out["micro_batch_size"] = f["per_device_train_batch_size"]
        out["epsilon_low"] = f["epsilon"]
        out["epsilon_high"] = f["epsilon_high"] if f["epsilon_high"] is not None else f["epsilon"]
        if f["loss_type"] not in LOSS_TYPES:
            raise native.ConfigError(f"TRL field `loss_type` = {f['loss_type']!r}: grpokit has {', '.join(LOSS_TYPES)}")
        out["loss_type"] = f["loss_type"]
        scale = f["scale_rewards"]
        out["scale_rewards"] = {True: "group", False: "none"}.get(scale, scale)
        out["lr_schedule"], out["min_lr_rate"] = self._schedule()
        per_generation = steps_per_generation // accumulation * f["num_iterations"]  # optimizer steps
        per_epoch = None if num_prompts is None else num_prompts // out["prompts_per_step"]  # TRL drops a last part
        out["max_steps"] = self._max_steps(per_generation, per_epoch, out["prompts_per_step"], num_prompts)
        optimizer_steps = out["max_steps"] * per_generation

        def in_generations(name: str) -> int:
            """A TRL step count (optimizer steps; below 1, a fraction of the run) as grpokit's generation steps."""
            steps = f[name] if f[name] >= 1 else math.ceil(f[name] * optimizer_steps)
            return max(1, math.ceil(steps / per_generation))

        warmup = f["warmup_steps"]  # transformers reads a value below 1 as a fraction of the run
        out["warmup_steps"] = math.ceil(warmup * optimizer_steps) if 0 < warmup < 1 else int(warmup)
        if f["lr_scheduler_type"] == "constant" and warmup:  # transformers' `constant` never warms up
            out["warmup_steps"] = 0
            warnings.warn(
                f"TRL field `warmup_steps` = {warmup} has no effect with lr_scheduler_type='constant' (transformers' "
                "constant schedule has no warm-up, so grpokit's has none either): 'constant_with_warmup' warms up",
                InputWarning,
                stacklevel=2,
            )
        out["save_every"] = self._every("save_strategy", "save_steps", in_generations, per_epoch, ("no", "steps"))
        out["log_completions_every"] = in_generations("logging_steps") if f["log_completions"] else 0
        reports = [f["report_to"]] if isinstance(f["report_to"], str) else list(f["report_to"] or [])
        unknown = [r for r in reports if r not in ("none", "tensorboard", "wandb", "all")]
        if unknown:
            also = (
                " (no Trackio: every figure is in OUTPUT_DIR/metrics.jsonl as well)" if unknown[0] == "trackio" else ""
            )
            raise native.ConfigError(
                f"TRL field `report_to` = {unknown[0]!r}: grpokit logs to tensorboard, wandb, both (all) or none{also}"
            )
        out["tensorboard"] = any(r in ("tensorboard", "all") for r in reports)
        out["wandb"] = any(r in ("wandb", "all") for r in reports)
        out["dtype"] = "bfloat16" if f["bf16"] else "auto"
        out["device"] = "cpu" if f["use_cpu"] else "auto"
        if f["sync_ref_model"]:
            out["ref_sync_every"] = in_generations("ref_model_sync_steps")
        eval_field = "eval_steps" if f["eval_steps"] is not None else "logging_steps"  # transformers' fallback
        out["eval_every"] = self._every("eval_strategy", eval_field, in_generations, per_epoch, ("no", "steps"))
        if f["disable_tqdm"]:
            out["progress"] = False
        if f["resume_from_checkpoint"]:
            resume = f["resume_from_checkpoint"]
            out["resume_from_checkpoint"] = "latest" if resume is True else str(resume)
        out["overwrite_output_dir"] = f["overwrite_output_dir"]
        out.setdefault("output_dir", "trainer_output")  # TRL's own default folder
        return native.GRPOConfig(**out)

    def _schedule(self) -> tuple[str, float]:
        """`lr_scheduler_type` and its `lr_scheduler_kwargs` as grpokit's (lr_schedule, min_lr_rate); transformers'
        cosine_with_min_lr takes min_lr (a rate) or min_lr_rate (a fraction of learning_rate), exactly one."""
        f = self.fields
        kind, kwargs = f["lr_scheduler_type"], dict(f["lr_scheduler_kwargs"] or {})
        if kind not in SCHEDULES:
            what = f" ({OTHER_SCHEDULES[kind]})" if kind in OTHER_SCHEDULES else ""
            raise native.ConfigError(
                f"TRL field `lr_scheduler_type` = {kind!r}{what} is not supported: grpokit has {', '.join(SCHEDULES)}"
            )
        for key, value in kwargs.items():
            if key not in SCHEDULE_KWARGS.get(kind, ()) or (key == "num_cycles" and value != 0.5):
                raise native.ConfigError(
                    f"TRL field `lr_scheduler_kwargs` key `{key}` = {value!r} is not supported with lr_scheduler_type="
                    f"{kind!r}: grpokit reads min_lr or min_lr_rate (cosine_with_min_lr) and num_cycles only at "
                    "transformers' default 0.5 (one half wave)"
                )
        if kind != "cosine_with_min_lr":
            return SCHEDULES[kind], 0.0
        floors = [key for key in ("min_lr", "min_lr_rate") if kwargs.get(key) is not None]
        if len(floors) != 1:
            raise native.ConfigError(
                "TRL field `lr_scheduler_type` = 'cosine_with_min_lr' needs exactly one of min_lr and min_lr_rate in "
                f"`lr_scheduler_kwargs` (transformers refuses {'both' if floors else 'neither'} too), got "
                f"{f['lr_scheduler_kwargs']!r}"
            )
        floor = kwargs[floors[0]]
        if isinstance(floor, bool) or not isinstance(floor, (int, float)):
            raise native.ConfigError(
                f"TRL field `lr_scheduler_kwargs` key `{floors[0]}` expects a number, got {floor!r}"
            )
        return "cosine_with_min_lr", floor / f["learning_rate"] if floors[0] == "min_lr" else float(floor)

    def _every(self, strategy: str, steps: str, in_generations: Any, per_epoch: int | None, kinds: tuple) -> int:
        """`save_strategy` / `eval_strategy` with its step count, as grpokit's every-N generation steps (0: off)."""
        value = self.fields[strategy]
        if value == "no":
            return 0
        if value == "steps":
            return in_generations(steps)
        if value == "epoch":
            if per_epoch is None:
                raise native.ConfigError(f"TRL field `{strategy}` = 'epoch' needs the training set to count epochs")
            return per_epoch
        raise native.ConfigError(
            f"TRL field `{strategy}` = {value!r}: grpokit has 'no', 'steps' and 'epoch'"
            + (" (no metric picks a 'best' checkpoint)" if value == "best" else "")
        )

    def _max_steps(self, per_generation: int, per_epoch: int | None, prompts: int, num_prompts: int | None) -> int:
        """TRL's max_steps (optimizer steps; <= 0: num_train_epochs over the data) as grpokit's generation steps."""
        f = self.fields
        if f["max_steps"] > 0:
            steps = max(1, math.ceil(f["max_steps"] / per_generation))
            if steps * per_generation != f["max_steps"]:
                warnings.warn(
                    f"TRL field `max_steps` = {f['max_steps']} optimizer steps is not a whole number of generation "
                    f"steps ({per_generation} optimizer steps each: num_iterations x steps_per_generation): grpokit "
                    f"runs {steps}, {steps * per_generation} optimizer steps",
                    InputWarning,
                    stacklevel=4,
                )
            return steps
        if num_prompts is None:
            raise native.ConfigError("TRL field `max_steps` = -1 needs the training set to count epochs")
        if not per_epoch:
            raise native.ConfigError(
                f"TRL field `num_train_epochs`: the training set's {num_prompts} prompts are fewer than one generation "
                f"batch of {prompts} prompts (generation batch / num_generations), so an epoch has no step (TRL would "
                "train none): set max_steps, or a smaller batch"
            )
        return math.ceil(f["num_train_epochs"] * per_epoch)


JSON_FIELDS = frozenset({"lr_scheduler_kwargs", "generation_kwargs", "chat_template_kwargs"})


def _not_a_trl_field(name: str) -> str:
    """The error for a name TRL 1.16's GRPOConfig does not have: the nearest TRL field, or grpokit's own field."""
    close = difflib.get_close_matches(name, sorted(TRL_DEFAULTS), n=1)
    if close:
        hint = f"; did you mean `{close[0]}`?"
    elif name in {f.name for f in dataclasses.fields(native.GRPOConfig)}:
        hint = (
            ": it is a field of grpokit's own GRPOConfig, which a TRL config cannot set; build that one instead "
            "(`from grpokit import GRPOConfig`)"
        )
    else:
        hint = " (docs/from-trl.md lists how grpokit answers each TRL field)"
    return f"GRPOConfig argument `{name}` is not a field of TRL 1.16's GRPOConfig{hint}"


def _json_dict(name: str, value: Any) -> Any:
    """A dict field given as JSON text (as TRL, through transformers, reads one), as the dict; anything else as it is
    (its type is checked next)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as err:
        raise native.ConfigError(f"TRL field `{name}` is text that is not JSON ({err}): give a dict") from None
    if not isinstance(parsed, dict):
        raise native.ConfigError(f"TRL field `{name}` is JSON text of a {type(parsed).__name__}: give a dict")
    return parsed


def check_optimizer(name: str) -> None:
    """`optim`: the names of torch's AdamW are grpokit's optimizer; any other optimizer is refused, naming it."""
    if name in ADAMW_NAMES:
        return
    what = next((text for prefix, text in OTHER_OPTIMIZERS.items() if name.startswith(prefix)), None)
    kind = f" ({what})" if what else ""
    raise native.ConfigError(
        f"TRL field `optim` = {name!r}{kind} is not supported: grpokit trains with torch's AdamW (adam_beta1, "
        f"adam_beta2, adam_epsilon, weight_decay); the same algorithm goes by {', '.join(ADAMW_NAMES)}"
    )


def check_generation_kwargs(kwargs: dict[str, Any]) -> None:
    """`generation_kwargs`: the keys that are grpokit's sampling fields, of the field's type; any other key (a
    GenerationConfig or vLLM SamplingParams option grpokit's samplers lack) refused by name."""
    for key, value in kwargs.items():
        if key == "do_sample" and value is True:  # what GRPO's rollouts do anyway
            continue
        if key not in GENERATION_KWARGS:
            raise native.ConfigError(
                f"TRL field `generation_kwargs` key `{key}` is not supported: grpokit's samplers (its own and vLLM) "
                f"take {', '.join(GENERATION_KWARGS)} from it (do_sample only as True)"
            )
        if GENERATION_KWARGS[key] == "stop_strings":
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, list) or not all(isinstance(t, str) and t for t in texts):
                raise native.ConfigError(
                    f"TRL field `generation_kwargs` key `{key}` expects a text or a list of non-empty texts, got "
                    f"{value!r}"
                )
            continue
        try:
            check_trl_field(key, value)
        except native.ConfigError as err:
            raise native.ConfigError(str(err).replace(f"TRL field `{key}`", f"TRL field `generation_kwargs` key "
                                                       f"`{key}`")) from None  # fmt: skip


def warn_no_effect(fields: dict[str, Any]) -> None:
    """One InputWarning naming every field set away from TRL's default that changes nothing in grpokit, and one for
    `bf16=True` on a machine whose matrix products would run on the CPU."""
    set_ = [name for name in fields if name in NO_EFFECT and fields[name] != TRL_DEFAULTS[name]]
    if set_:
        listed = "; ".join(f"`{name}` ({NO_EFFECT[name]})" for name in set_)
        warnings.warn(f"TRL fields accepted with no effect in grpokit: {listed}", InputWarning, stacklevel=3)
    if fields.get("bf16") is True:
        import torch

        if fields.get("use_cpu") or not torch.cuda.is_available():
            where = "use_cpu=True" if fields.get("use_cpu") else "this machine has no CUDA device"
            warnings.warn(
                f"TRL field `bf16` = True on a CPU ({where}): the forwards run under bfloat16 autocast, whose matrix "
                "products are very slow on most CPUs (grpokit's own `dtype: auto` computes in float32 there); leave "
                "bf16 unset for float32",
                InputWarning,
                stacklevel=3,
            )


def check_trl_field(name: str, value: Any) -> None:
    """A TRL field's value has TRL's type and a usable range; the error names the field."""
    hint = TRL_TYPES.get(name)
    if hint is None:
        return
    if not native._matches(value, hint):
        got = f"{value!r} (a {type(value).__name__})"
        text = " (a number written as text: write it without quotes)" if _is_number_text(value, hint) else ""
        raise native.ConfigError(f"TRL field `{name}` expects {native._type_name(hint)}, got {got}{text}")
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, float) and not math.isfinite(number):
            raise native.ConfigError(f"TRL field `{name}` must be a finite number, got {value!r}")
    if value is None or isinstance(value, (bool, str, list)):
        return
    if name in TRL_MINIMUM and value < TRL_MINIMUM[name]:
        raise native.ConfigError(f"TRL field `{name}` must be >= {TRL_MINIMUM[name]:g}, got {value!r}")
    if name in TRL_ABOVE_ZERO and value <= 0:
        raise native.ConfigError(f"TRL field `{name}` must be > 0, got {value!r}")


def _is_number_text(value: Any, hint: Any) -> bool:
    if not isinstance(value, str) or native._matches(value, hint):
        return False
    try:
        number = float(value)
    except ValueError:
        return False
    return native._matches(number, hint) or native._matches(int(number), hint)


def trl_error(err: native.ConfigError, given: frozenset[str] | set[str]) -> native.ConfigError:
    """grpokit's error about one of its own fields (`config field `minibatch_size` ...`), told in the TRL names it
    was computed from: those the user wrote, else all of them. An error about a field no TRL name gives is kept."""
    text = str(err)
    match = re.match(r"config field `([\w./]+)`\s*(.*)", text, re.DOTALL)
    if match is None:
        return err
    field, rest = match.group(1), match.group(2)
    sources = list(dict.fromkeys(s for name in field.split("/") for s in GRPOKIT_SOURCES.get(name, ())))
    if not sources:
        return err
    written = [s for s in sources if s.split(".")[0] in given] or sources
    trl_names = ", ".join(f"`{s}`" for s in written)
    kind = "TRL field" if len(written) == 1 else "TRL fields"
    if written == [field]:  # the same name in both
        return native.ConfigError(f"{kind} {trl_names} {rest}")
    return native.ConfigError(f"{kind} {trl_names}, as grpokit's `{field}`, {rest}")


# grpokit's way out of what tool_format chat refuses, as a TRL config's user takes it (it has no such field)
TRL_TAGS_WAY_OUT = (
    "grpokit's tag format (tool_format: tags, a call written <NAME>ARGUMENT</NAME>, one text argument per tool) "
    "works with any template, and TRL's GRPOConfig has no field for it: give grpokit.trl's GRPOTrainer grpokit's "
    "own config made from yours, args=dataclasses.replace(args.to_grpokit(num_prompts=len(train_dataset)), "
    "tool_format='tags')"
)


@contextlib.contextmanager
def trl_way_out(trl_config: bool) -> Iterator[None]:
    """An error raised inside whose way out is `tool_format: tags` (`chat_tools.TAGS_WAY_OUT`: a ConfigError, or an
    EnvironmentFailure the step wraps) tells a TRL config's user how to take it (`TRL_TAGS_WAY_OUT`): the same
    error, its text changed."""
    try:
        yield
    except Exception as err:
        text = err.args[0] if err.args and isinstance(err.args[0], str) else ""
        if trl_config and TAGS_WAY_OUT in text:
            err.args = (text.replace(TAGS_WAY_OUT, TRL_TAGS_WAY_OUT), *err.args[1:])
        raise


@contextlib.contextmanager
def trl_names_in_errors(given: frozenset[str] | set[str] | None) -> Iterator[None]:
    """ConfigErrors raised inside speak of the TRL fields in `given` (None: a native config, nothing to tell), and
    of the way out a TRL config has (`trl_way_out`)."""
    try:
        with trl_way_out(given is not None):
            yield
    except native.ConfigError as err:
        if given is None:
            raise
        translated = trl_error(err, given)
        if translated is err:
            raise
        raise translated from None


# transformers.Trainer members TRL scripts call that the adapter lacks: named in the AttributeError, not a bare name
TRAINER_MEMBERS_NOT_PROVIDED = frozenset({
    "model_wrapped", "predict", "log_metrics", "save_metrics", "save_state", "create_model_card",
})  # fmt: skip


class ProcessView:
    """The members of accelerate's `Accelerator` that TRL's scripts use between train() and the end, on grpokit's
    process group (`Cluster`): which process this is, printing once, waiting for the others."""

    def __init__(self, cluster: Any):
        self.cluster = cluster
        self.process_index, self.num_processes = cluster.rank, cluster.world_size
        self.local_process_index = cluster.local_rank
        self.is_main_process, self.is_local_main_process = cluster.is_main, cluster.local_rank == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on the main process only, as accelerate's."""
        if self.is_local_main_process:
            print(*args, **kwargs)

    def wait_for_everyone(self) -> None:
        import torch.distributed as dist

        if self.num_processes > 1 and dist.is_initialized():
            dist.barrier()


class GRPOTrainer:
    """TRL's GRPOTrainer arguments on grpokit's trainer (`grpokit.stages.grpo.GRPOTrainer`, as `.trainer`)."""

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | native.GRPOConfig | dict[str, Any] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list[Any] | None = None,
        tools: list[Any] | None = None,
        environment_factory: Any = None,
        **unsupported: Any,
    ):
        from grpokit.stages.callbacks import CallbackHooks, Callbacks
        from grpokit.stages.grpo import GRPOTrainer as NativeTrainer

        set_ = [name for name, value in unsupported.items() if value not in (None, (None, None), [], ())]
        if set_:
            raise native.ConfigError(f"GRPOTrainer argument `{set_[0]}` is not supported by grpokit.trl")
        environment_factory = trl_environment(environment_factory, train_dataset)
        if reward_funcs is None and not _owns_reward(environment_factory):
            raise native.ConfigError(
                "GRPOTrainer needs reward_funcs (a function, a list of them, or a model folder), or an "
                "environment_factory whose environments define get_reward() (as TRL)"
            )
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            raise ArgumentError(
                f"GRPOTrainer argument `callbacks` is a {type(callbacks).__name__}; it takes a list of "
                "transformers.TrainerCallback objects (or classes)"
            )
        handler = Callbacks(callbacks)  # (checked before anything loads)
        args = trl_args(args)
        given = None  # a native config: its own names are the ones the user wrote
        if isinstance(args, GRPOConfig):
            given = args.given | ({"peft_config"} if peft_config is not None else set())
        with trl_names_in_errors(given):
            if isinstance(args, GRPOConfig):
                if args.eval_strategy != "no" and eval_dataset is None:
                    raise native.ConfigError(
                        f"TRL field `eval_strategy` = {args.eval_strategy!r} needs an eval_dataset (TRL refuses it "
                        "as well): pass eval_dataset=, or leave eval_strategy at 'no'"
                    )
                sized = train_dataset is not None and hasattr(train_dataset, "__len__")  # not a stream
                cfg = args.to_grpokit(num_prompts=len(train_dataset) if sized else None)
            else:
                cfg = dataclasses.replace(args)
            if reward_funcs is None:  # the environment's get_reward() alone scores the rollouts (its own column)
                cfg = dataclasses.replace(cfg, reward_funcs=[], environment=_spec_of(environment_factory.factory))
            if peft_config is not None and type(model).__name__.startswith("Peft"):
                raise native.ConfigError(
                    f"GRPOTrainer: `model` is a {type(model).__name__} (it carries LoRA adapters already) and "
                    "`peft_config` asks for more: the two sets would stack. Pass the base model "
                    "(model.get_base_model()) with peft_config, or the PeftModel without peft_config (its adapters "
                    "train)"
                )
            if peft_config is not None:
                cfg = dataclasses.replace(cfg, lora=lora_from_peft(peft_config, model))
            self.args = args
            self._args_as_built = args_fields(args)
            self._resume_asked = cfg.resume_from_checkpoint
            self._saved: set[Path] = set()  # the folders `save_model` wrote
            # TRL decides whether to resume in train(resume_from_checkpoint=...); the trainer is built as a resume
            # of output_dir's latest checkpoint would be (its config checked against it), decided in `train`
            earlier = [] if cfg.resume_from_checkpoint or cfg.overwrite_output_dir else _earlier_run(cfg)
            build = cfg
            if earlier and list_checkpoints(cfg.output_dir):
                build = dataclasses.replace(cfg, resume_from_checkpoint="latest")
            elif earlier:
                raise RunDirectoryError(_held_run_message(cfg, earlier, resumable=False))
            try:
                self.trainer = NativeTrainer(
                    build,
                    model=model,
                    tokenizer=processing_class,
                    reward_funcs=reward_funcs,
                    train_dataset=train_dataset,
                    eval_dataset=eval_dataset,
                    tools=tools,
                    environment_factory=environment_factory,
                )
            except FinishedRunError as err:
                if build is cfg:
                    raise
                # a finished run: TRL's script re-run as it was, which nothing in output_dir can continue
                raise FinishedRunError(
                    f"output_dir {cfg.output_dir} holds a finished run ({err}); for a new run there set "
                    "overwrite_output_dir=True, or choose another output_dir"
                ) from None
            except RunDirectoryError as err:
                if build is cfg:
                    raise
                raise RunDirectoryError(
                    f"output_dir {cfg.output_dir} holds an earlier run, which trainer.train(resume_from_checkpoint="
                    f"True) would continue, but not with these arguments ({err}); for a new run there set "
                    "overwrite_output_dir=True, or choose another output_dir"
                ) from None
        self.callback_handler = handler
        self.trainer.hooks = CallbackHooks(self.trainer, self.args, handler)  # keeps .state current, calls them
        self.trainer.hooks.event("on_init_end")

    def train(self, resume_from_checkpoint: str | bool | None = None, **unsupported: Any):
        """TRL's `train`: `resume_from_checkpoint` True continues the latest checkpoint in output_dir, a path that
        checkpoint (it must be one of output_dir's); False starts a fresh run (an earlier run in output_dir is
        refused unless `overwrite_output_dir=True`); None does what the args' own `resume_from_checkpoint` asks
        (a fresh run when it is unset)."""
        set_ = [name for name, value in unsupported.items() if value is not None]
        if set_:
            raise native.ConfigError(f"GRPOTrainer.train argument `{set_[0]}` is not supported by grpokit.trl")
        check_args_unchanged(self.args, self._args_as_built)
        native_trainer = self.trainer
        cfg = native_trainer.cfg
        if resume_from_checkpoint is True:
            asked: str | None = "latest"
        elif resume_from_checkpoint is False:  # said in the call: a fresh run, whatever the args hold (as in TRL)
            asked = None
        elif resume_from_checkpoint is None:
            asked = self._resume_asked
        else:
            asked = str(resume_from_checkpoint)
        if asked is None and not cfg.overwrite_output_dir and (earlier := _earlier_run(cfg)):
            raise RunDirectoryError(_held_run_message(cfg, earlier, resumable=bool(list_checkpoints(cfg.output_dir))))
        if asked == "latest" and not list_checkpoints(cfg.output_dir):
            raise RunDirectoryError(
                f"resume_from_checkpoint=True: output_dir {cfg.output_dir} holds no complete checkpoint to continue "
                "(TRL refuses it as well): train without it for a fresh run"
            )
        cfg.resume_from_checkpoint = asked
        if asked is not None:  # TRL: an explicit resume continues the run; overwrite_output_dir guards fresh runs only
            cfg.overwrite_output_dir = False
        previous = native_trainer.run_dir
        native_trainer.run_dir = run_directory(cfg, writer=previous.writer, inputs=previous.inputs)
        native_trainer.run_dir.plan()
        with trl_way_out(isinstance(self.args, GRPOConfig)):  # (a reset() observation is refused at the first step)
            result = native_trainer.train()
        return dataclasses.replace(result, global_step=self.state.global_step)  # TRL's unit: optimizer steps

    def __getattr__(self, name: str) -> Any:  # only for names the object lacks
        if name in TRAINER_MEMBERS_NOT_PROVIDED:
            raise AttributeError(
                f"grpokit.trl.GRPOTrainer has no `{name}` (a transformers.Trainer member the adapter does not "
                "provide). It has train() (which returns a TrainResult with .metrics, .global_step, "
                ".training_loss, .eval_history), evaluate(), save_model(), log(), push_to_hub() (an error naming the "
                "model folder), add_callback() / pop_callback() / remove_callback(), .state (with .log_history), "
                ".model, .processing_class, .optimizer, .lr_scheduler, .args and .trainer (grpokit's trainer); the "
                "run's figures are in OUTPUT_DIR/metrics.jsonl"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---------------------------------------------------------------- transformers.Trainer's face
    @property
    def state(self) -> Any:
        """transformers' TrainerState: global_step and max_steps in optimizer steps (TRL's unit), epoch, and
        log_history (a row per step and per evaluation, with its `step`)."""
        return self.trainer.state

    @property
    def model(self) -> Any:
        """The trained module (a PeftModel with LoRA), never wrapped: grpokit sums gradients itself under DDP, and
        FSDP2 shards this same module in place."""
        return self.trainer.policy.model

    @property
    def processing_class(self) -> Any:
        return self.trainer.tokenizer

    tokenizer = processing_class  # (transformers < 5's name)

    @property
    def optimizer(self) -> Any:
        return self.trainer.policy.optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self.trainer.policy.scheduler

    def add_callback(self, callback: Any) -> None:
        """transformers' `add_callback`: a TrainerCallback, or its class (instantiated)."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        """The first callback that is `callback` (or of that class), removed and returned; None if there is none."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callback_handler.remove_callback(callback)

    @property
    def accelerator(self) -> ProcessView:
        """What TRL's scripts call on `trainer.accelerator` (`print`, `is_main_process`, `wait_for_everyone`, ...),
        answered from grpokit's own process group: grpokit runs without accelerate."""
        return ProcessView(self.trainer.cluster)

    @property
    def hub_model_id(self) -> str | None:
        """The args' `hub_model_id` (TRL's scripts print it after push_to_hub, which grpokit refuses offline)."""
        return getattr(self.args, "hub_model_id", None)

    def end(self) -> None:
        """transformers' `end()` (5.18+), the last call of TRL's scripts: the trackers are closed when train()
        returns, so what is left is the process group grpokit joined under torchrun, left once every rank got
        here (a group the script made itself is the script's to destroy)."""
        self.trainer.cluster.close()

    def is_world_process_zero(self) -> bool:
        return self.trainer.cluster.is_main

    def is_local_process_zero(self) -> bool:
        return self.trainer.cluster.local_rank == 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """transformers' `log`: the row (with the epoch) kept in state.log_history at the current step and given to
        the callbacks' on_log. metrics.jsonl holds the run's own rows only."""
        self.trainer.hooks.log(logs)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """A held-out evaluation of the model as it is now, on the trainer's eval_dataset (a ValueError without
        one, as in TRL): accuracy and every reward's mean, greedy and sampled, as `eval_NAME` keys; logged in
        state.log_history and given to the callbacks' on_evaluate. On every rank under torchrun, as in TRL."""
        for name, value in (("eval_dataset", eval_dataset), ("ignore_keys", ignore_keys)):
            if value is not None:
                raise native.ConfigError(
                    f"GRPOTrainer.evaluate argument `{name}` is not supported by grpokit.trl: it evaluates the "
                    "eval_dataset given to GRPOTrainer(...)"
                )
        return self.trainer.hooks.evaluate(metric_key_prefix)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any):
        """An error: grpokit makes no network calls. The message names the model folder and how to upload it."""
        folder = Path(self.trainer.cfg.output_dir) / "model"
        repo = getattr(self.args, "hub_model_id", None) or f"YOUR_NAME/{Path(self.trainer.cfg.output_dir).name}"
        where = f"the trained model is in {folder}" if folder.is_dir() else f"train() saves the model to {folder}"
        raise RuntimeError(
            f"GRPOTrainer.push_to_hub does not upload: grpokit makes no network calls (it trains offline). {where}; "
            f"push it with huggingface_hub: `huggingface_hub.upload_folder(repo_id={repo!r}, folder_path="
            f"{str(folder)!r})`, or on the command line `hf upload {repo} {folder}` (after `hf auth login`)"
        )

    def save_model(self, output_dir: str | None = None):
        """The policy in `save_pretrained` form. As TRL's, it replaces an earlier save there, but only a model folder
        grpokit wrote, never a user's folder. The default, and `output_dir` itself (TRL's scripts end with
        `trainer.save_model(training_args.output_dir)`), save to OUTPUT_DIR/model, where `train` already saved it:
        OUTPUT_DIR is the run's folder (checkpoints, logs), which a model folder cannot replace."""
        run_folder = Path(self.trainer.cfg.output_dir)
        target = Path(output_dir) if output_dir else run_folder
        if target.resolve() == run_folder.resolve():
            target = run_folder / "model"
        # not the base model, a reward model or any other input of the run
        check_not_an_input(input_paths(self.trainer.cfg), target, "save_model's output_dir")
        # what this trainer saved may be saved over (TRL's scripts save more than once); another model folder grpokit
        # wrote (another run's model, a tokenizer's source, a reward model) is not this run's to replace
        own = {(run_folder / "model").resolve(), *self._saved}
        run_id = self.trainer.run_dir.run_id or _folder_run_id(run_folder)
        saved_here = _saved_from(target) == (run_folder.resolve(), run_id)  # by this run (before a resume, say)
        if target.resolve() not in own and written_kind(target) == "model" and not saved_here:
            raise OutputExistsError(
                f"save_model's output_dir {target} holds a model folder grpokit wrote for something else (another "
                "run's model or save, also an earlier run replaced in this output_dir; a `grpokit init` model; a "
                "reward model): save_model replaces only what this run saved; choose another folder, or delete that "
                "one first"
            )
        from grpokit.model.saving import save_trained

        lora_form = self.trainer.cfg.lora.save
        folder = save_trained(
            self.trainer.policy,
            target,
            self.trainer.tokenizer,
            lora_form=lora_form,
            max_shard_size=self.trainer.cfg.max_shard_size,
            overwrite=target.resolve() in own or saved_here,
        )
        self._saved.add(Path(folder).resolve())
        _mark_saved_from(Path(folder), run_folder, run_id)  # this run, resumed later, may replace it
        return folder


def _saved_from(folder: Path) -> tuple[Path, str | None] | None:
    """(output_dir, run id) of the run whose `save_model` wrote `folder` (None: not a save_model folder)."""
    try:
        saved = json.loads((folder / PROVENANCE).read_text()).get("saved_from")
    except (OSError, ValueError, AttributeError):
        return None
    return (Path(saved["output_dir"]), saved.get("run_id")) if isinstance(saved, dict) else None


def _folder_run_id(run_folder: Path) -> str | None:
    try:
        return (run_folder / "run_id").read_text().strip()
    except OSError:
        return None


def _mark_saved_from(folder: Path, run_folder: Path, run_id: str | None) -> None:
    record = json.loads((folder / PROVENANCE).read_text())
    record["saved_from"] = {"output_dir": str(run_folder.resolve()), "run_id": run_id}
    with atomic_file(folder / PROVENANCE) as tmp:
        tmp.write_text(json.dumps(record))


def trl_environment(factory: Any, train_dataset: Any) -> Any:
    """TRL's `environment_factory` for grpokit's trainer: one factory (a class or a function), wrapped so that its
    instances' methods are tools by TRL's rule (`TRLEnvironment`); TRL's dict of named factories and a run without a
    train_dataset are refused by name."""
    from grpokit.rollout.environments import TRLEnvironment

    if factory is None:
        return None
    if isinstance(factory, dict):
        raise native.ConfigError(
            "GRPOTrainer argument `environment_factory` is a dict (TRL's experimental multi-environment form, an "
            "`environment` column choosing each row's): grpokit.trl takes one factory, a class or a function; one "
            "run per environment, or one environment class whose reset(**row) sets itself up from the row"
        )
    if train_dataset is None:
        raise native.ConfigError(
            "GRPOTrainer: `environment_factory` without a train_dataset, where TRL lets each environment's reset() "
            "supply the prompt: grpokit renders every prompt from the dataset once for its whole group (token in, "
            "token out), so pass a train_dataset with a prompt column"
        )
    return TRLEnvironment(factory)


def _owns_reward(factory: Any) -> bool:
    """An environment_factory (wrapped by `trl_environment`) whose environments score themselves with get_reward()
    (one made to look, as TRL makes one)."""
    if factory is None:
        return False
    try:
        probe = factory()
    except Exception:  # noqa: BLE001 (building the trainer names the factory that fails, and why)
        return True
    return callable(getattr(type(probe), "get_reward", None))


def _spec_of(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def args_fields(args: Any) -> dict[str, Any]:
    """The fields of a trainer's `args` (TRL's GRPOConfig or grpokit's), by name, as a copy to compare later."""
    if isinstance(args, GRPOConfig):  # an assignment sets an attribute beside `fields`, which it then shadows
        return copy.deepcopy({**args.fields, **{k: v for k, v in vars(args).items() if k not in ("fields", "given")}})
    return copy.deepcopy(vars(args))


def check_args_unchanged(args: Any, as_built: dict[str, Any]) -> None:
    """TRL's trainer reads `self.args` again in train(); grpokit's adapter built its trainer from them once. A field
    changed in between would be ignored with no word: refused, naming it."""
    now = args_fields(args)
    changed = sorted(name for name in now.keys() | as_built.keys() if [now.get(name)] != [as_built.get(name)])
    if changed:
        fields = ", ".join(f"`{name}` ({as_built.get(name)!r} -> {now.get(name)!r})" for name in changed[:5])
        raise native.ConfigError(
            f"trainer.args changed after GRPOTrainer(...) was built: {fields}. grpokit's trainer is built from "
            "args when it is made: set them before GRPOTrainer(...), and build a new trainer"
        )


def trl_args(args: Any) -> GRPOConfig | native.GRPOConfig:
    """`args=` as TRL users write it: grpokit.trl's GRPOConfig, None (TRL's defaults), a dict of TRL GRPOConfig
    fields, or grpokit's own GRPOConfig (used as it is)."""
    if args is None:
        return GRPOConfig()
    if isinstance(args, dict):
        return GRPOConfig(**args)
    if isinstance(args, native.PPOConfig):
        raise native.ConfigError(
            "GRPOTrainer argument `args` is grpokit's PPOConfig: this trainer runs GRPO (PPO is grpokit.PPOTrainer)"
        )
    if isinstance(args, (GRPOConfig, native.GRPOConfig)):
        return args
    kind = f"{type(args).__module__}.{type(args).__name__}"
    hint = (
        ": build it with grpokit.trl's GRPOConfig (`from grpokit.trl import GRPOConfig`, the same fields)"
        if type(args).__module__.split(".")[0] in ("trl", "transformers")
        else ""
    )
    raise native.ConfigError(
        f"GRPOTrainer argument `args` is a {kind}; it takes grpokit.trl.GRPOConfig, a dict of its fields or grpokit's "
        f"own GRPOConfig{hint}"
    )


def _earlier_run(cfg: native.GRPOConfig) -> list[str]:
    """What an earlier run left in output_dir."""
    return run_directory(cfg).holds_run()


def _held_run_message(cfg: native.GRPOConfig, found: list[str], *, resumable: bool) -> str:
    how = "continue it with trainer.train(resume_from_checkpoint=True), " if resumable else ""
    return (
        f"output_dir {cfg.output_dir} holds an earlier run ({', '.join(found[:4])}): {how}replace it with "
        "GRPOConfig(overwrite_output_dir=True), or choose another output_dir"
    )


# peft LoraConfig fields that say nothing about the adapters trained (bookkeeping set by peft itself)
PEFT_BOOKKEEPING = frozenset({"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"})


def lora_from_peft(peft_config: Any, model: Any = None) -> native.LoRAConfig:
    """A peft LoraConfig (or a dict of its keywords) as grpokit's `lora:` section: rank, alpha, dropout and target
    modules, resolved as peft resolves them for `model` (None: the architecture's default modules; a string: a
    regular expression over the full module names). Any other option set away from peft's default is an error
    naming it: grpokit's LoRA would silently train something else."""
    from peft import LoraConfig

    if isinstance(peft_config, dict):
        try:
            peft_config = LoraConfig(**peft_config)
        except (TypeError, ValueError) as err:
            raise native.ConfigError(f"peft_config (a dict, read as peft.LoraConfig keywords): {err}") from None
    if not isinstance(peft_config, LoraConfig):
        raise native.ConfigError(
            f"peft_config is a {type(peft_config).__name__}: grpokit trains LoRA adapters only (peft.LoraConfig)"
        )
    if peft_config.task_type not in (None, "CAUSAL_LM"):
        raise native.ConfigError(
            f"peft_config.task_type = {peft_config.task_type!r}: GRPO trains a causal LM (CAUSAL_LM)"
        )
    if not isinstance(peft_config.r, int) or peft_config.r < 1:  # grpokit's `lora.r: 0` means no LoRA at all
        raise native.ConfigError(
            f"peft_config.r = {peft_config.r!r}: a LoRA rank must be a positive integer (peft refuses it too)"
        )
    mapped = {
        "r": peft_config.r,
        "lora_alpha": peft_config.lora_alpha,
        "lora_dropout": peft_config.lora_dropout,
        "target_modules": peft_config.target_modules,
        "task_type": peft_config.task_type,
    }
    reference = LoraConfig(**mapped)  # everything else at peft's defaults, normalized by peft as the given one is
    for f in dataclasses.fields(LoraConfig):
        if f.name in mapped or f.name in PEFT_BOOKKEEPING:
            continue
        if getattr(peft_config, f.name) != getattr(reference, f.name):
            raise native.ConfigError(
                f"peft_config.{f.name} = {getattr(peft_config, f.name)!r} is not supported: grpokit's LoRA takes r, "
                "lora_alpha, lora_dropout and target_modules (the rest at peft's defaults)"
            )
    return native.LoRAConfig(
        r=peft_config.r,
        alpha=float(peft_config.lora_alpha),
        dropout=peft_config.lora_dropout,
        target_modules=_target_modules(peft_config.target_modules, model),
    )


def _target_modules(targets: Any, model: Any) -> list[str]:
    """peft's `target_modules` as the names grpokit's LoRA takes (peft matches a name list by suffix)."""
    if targets == "all-linear":
        return ["all-linear"]
    if targets is None:  # peft: the architecture's usual modules
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(_model_config(model), "model_type", None)
        if model_type not in DEFAULTS:
            raise native.ConfigError(
                f"peft_config.target_modules is None, and peft has no default modules for model type {model_type!r}: "
                "name them (a list, or 'all-linear')"
            )
        return sorted(DEFAULTS[model_type])
    if isinstance(targets, str):  # peft: a regular expression the whole module name must match
        names = [name for name in _module_names(model) if re.fullmatch(targets, name)]
        if not names:
            raise native.ConfigError(
                f"peft_config.target_modules = {targets!r} (a regular expression over full module names, as peft "
                "reads a string) matches no module of the model: give a list of names, or 'all-linear'"
            )
        return names
    return sorted(targets)


def _model_config(model: Any) -> Any:
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(model))
        except (OSError, ValueError) as err:
            raise native.ConfigError(f"peft_config: cannot read the model's config at {str(model)!r}: {err}") from None
    return getattr(model, "config", None)


def _module_names(model: Any) -> list[str]:
    """Every module's full name, as peft's regular expression sees them (a path: built on the meta device)."""
    if not isinstance(model, (str, Path)):
        return [name for name, _ in model.named_modules()]
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(_model_config(model))
    return [name for name, _ in skeleton.named_modules()]
