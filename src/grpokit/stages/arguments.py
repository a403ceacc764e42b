"""The arguments of the Python entry points (GRPOTrainer, PPOTrainer, train_sft, train_reward_model), checked up front.

A Python caller can hand over anything. Each argument's type is checked here, in one place, before any file is read
or any model loads, and an error names the argument as the caller wrote it (`reward_funcs`, `train_dataset`,
`tokenizer`, ...) rather than surfacing later as "'int' object is not iterable" or a string read as a list of
columns.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from grpokit.config import ConfigError, from_dict, load_yaml
from grpokit.core.types import ArgumentError, InputWarning, kind_of, with_article
from grpokit.data.rows import dataset_rows
from grpokit.model.loading import is_hub_id
from grpokit.rewards.functions import reward_entries


class Arguments(NamedTuple):
    config: Any  # a copy of the stage's config, validated, recording the model that was passed
    model: Any  # a model object, or None (the config's `model` names what to load)
    rows: dict[str, list[dict[str, Any]] | None]  # each data set argument's rows, None where not given
    reward_funcs: list[Any] | None  # non-empty: functions, (name, function) pairs, names; None: the config's


def python_arguments(
    entry: str,
    config_class: type,
    config: Any,
    *,
    model: Any = None,
    tokenizer: Any = None,
    datasets: dict[str, Any] | None = None,
    reward_funcs: Any = None,
    sampler: Any = None,
) -> Arguments:
    """Every argument of the entry point `entry` checked, in the order a user reads them, before any work:
    `config` (a `config_class`, the path of its YAML file or a dict of its fields), `model`, `tokenizer`,
    `reward_funcs`, `sampler`; then the config validated; then `datasets` (argument name -> value, the training
    data first) read into rows."""
    config = stage_config(entry, config_class, config)
    lora = getattr(config, "lora", None)
    lora_rank = lora.get("r", 0) if isinstance(lora, dict) else getattr(lora, "r", 0)  # (a dict: refused later)
    check_model(model, causal_lm=config_class.__name__ != "RewardModelConfig", adapters=bool(lora_rank))
    check_tokenizer(tokenizer)
    entries = reward_entries(reward_funcs)
    check_sampler(sampler)
    config, model = with_model(config, model, tokenizer)
    datasets = datasets or {}
    train_given = next(iter(datasets.values()), None) is not None
    config.validate(model_given=model is not None, rows_given=train_given, rewards_given=entries is not None)
    eval_given = [name for name, value in list(datasets.items())[1:] if value is not None]
    if eval_given and getattr(config, "eval_data", None) is not None:
        raise ConfigError(
            f"config field `eval_data` is set ({config.eval_data!r}) but `{eval_given[0]}` was passed in: use one"
        )
    if datasets.get("train_pairs") is not None and config.task is not None:
        gives = (
            "only the held-out pairs (pass eval_pairs= to evaluate on pairs of yours)"
            if datasets.get("eval_pairs") is None
            else "nothing (both pair sets were passed in): leave it out"
        )
        warnings.warn(
            f"{entry}: `train_pairs` passed in: these are the training pairs; the config's task {config.task!r} "
            f"gives {gives}",
            InputWarning,
            stacklevel=3,
        )
    if datasets.get("train_dataset") is not None and getattr(config, "task", None) is not None:
        warnings.warn(
            f"{entry}: `train_dataset` passed in: these are the training rows; the config's task "
            f"{config.task!r} gives only its checker (`accuracy`) and, without an eval set, its held-out rows",
            InputWarning,
            stacklevel=3,
        )
    rows = {name: dataset_rows(value, name) if value is not None else None for name, value in datasets.items()}
    return Arguments(config, model, rows, entries)


def stage_config(entry: str, config_class: type, config: Any) -> Any:
    """A `config_class` instance, or one read from a YAML file (a path) or from a dict of its fields."""
    if type(config) is config_class:
        return config
    if isinstance(config, config_class):  # a subclass: PPOConfig is a GRPOConfig with a critic's fields
        raise ArgumentError(
            f"{entry}: `config` is a {type(config).__name__}, not a {config_class.__name__}: its own fields would be "
            f"recorded and ignored; use the trainer of a {type(config).__name__} (PPOTrainer for a PPOConfig)"
        )
    if isinstance(config, (str, Path)):
        if not Path(config).is_file():
            expected = with_article(config_class.__name__)
            raise ConfigError(
                f"{entry}: `config` is {str(config)!r}, which is not a file: pass {expected} or the path of its "
                "YAML file"
            )
        return load_yaml(config_class, config)
    if isinstance(config, dict):
        return from_dict(config_class, config, source=f"{entry}: `config` (a dict)")
    given, expected = kind_of(config), with_article(config_class.__name__)
    if type(config).__name__ == config_class.__name__:  # same name, another module's class: name both modules
        given = f"{given.split()[0]} {type(config).__module__}.{type(config).__name__}"
        expected = f"{expected.split()[0]} {config_class.__module__}.{config_class.__name__}"
    hint = ""
    if callable(getattr(config, "to_grpokit", None)):  # grpokit.trl's TRL-named config
        hint = (
            f"; a grpokit.trl config runs with grpokit.trl.{entry}, or convert it with `config.to_grpokit()` "
            "(pass num_prompts= to turn epochs into steps)"
        )
    raise ArgumentError(
        f"{entry}: `config` is {given}; expected {expected}, the path of its YAML file, or a dict of its fields{hint}"
    )


def check_model(model: Any, *, causal_lm: bool = True, adapters: bool = False) -> None:
    """None (the config's `model`), a path or hub id, or a model object (a torch module): with `causal_lm`, one that
    writes text (a language-model head), with every weight on a device, and weights to train (`adapters`: LoRA
    adapters will be the weights trained)."""
    import torch

    if isinstance(model, torch.nn.Module):
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        if causal_lm and head is None:
            raise ArgumentError(
                f"`model` is a {type(model).__name__}, which has no language-model head (a classifier?): the policy "
                "writes completions token by token; pass a causal LM (AutoModelForCausalLM)"
            )
        if adapters and _is_peft(model):
            raise ArgumentError(
                f"`model` is a {type(model).__name__} (it carries LoRA adapters already) and `lora` asks for more: "
                "the two sets would stack and the saved model would hold neither whole. Pass its base model "
                "(model.get_base_model()) with `lora`, or the PeftModel with lora.r = 0 (its own adapters train)"
            )
        saved_whole = [m for c in getattr(model, "peft_config", {}).values() for m in (c.modules_to_save or [])]
        if saved_whole and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            raise ArgumentError(
                f"`model` is a {type(model).__name__} whose modules_to_save ({', '.join(saved_whole)}) copy a module "
                "of a model with tied input and output embeddings: the copy and the tied weight share a tensor, and "
                "the model could not be saved after training. Leave modules_to_save out, or untie the embeddings"
            )
        if not adapters and not _is_peft(model) and not any(p.requires_grad for p in model.parameters()):
            raise ArgumentError(
                f"`model` ({type(model).__name__}) has no parameter that requires grad (a frozen model): nothing "
                "would train. Call model.requires_grad_(True), or set `lora` to train adapters over the frozen base"
            )
        on_meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
        if on_meta is not None:  # (made under accelerate's init_empty_weights or device="meta": shapes, no numbers)
            raise ArgumentError(
                f"`model` has its weights on the meta device (e.g. {on_meta}): they have shapes but no values. "
                "Load the weights (from_pretrained without init_empty_weights, or model.to_empty(...) and "
                "load_state_dict), or pass the model's folder"
            )
        return
    if model is None or isinstance(model, (str, Path)):
        return
    raise ArgumentError(
        f"`model` is {kind_of(model)} ({model!r:.60}); expected a model folder's path, a hub id, or a "
        "transformers model object"
    )


def check_tokenizer(tokenizer: Any) -> None:
    """None (the model's own tokenizer loads), or a tokenizer object: something that encodes text when called and
    decodes ids."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        raise ArgumentError(
            f"`tokenizer` is the text {str(tokenizer)!r}, not a tokenizer: pass "
            f"transformers.AutoTokenizer.from_pretrained({str(tokenizer)!r}), or leave `tokenizer` out to load the "
            "model's own"
        )
    if not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        raise ArgumentError(
            f"`tokenizer` is {kind_of(tokenizer)}; expected a transformers tokenizer (called on text, with "
            "decode), or leave it out to load the model's own"
        )


def check_sampler(sampler: Any) -> None:
    """None (the in-process sampler), or an object with the sampler protocol's methods (`rollout.sampler.Sampler`)."""
    if sampler is None:
        return
    if isinstance(sampler, type):  # its methods are callable on the class too, and would fail without `self`
        raise ArgumentError(
            f"`sampler` is the class {sampler.__name__}, not a sampler: pass an instance, e.g. {sampler.__name__}(...)"
        )
    missing = [name for name in ("generate", "update_weights") if not callable(getattr(sampler, name, None))]
    if missing:
        raise ArgumentError(
            f"`sampler` is {kind_of(sampler)} without {' or '.join(f'{m}()' for m in missing)}; a sampler "
            "has generate(prompt_ids, num_generations=, params=, seeds=) and update_weights(weights) "
            "(grpokit.rollout.sampler.Sampler), or leave it out for the in-process sampler"
        )


def _is_peft(model: Any) -> bool:
    return type(model).__name__.startswith("Peft")


def with_model(config, model, tokenizer=None):
    """(a copy of the config, the model object or None): a path or hub id given as `model` becomes the config's
    `model`; a model object's `name_or_path` is recorded there, so the saved config says what was trained, and
    is where its tokenizer loads from unless `tokenizer` is given. A model object loaded from another model than
    the config's `model` names is an error: one of the two is a mistake."""
    config = dataclasses.replace(config)
    if isinstance(model, (str, Path)):
        config.model, model = str(model), None
    elif model is not None and config.model:
        source = getattr(model, "name_or_path", "")
        if source and not _same_source(source, config.model):
            raise ValueError(
                f"`model` was loaded from {source!r} but config field `model` is {config.model!r}: the tokenizer "
                f"would load from, and the saved config name, another model than the one trained; set `model` in "
                f"the config to {source!r} (or leave it empty)"
            )
    elif model is not None:
        source = getattr(model, "name_or_path", "")
        if tokenizer is None and not (source and (Path(source).exists() or is_hub_id(source))):
            raise ValueError(
                f"a {type(model).__name__} object was passed as `model` without `tokenizer=`, and it was not loaded "
                f"from a folder or hub id its tokenizer could come from (name_or_path {source!r}): pass tokenizer="
            )
        config.model = source or f"<{type(model).__name__} object>"
    return config, model


def _same_source(a: str, b: str) -> bool:
    """Two names of one model: the same text, or two paths to the same folder."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())
