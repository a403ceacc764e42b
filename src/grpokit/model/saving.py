"""Saving a `Policy` and resuming it: the final model folder, checkpoint-STEP folders, FSDP shards.

A checkpoint holds the weights in `save_pretrained` form (with LoRA the adapter alone; under FSDP
torch.distributed.checkpoint's shards instead), AdamW and the schedule, every RNG (each rank's too) and what the
stage adds (its data position, monitors...). `resume_policy` undoes `write_policy_checkpoint` bit for bit, so a
resumed run takes the steps the uninterrupted one would have. The folder's life (whole or absent, kept or pruned,
the run's record) is `checkpoint.RunDirectory`'s; what goes in it is this module's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from grpokit.model.loading import ModelFolderError, check_safetensors
from grpokit.model.lora import save_policy, uses_lora
from grpokit.model.policy import Policy
from grpokit.runtime.checkpoint import (
    RunDirectory,
    RunDirectoryError,
    load_state,
    rng_state,
    save_model,
    save_state,
    set_rng_state,
)

SHARDS = "shards"  # in a checkpoint folder under FSDP: torch.distributed.checkpoint's files


def save_trained(
    policy: Policy, path: str | Path, tokenizer: Any, *, lora_form: str = "merged", overwrite: bool = False
) -> Path:
    """The policy's model in `save_pretrained` form; with LoRA merged into the weights or as the adapter alone.
    Rank 0 writes it; every rank returns the folder once it is whole. An existing `path` is replaced only when it
    is a model folder grpokit wrote and `overwrite` is set (`checkpoint.save_model`)."""
    policy.check_finite(f"so {path} was not written")
    gathered = None  # under FSDP the whole state dict, on rank 0 (every rank takes part)
    if policy.fsdp_roots:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        gathered = get_model_state_dict(policy.model, options=options)
        # a tied weight comes back once per name, as copies that save_pretrained would both write
        first: dict[int, str] = {}
        for name, param in policy.model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                gathered.pop(name, None)
    folder = None
    if policy.cluster.is_main and uses_lora(policy.model):
        folder = save_policy(policy.model, tokenizer, path, lora_form, state_dict=gathered, overwrite=overwrite)
    elif policy.cluster.is_main:
        folder = save_model(policy.model, tokenizer, path, state_dict=gathered, overwrite=overwrite)
    return Path(policy.cluster.broadcast(folder and str(folder)))


def write_policy_checkpoint(
    policy: Policy,
    run: RunDirectory,
    step: int,
    tokenizer: Any,
    stage_state: dict[str, Any],
    *,
    beside: dict[str, Policy] | None = None,
    **generators: torch.Generator,
) -> Path:
    """checkpoint-STEP of a stage: the weights (`_save_weights`), AdamW and the schedule (`training_state`), every
    RNG (with the stage's own `generators`; each rank's own under `rank_rng`) and `stage_state` (its data position,
    monitors, ...). Rank 0 writes it (every rank holds the same weights); every rank returns its folder once it is
    whole. `beside`: the stage's other trained policies (PPO's critic) by folder name: under FSDP each one's shards
    go into that folder of the checkpoint, beside the policy's (otherwise `stage_state` holds them)."""
    policy.check_finite("so the checkpoint was not written")
    cluster = policy.cluster
    ranks_rng = cluster.gather_objects([rng_state()])  # rank r's RNGs at [r]
    state = {"step": step, "policy": training_state(policy), "rng": rng_state(**generators), **stage_state}

    def write_shards(folder: Path) -> None:
        _save_shards(policy, folder / SHARDS)
        for name, other in (beside or {}).items():
            _save_shards(other, folder / name)

    def write(folder: Path) -> None:
        if policy.fsdp_roots:  # every rank writes its shards into the folder rank 0 is filling
            write_shards(Path(cluster.broadcast(str(folder))))
            tokenizer.save_pretrained(folder)
        else:
            _save_weights(policy, folder, tokenizer)
        save_state(folder, {**state, "rank_rng": ranks_rng})

    folder = None
    if cluster.is_main:
        folder = run.save_checkpoint(step, write)
    elif policy.fsdp_roots:
        write_shards(Path(cluster.broadcast(None)))
    return Path(cluster.broadcast(folder and str(folder)))  # whole: marked and in place


