"""Low-rank adapters (LoRA, Hu et al. 2021) through `peft`, and the reference model that comes with them.

With LoRA the base weights never change, so the GRPO reference is free: it is the policy with its adapters
switched off (`adapters_disabled`), bit for bit the base model, with no second copy in memory. Without
LoRA the reference is a full frozen copy, which `sync_reference` can pull towards the policy (TR-DPO).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from grpokit.core.types import ConfigError
from grpokit.runtime.checkpoint import atomic_folder, save_model
from grpokit.runtime.distributed import full
from grpokit.runtime.weight_files import MAX_SHARD_SIZE, WeightSource, tensor_source


class LoRASpec(Protocol):
    """What `apply_lora` reads of a LoRA section (the config's `lora:`, `config.LoRAConfig`)."""

    r: int  # the adapters' rank; 0: no adapters
    alpha: float
    dropout: float
    target_modules: list[str]  # module names, or ["all-linear"]


def apply_lora(model: Any, lora: LoRASpec) -> Any:
    """Wrap `model` in a `peft` PeftModel with fresh adapters; every base weight is frozen.

    The adapters start with B = 0, so the wrapped model computes exactly what `model` did. `model` itself
    is changed in place (its targeted linear layers become LoRA layers); use the returned wrapper. Build
    the optimizer AFTER this call, so that it holds state only for the adapters.
    """
    from peft import LoraConfig, get_peft_model

    if lora.r < 1:
        raise ValueError(f"apply_lora needs lora.r >= 1, got {lora.r}")
    target_modules = lora.target_modules
    if target_modules == ["all-linear"]:
        target_modules = "all-linear"  # peft's keyword is a plain string, not a module name
    else:
        check_target_modules(model, target_modules)
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
    )
    with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecated; nothing for users to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def check_target_modules(model: Any, target_modules: list[str]) -> None:
    """Every name in lora.target_modules matches a module of `model`, as peft matches a list (the whole module name
    or its last dotted parts). peft refuses a list where nothing matches, but adapts the rest silently when one name
    of several (a typo) matches nothing: the run would train fewer layers than the config says."""
    module_names = [name for name, _ in model.named_modules() if name]
    unmatched = [
        target
        for target in target_modules
        if not any(name == target or name.endswith(f".{target}") for name in module_names)
    ]
    if unmatched:
        linear_names = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"config field lora.target_modules: {', '.join(map(repr, unmatched))} "
            f"match{'es' if len(unmatched) == 1 else ''} no module of the model; its linear layers are "
            f"{', '.join(linear_names)} (or give 'all-linear')"
        )


def uses_lora(model: Any) -> bool:
    """True for a `peft` PeftModel (a model with adapters)."""
    peft = sys.modules.get("peft")  # nothing can be a PeftModel before peft is imported; spare the import
    return peft is not None and isinstance(model, peft.PeftModel)


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[Any]:
    """Inside the block `model` computes its base model's outputs exactly (every adapter bypassed)."""
    if not uses_lora(model):
        raise ValueError("adapters_disabled needs a model with LoRA adapters (see apply_lora)")
    with model.disable_adapter():
        yield model


