"""Saving a `Policy` and resuming it: the final model folder, checkpoint-STEP folders, FSDP shards.

The final model and a checkpoint's weights are in `save_pretrained` form: one model.safetensors, or shards of at
most the run's `max_shard_size` and an index (`runtime.weight_files`); under FSDP the final model is written one
gathered tensor at a time, so rank 0 never holds the whole model. A checkpoint holds those weights (with LoRA the
adapter alone; under FSDP torch.distributed.checkpoint's shards instead), AdamW and the schedule, every RNG (each
rank's too) and what the stage adds (its data position, monitors...). `resume_policy` undoes
`write_policy_checkpoint` bit for bit, so a resumed run takes the steps the uninterrupted one would have. The
folder's life (whole or absent, kept or pruned, the run's record) is `checkpoint.RunDirectory`'s; what goes in it
is this module's.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from grpokit.model.loading import check_safetensors
from grpokit.model.lora import merged_sources, save_policy, uses_lora
from grpokit.model.policy import Policy
from grpokit.runtime.checkpoint import (
    RunDirectory,
    RunDirectoryError,
    atomic_folder,
    load_state,
    rng_state,
    save_model,
    save_state,
    set_rng_state,
)
from grpokit.runtime.distributed import full
from grpokit.runtime.weight_files import (
    MAX_SHARD_SIZE,
    WeightSource,
    read_weight_files,
    shard_size_bytes,
    tensor_source,
    weight_files,
    write_weight_files,
)

SHARDS = "shards"  # in a checkpoint folder under FSDP: torch.distributed.checkpoint's files


def save_trained(
    policy: Policy,
    path: str | Path,
    tokenizer: Any,
    *,
    lora_form: str = "merged",
    max_shard_size: str | int = MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """The policy's model in `save_pretrained` form; with LoRA merged into the weights or as the adapter alone; files
    of at most `max_shard_size` (a larger model in shards and an index). Rank 0 writes it; every rank returns the
    folder once it is whole. Under FSDP the weights are gathered one tensor at a time (`_save_streamed`): rank 0
    never holds the whole model. An existing `path` is replaced only when it is a model folder grpokit wrote and
    `overwrite` is set (`checkpoint.save_model`)."""
    policy.check_finite(f"so {path} was not written")
    lora = uses_lora(policy.model)
    if policy.fsdp_roots and not (lora and lora_form == "adapter"):
        return _save_streamed(policy, path, tokenizer, lora_form, max_shard_size, overwrite)
    gathered = None  # the adapter under FSDP: its weights alone gathered (every rank takes part), small
    if policy.fsdp_roots:
        gathered = {name: full(p).detach().cpu() for name, p in policy.model.named_parameters() if p.requires_grad}
    return _save_on_rank_0(policy, path, tokenizer, lora_form, gathered, max_shard_size, overwrite)


def _save_on_rank_0(
    policy: Policy,
    path: str | Path,
    tokenizer: Any,
    lora_form: str,
    state_dict: dict[str, torch.Tensor] | None,
    max_shard_size: str | int,
    overwrite: bool,
) -> Path:
    """save_pretrained's folder written by rank 0 (`lora.save_policy` with LoRA, else `checkpoint.save_model`), from
    `state_dict` when given (gathered from FSDP's shards) else the model's own tensors; every rank returns the
    folder once it is whole."""
    folder = None
    if policy.cluster.is_main and uses_lora(policy.model):
        folder = save_policy(
            policy.model, tokenizer, path, lora_form, state_dict=state_dict, overwrite=overwrite,
            max_shard_size=max_shard_size,
        )  # fmt: skip
    elif policy.cluster.is_main:
        folder = save_model(
            policy.model, tokenizer, path, state_dict=state_dict, overwrite=overwrite, max_shard_size=max_shard_size
        )
    return Path(policy.cluster.broadcast(folder and str(folder)))


def _save_streamed(
    policy: Policy, path: str | Path, tokenizer: Any, lora_form: str, max_shard_size: str | int, overwrite: bool
) -> Path:
    """`save_trained` under FSDP: every rank walks the tensors in save_pretrained's order and gathers each in turn
    (with LoRA merged module by module, `lora.merged_sources`); rank 0 keeps them until a shard file is full, writes
    it and lets it go (`weight_files.write_weight_files`), then the index; config.json and generation_config.json are
    save_pretrained's own, written with no weights. The folder's PROVENANCE records the files written and the most
    bytes of weights rank 0 held at once."""
    model = policy.model
    if uses_lora(model) and lora_form != "merged":
        raise ValueError(f"save mode {lora_form!r}: use 'merged' or 'adapter'")
    base = model.get_base_model() if uses_lora(model) else model
    dropped = _tied_names(base)
    if uses_lora(model):
        sources = merged_sources(model, dropped)
    else:
        state = model.state_dict()  # each rank's shards (DTensors): nothing gathered yet
        sources = [tensor_source(name, t) for name, t in state.items() if name not in dropped]
    sources = _as_saved(base, sources)
    if sources is None:
        return _save_gathered(policy, path, tokenizer, lora_form, max_shard_size, overwrite)
    if not policy.cluster.is_main:
        write_weight_files(None, sources, max_shard_size, total_parameters=0)
        return Path(policy.cluster.broadcast(None))
    notes: dict[str, Any] = {}
    with atomic_folder(path, kind="model", overwrite=overwrite, provenance=notes) as tmp:
        base.save_pretrained(tmp, safe_serialization=True, state_dict={})  # its config files, no weights
        written = write_weight_files(tmp, sources, max_shard_size, total_parameters=base.num_parameters())
        tokenizer.save_pretrained(tmp)
        notes["weights"] = {"written": "streamed from FSDP shards", "files": len(written.files),
                            "total_size": written.total_size, "largest_held": written.largest_held}  # fmt: skip
    return Path(policy.cluster.broadcast(str(path)))


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Every name of a tied weight but its first (save_pretrained writes a tied weight once, under that name)."""
    first: dict[int, str] = {}
    names = [(name, first.setdefault(id(p), name)) for name, p in model.named_parameters(remove_duplicate=False)]
    return {name for name, kept in names if name != kept}


def _as_saved(model: torch.nn.Module, sources: list[WeightSource]) -> list[WeightSource] | None:
    """The sources in the order and under the names save_pretrained writes them: transformers 5 passes the state
    dict through the model's weight conversions first (`revert_weight_conversion`), which sorts the names of a model
    loaded by from_pretrained and renames those of a few. Found on placeholders, without touching a weight. None
    when a conversion makes new tensors (a mixture of experts' fused experts, split on save): such a model is
    written from a whole gathered state dict instead (`_save_gathered`)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: written as named, in state-dict order
        return sources
    probe = {s.name: torch.empty(0, device="meta") for s in sources}
    of = {id(t): s for s, t in zip(sources, probe.values())}
    try:
        saved = revert_weight_conversion(model, probe)
    except Exception:  # a conversion that cannot even be planned on placeholders
        return None
    if len(saved) != len(sources) or {id(t) for t in saved.values()} != set(of):
        return None
    return [dataclasses.replace(of[id(t)], name=name) for name, t in saved.items()]


def _save_gathered(
    policy: Policy, path: str | Path, tokenizer: Any, lora_form: str, max_shard_size: str | int, overwrite: bool
) -> Path:
    """The whole state dict gathered on rank 0, then save_pretrained: for a model whose weights are converted as
    they are saved (`_as_saved`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if policy.cluster.is_main:
        warnings.warn(
            f"{type(policy.model).__name__}'s weights are converted as save_pretrained writes them, so rank 0 "
            f"gathers the whole model to write {path}",
            stacklevel=3,
        )
    gathered = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in _tied_names(policy.model):  # a tied weight comes back once per name: save_pretrained needs it once
        gathered.pop(name, None)
    return _save_on_rank_0(policy, path, tokenizer, lora_form, gathered, max_shard_size, overwrite)


def write_policy_checkpoint(
    policy: Policy,
    run: RunDirectory,
    step: int,
    tokenizer: Any,
    stage_state: dict[str, Any],
    *,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    beside: dict[str, Policy] | None = None,
    **generators: torch.Generator,
) -> Path:
    """checkpoint-STEP of a stage: the weights (`_save_weights`, in files of at most `max_shard_size`; under FSDP
    torch.distributed.checkpoint's shards), AdamW and the schedule (`training_state`), every RNG (with the stage's
    own `generators`; each rank's own under `rank_rng`) and `stage_state` (its data position, monitors, ...). Rank 0
    writes it (every rank holds the same weights); every rank returns its folder once it is whole. `beside`: the
    stage's other trained policies (PPO's critic) by folder name: under FSDP each one's shards go into that folder of
    the checkpoint, beside the policy's (otherwise `stage_state` holds them)."""
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
            _save_weights(policy, folder, tokenizer, max_shard_size)
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
            weight_files(folder)  # the shards its index names are there
            for weights in folder.glob("*.safetensors"):
                check_safetensors(weights)
        except FileNotFoundError as err:  # (a ModelFolderError too)
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


def _save_weights(policy: Policy, folder: Path, tokenizer: Any, max_shard_size: str | int) -> None:
    """Into an open checkpoint folder: the model in `save_pretrained` form (with LoRA the adapter; a model larger
    than `max_shard_size` in shards and an index), which loads back exactly (float32) and also serves anyone who
    wants that step's model. `write_policy_checkpoint`, its caller, has checked the weights are finite."""
    if uses_lora(policy.model):
        policy.model.save_pretrained(folder, safe_serialization=True)
    else:
        policy.model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size_bytes(max_shard_size))
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def _load_weights(policy: Policy, folder: Path) -> None:
    """The trained weights from a checkpoint folder written by `_save_weights`, bit for bit, read one tensor at a
    time (`weight_files.read_weight_files`: model.safetensors, or the shards its index names)."""
    from safetensors.torch import load_file

    if uses_lora(policy.model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, load_file(folder / "adapter_model.safetensors"))
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing:
            raise ValueError(f"{folder}: the adapter lacks {missing[:3]}: was it written by another LoRA config?")
        return
    params = dict(policy.model.named_parameters())  # tied weights appear once, under the name saved
    loaded = set()
    for name, tensor in read_weight_files(folder):
        if name in params:
            params[name].copy_(tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{folder}: its weights lack {missing[:3]}: were they written for another model?")


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