def resume_policy(
    policy: Policy, folder: Path, *, beside: dict[str, Policy] | None = None, **generators: torch.Generator
) -> dict[str, Any]:
    """Undo `write_policy_checkpoint`: weights, optimizer, schedule and RNGs restored; returns the stage's state (with
    its `step`). `beside`: the stage's other policies, whose shards (a checkpoint written under FSDP) are loaded from
    their folders; the stage restores them from its state otherwise."""
    state = load_state(folder)
    for name, other in (beside or {}).items():
        if (folder / name).is_dir():
            _load_shards(other, folder / name)
    if (folder / SHARDS).is_dir():  # FSDP's: any number of ranks, one process too
        _load_shards(policy, folder / SHARDS)
    elif policy.fsdp_roots:
        raise RunDirectoryError(
            f"checkpoint {folder} was written without `distributed: fsdp`: resume it under ddp or in one process"
        )
    else:
        try:
            for weights in folder.glob("*.safetensors"):
                check_safetensors(weights)
        except ModelFolderError as err:
            raise RunDirectoryError(f"checkpoint {folder}: {err}; resume from an earlier checkpoint") from None
        _load_weights(policy, folder)
    load_training_state(policy, state["policy"])
    set_rng_state(state["rng"], **generators)
    rank = policy.cluster.rank
    if rank < len(state.get("rank_rng", [])):  # a rank new to a larger world keeps its seeded RNGs
        set_rng_state(state["rank_rng"][rank])
    return state


def training_state(policy: Policy) -> dict[str, Any]:
    """Everything but the weights (`_save_weights`): AdamW, the schedule, and a synced reference (an unsynced one is
    the initial model, which a resumed run loads again). Under FSDP AdamW and the reference are in the shards
    (`_save_shards`)."""
    if policy.fsdp_roots:
        return {"scheduler": policy.scheduler.state_dict()}
    state = {"optimizer": policy.optimizer.state_dict(), "scheduler": policy.scheduler.state_dict()}
    if policy.ref_model is not None and policy.reference_synced:
        state["reference"] = {k: v.detach().clone() for k, v in policy.ref_model.state_dict().items()}
    return state


def load_training_state(policy: Policy, state: dict[str, Any]) -> None:
    """Undo `training_state`."""
    if "optimizer" in state:  # else in the shards, loaded already
        policy.optimizer.load_state_dict(state["optimizer"])
    policy.scheduler.load_state_dict(state["scheduler"])
    if policy.ref_model is not None and "reference" in state:
        policy.ref_model.load_state_dict(state["reference"])
        policy.reference_synced = True


def _save_weights(policy: Policy, folder: Path, tokenizer: Any) -> None:
    """Into an open checkpoint folder: the model in `save_pretrained` form (with LoRA the adapter), which loads back
    exactly (float32) and also serves anyone who wants that step's model. `write_policy_checkpoint`, its caller, has
    checked the weights are finite."""
    if uses_lora(policy.model):
        policy.model.save_pretrained(folder, safe_serialization=True)
    else:
        # one file, so `_load_weights` reads it whole
        policy.model.save_pretrained(folder, safe_serialization=True, max_shard_size="1000GB")
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def _load_weights(policy: Policy, folder: Path) -> None:
    """The trained weights from a checkpoint folder written by `_save_weights`, bit for bit."""
    from safetensors.torch import load_file

    if uses_lora(policy.model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, load_file(folder / "adapter_model.safetensors"))
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing:
            raise ValueError(f"{folder}: the adapter lacks {missing[:3]}: was it written by another LoRA config?")
        return
    saved = load_file(folder / "model.safetensors")
    params = dict(policy.model.named_parameters())  # tied weights appear once, under the name saved
    missing = sorted(set(params) - set(saved))
    if missing:
        raise ValueError(f"{folder}: model.safetensors lacks {missing[:3]}: was it written for another model?")
    for name, param in params.items():
        param.copy_(saved[name])


def _save_shards(policy: Policy, path: Path) -> None:
    """torch.distributed.checkpoint: this rank's shards of the trained weights (with LoRA the adapters), of AdamW's
    state and of a synced reference, under names that do not depend on the world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model, optimizer = get_state_dict(policy.model, policy.optimizer, options=options)
    state = {"model": model, "optimizer": optimizer}
    if policy.ref_model is not None and policy.reference_synced:
        state["reference"] = get_model_state_dict(policy.ref_model)
    dcp.save(state, checkpoint_id=path)


def _load_shards(policy: Policy, path: Path) -> None:
    """Undo `_save_shards` on any number of ranks, sharded or not (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    model, optimizer = get_state_dict(policy.model, policy.optimizer, options=options)
    state = {"model": model, "optimizer": optimizer}
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    synced = policy.ref_model is not None and any(key.startswith("reference.") for key in saved)
    if synced:
        state["reference"] = get_model_state_dict(policy.ref_model)
    with warnings.catch_warnings():  # one process reading every rank's shards is what is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=not policy.cluster.active)
    # not strict: the state holds the trained weights alone (a LoRA model's frozen base is not in it), each of which
    # dcp.load filled or refused
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(policy.model, policy.optimizer, model_state_dict=model, optim_state_dict=optimizer, options=options)
    if synced:
        set_model_state_dict(policy.ref_model, state["reference"])
        policy.reference_synced = True