def save_policy(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    mode: Literal["merged", "adapter"] = "merged",
    *,
    base_path: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> Path:
    """Save a LoRA policy atomically (a temporary folder, then a rename), as `checkpoint.save_model` does.

    `merged`: an ordinary `save_pretrained` model (loads with AutoModelForCausalLM) whose adapted weights
    are W + (alpha / r) * B @ A. The merge is built beside the live model, never in it: merging in place
    (`merge_and_unload`) would change the policy mid-training and break the disabled-adapter reference,
    and unmerging is not exact in floating point; a deepcopy would cost a whole second model. The cost
    here is one transient copy of the adapted weights, freed once written.

    `adapter`: adapter_config.json + adapter weights + the tokenizer; loads with
    `PeftModel.from_pretrained(base, path)` or `AutoPeftModelForCausalLM.from_pretrained(path)`. The
    config's `base_model_name_or_path` is `base_path` (default: the folder the base was loaded from),
    made absolute when it is a local folder so the adapter loads from any working directory.

    `state_dict`: the model's state dict gathered from its shards (FSDP), used instead of its tensors (for
    `adapter`, the adapters' alone suffice). `overwrite`: an existing `path` is replaced only when it is a model
    folder grpokit wrote and this is set. `max_shard_size`: the merged model's largest file (`save_model`).
    """
    if not uses_lora(model):
        raise ValueError("save_policy needs a model with LoRA adapters; use grpokit.runtime.checkpoint.save_model")
    if mode == "merged":
        merged = merged_state_dict(model, state_dict)
        base = model.get_base_model()
        return save_model(base, tokenizer, path, state_dict=merged, overwrite=overwrite, max_shard_size=max_shard_size)
    if mode != "adapter":
        raise ValueError(f"save mode {mode!r}: use 'merged' or 'adapter'")
    peft_config = model.peft_config[model.active_adapter]
    base = base_path or peft_config.base_model_name_or_path
    if base and Path(base).is_dir():
        base = str(Path(base).resolve())
    saved_base, peft_config.base_model_name_or_path = peft_config.base_model_name_or_path, base
    try:
        with atomic_folder(path, kind="model", overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    finally:
        peft_config.base_model_name_or_path = saved_base
    return Path(path)


@torch.no_grad()
def merged_state_dict(model: Any, gathered: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict, under its original names, with every active adapter folded in.

    Tensors of layers without adapters are the live ones (shared, not copied); each adapted weight is
    a new tensor W + delta. The live model is not modified. `gathered`: the PEFT model's whole state dict
    (FSDP's shards gathered), whose tensors are used instead of the module's: W + scaling * B @ A.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    prefix = "base_model.model."  # where a PeftModel's state dict keeps the base model's names
    source = base.state_dict() if gathered is None else {k.removeprefix(prefix): v for k, v in gathered.items()}
    state = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in source.items()
        if ".lora_" not in name  # lora_A / lora_B / lora_dropout ... : the adapters themselves
    }
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        if gathered is None:
            merged = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    merged += module.get_delta_weight(adapter).to(merged.dtype)
        else:
            merged = _add_adapters(source[f"{name}.base_layer.weight"].clone(), name, module, source.__getitem__)
        state[f"{name}.weight"] = merged
    return state


def merged_sources(model: Any, dropped: set[str]) -> list[WeightSource]:
    """`merged_state_dict`'s tensors, in its order, each made only when written (`weight_files.write_weight_files`):
    under FSDP one adapted weight is gathered with its adapters and merged at a time, W + scaling * B @ A, as
    `merged_state_dict` merges gathered pieces; an unadapted tensor is gathered as it is. `dropped`: the base model's
    state-dict names not to write (the second name of a tied weight)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = base.state_dict()  # under FSDP each rank's shards: nothing gathered yet
    adapted = {
        f"{name}.base_layer.weight": (name, module)
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and not module.merged
    }
    sources = []
    for key, tensor in state.items():
        if ".lora_" in key or key in dropped:  # lora_A / lora_B / ...: the adapters themselves
            continue
        source = tensor_source(key.replace(".base_layer.", "."), tensor)
        if key in adapted:
            source = dataclasses.replace(source, produce=_merged_weight(state, *adapted[key]))
        sources.append(source)
    return sources


def _merged_weight(state: dict[str, torch.Tensor], name: str, module: Any) -> Any:
    @torch.no_grad()
    def produce() -> torch.Tensor:
        weight = state[f"{name}.base_layer.weight"]
        merged = full(weight).detach()
        merged = merged if hasattr(weight, "full_tensor") else merged.clone()  # a plain tensor is the live weight
        return _add_adapters(merged, name, module, lambda key: full(state[key]))  # (B and A gathered in turn)

    return produce


def _add_adapters(merged: torch.Tensor, name: str, module: Any, piece: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """`merged` (the whole base weight of the LoRA layer `module`, at `name`) plus scaling * B @ A of each active
    adapter, in place, with B and A whole from `piece(state-dict name)`: the one merge of gathered pieces, for
    `merged_state_dict` and `merged_sources`."""
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            delta = piece(f"{name}.lora_B.{adapter}.weight") @ piece(f"{name}.lora_A.{adapter}.weight")
            delta = delta.T if module.fan_in_fan_out else delta
            merged += (delta * module.scaling[adapter]).to(merged.dtype)
    return merged


@torch.no_grad()
def sync_reference(ref_model: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, in place, parameter by parameter.

    The periodic reference update of TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for
    Real Good Alignment"), applied here to the GRPO KL reference. Buffers (e.g. RoPE tables) are not
    weights and stay as they are.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sync_reference: alpha must be in [0, 1], got {alpha}")
    policy_params = dict(policy.named_parameters())
    ref_params = dict(ref_model.named_parameters())
    if policy_params.keys() != ref_params.keys():
        missing = sorted(policy_params.keys() ^ ref_params.keys())[:3]
        raise ValueError(f"sync_reference: the reference and the policy have different parameters, e.g. {missing}")
    for name, ref in ref_params.items():
        ref.lerp_(policy_params[name].to(ref.dtype), alpha)  # ref + alpha * (policy - ref)
