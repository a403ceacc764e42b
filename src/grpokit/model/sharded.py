"""Starting under FSDP (`distributed: fsdp`) without the whole model on any rank.

The model is built from its folder's config.json on the meta device (shapes, no memory), with LoRA's adapters
when configured, sharded as `distributed.shard` shards any model, and only then allocated: each rank reads its
own rows of every tensor from the folder's safetensors files (`model.safetensors`, or an index and its shards).
FSDP2 splits each parameter on dim 0 as torch.chunk does; torch.distributed.checkpoint's HuggingFaceStorageReader
reads exactly those rows (safetensors' `get_slice`), cast to the parameter's float32. Each rank thus holds 1/W
of the weights plus one tensor's rows in flight, and the KL reference is read the same way, never copied.

A run started so equals one process: the weights are the file's; the buffers a file does not hold (the rotary
frequencies) are computed as transformers' own load computes them; the LoRA adapters take the values one process
draws (they are drawn from the global RNG, on the CPU, as `apply_lora` draws them, before the sharding).

What cannot start so loads whole on every rank and is sharded after (`training_model` says why, once, on rank
0): a `.gguf` file (de-quantized as it loads), a LoRA adapter folder (merged into its base as it loads), a model
object handed in, a hub id not in the local cache, a folder without safetensors weights, a model type whose
tensors transformers converts as it loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from grpokit.model.loading import (
    check_model_source,
    is_hub_id,
    load_model,
    mismatched_tensors_error,
    missing_tensors_error,
    unexpected_tensors_error,
)
from grpokit.model.lora import LoRASpec, apply_lora
from grpokit.runtime.distributed import Cluster, shard_of
from grpokit.runtime.weight_files import INDEX_NAME, WEIGHTS_NAME, weight_files


def training_model(model: Any, path: Any, device: Any, cluster: Cluster, *, field: str = "model") -> torch.nn.Module:
    """The model a stage trains: `model` handed in, else the one at `path` (`load_model`, float32). Under FSDP
    (`cluster.sharded`) a folder with safetensors weights gives a model on the meta device instead (`meta_model`),
    whose weights each rank reads shard by shard when `Policy` shards it; anything else (on any rank) loads whole on
    every rank, and rank 0 prints one line saying why."""
    if not cluster.sharded:
        return model if model is not None else load_model(path, device, torch.float32, field=field)
    if model is not None:
        folder, why = None, "the model was handed in as an object (give its folder to read it shard by shard)"
    else:
        folder, why = sharded_source(path, field=field)
    meta = None
    if folder is not None:
        meta = meta_model(folder, field=field, name=path)
        why = unfit_buffers(meta)
    # every rank starts the same way (the sharded fill is collective): one that cannot read its shards (another
    # node's hub cache, say) makes all load whole
    whole = [(rank, reason) for rank, reason in enumerate(cluster.gather_objects([why])) if reason]
    if not whole:
        return meta
    if cluster.is_main:
        rank, reason = whole[0]
        said = reason if rank == 0 else f"rank {rank}: {reason}"
        print(f"grpokit: distributed fsdp: every rank loads the whole model, then shards it: {said}", file=sys.stderr,
              flush=True)  # fmt: skip
    return model if model is not None else load_model(path, device, torch.float32, field=field)


def sharded_source(path: Any, *, field: str = "model") -> tuple[Path | None, str]:
    """(the folder whose safetensors files each rank can read its shards from, "") or (None, why not). A hub id is
    its snapshot in the local hub cache (no download here: one not there loads whole, as before). The folder is
    checked as every model source is (`check_model_source`), so what is missing or damaged is named first."""
    folder = local_folder(path)
    if folder is None:
        return None, f"{path} is not in the local hub cache (`hf download {path}` first to read it shard by shard)"
    if is_hub_id(path) and not (folder / "config.json").is_file():
        return None, f"{path} is only partly in the local hub cache (no config.json)"
    check_model_source(folder, field=field, tokenizer=False)
    if folder.is_file():
        return None, f"{path} is a {folder.suffix} file, de-quantized whole as it loads"
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        return None, f"{path} is a LoRA adapter folder, merged into its base model as it loads"
    files = weight_files(folder)
    if not files:
        return None, f"{path} holds no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME} can be read shard by shard)"
    others = sorted(n for n in names if n.endswith(".safetensors") and n not in {f.name for f in files})
    if others:
        return None, f"{path} holds safetensors files its weights do not list ({others[0]})"
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    spec = json.loads((folder / "config.json").read_text())
    kinds = [spec.get("model_type"), *(spec.get("architectures") or ())]
    if any(get_checkpoint_conversion_mapping(kind) for kind in kinds if kind):
        return None, f"transformers converts the tensors of {path} (model_type {spec.get('model_type')}) as it loads"
    return folder, ""


def local_folder(path: Any) -> Path | None:
    """A model's local folder: `path` itself, or a hub id's snapshot in the local hub cache (None: not there)."""
    if not is_hub_id(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # huggingface_hub's "not in the cache" errors differ between its versions
        return None


def file_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor in a folder's weights: name -> (shape, safetensors dtype name), from the files' headers alone."""
    from safetensors import safe_open

    out = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # (a safetensors handle is not iterable)
            for name in names:
                part = f.get_slice(name)
                out[name] = (tuple(part.get_shape()), part.get_dtype())
    return out


def meta_model(
    folder: Path, *, field: str = "model", name: Any = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """AutoModelForCausalLM built from `folder`'s config.json on the meta device, in `dtype`; its parameters and
    persistent buffers checked against the folder's tensors (none missing, none of another shape, none without a
    place: `load_pretrained`'s checks) before any weight is read. Its `name_or_path` is `name` (default: `folder`),
    as `from_pretrained` records the name it was given (a saved LoRA adapter names it as its base);
    `weights_folder` finds the folder from it once the model is sharded and allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # what from_pretrained also sets: the name it was given, the folder's generation config, eval mode, and no
    # weight conversions (`sharded_source` refuses models with any), which save_pretrained reads to write the tensors
    # in name order: without it the final model's shards would be cut otherwise than one process cuts them
    model.config._name_or_path = model.name_or_path = str(name or folder)
    model._weight_conversions = []
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    check_file_tensors(model, file_tensors(folder), f"config field `{field}`: the weights in {folder}")
    return model


def weights_folder(model: torch.nn.Module) -> Path | None:
    """The folder a model built on the meta device (`meta_model`) reads its weights from; None for a model that
    holds its weights."""
    if not any(p.is_meta for p in model.parameters()):
        return None
    name = getattr(model.config, "_name_or_path", "") if hasattr(model, "config") else ""
    folder = local_folder(name) if name else None
    if folder is None or not weight_files(folder):
        raise ValueError(f"{type(model).__name__} is on the meta device and names no folder of weights ({name!r})")
    return folder


def unfit_buffers(model: torch.nn.Module) -> str:
    """Why `fill_from_folder` could not compute `model`'s buffers that no file holds, or "" (it can when the
    modules holding them hold no weights, as a rotary embedding holds none)."""
    unfit = [name for name, module in buffer_owners(model) if next(module.parameters(recurse=False), None) is not None]
    if unfit:
        return f"{type(model).__name__} computes a buffer in a module that holds weights ({unfit[0]})"
    return ""


def check_file_tensors(model: torch.nn.Module, saved: dict[str, tuple[tuple[int, ...], str]], what: str) -> None:
    """`model`'s tensors against the file's (`file_tensors`), refused as `load_pretrained` refuses them: a tensor
    the model needs and the files lack, one of another shape, one the model has no place for (a tied weight's
    second name may be saved or not; old checkpoints' rotary tables are ignored, as transformers ignores them)."""
    wanted = dict(stored_tensors(model))
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(wanted)
    name = type(model).__name__
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise missing_tensors_error(what, name, missing)
    mismatched = [(k, saved[k][0], tuple(wanted[k].shape)) for k in sorted(wanted) if saved[k][0] != wanted[k].shape]
    if mismatched:
        raise mismatched_tensors_error(what, mismatched)
    unexpected = sorted(k for k in set(saved) - set(wanted) - aliases if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise unexpected_tensors_error(what, name, unexpected)


def stored_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What a file holds of `model`, under the file's names: each parameter once (a tied weight under its first
    name) and each persistent buffer. A LoRA model's base weights under the base model's names; its adapters,
    which no file holds, left out."""
    persistent = set(model.state_dict(keep_vars=True))
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]
    for name, tensor in tensors:
        if ".lora_" not in name:
            yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), tensor


def buffer_owners(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules holding a buffer that no file holds (non-persistent: computed from the config, as the rotary
    frequencies are), by name."""
    persistent = set(model.state_dict(keep_vars=True))
    names = {name.rpartition(".")[0] for name, _ in model.named_buffers() if name not in persistent}
    return [(name, model.get_submodule(name)) for name in sorted(names)]


def lora_on_meta(model: torch.nn.Module, lora: LoRASpec) -> tuple[Any, dict[str, torch.Tensor]]:
    """`apply_lora` on a model on the meta device -> (the peft model, each adapter's initial value by name). peft
    draws the adapters on the CPU from the global RNG exactly as over a model holding weights, then moves them to
    the base layer's device (meta), which keeps no values; the parameters it registers are recorded here, so the
    values drawn survive the move."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    registered: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    handle = register_module_parameter_registration_hook(
        lambda module, name, param: registered.append((module, name, param)) if param is not None else None
    )
    try:
        model = apply_lora(model, lora)
    finally:
        handle.remove()
    drawn = {(id(module), name): param for module, name, param in registered if not param.is_meta}
    values = {}
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if ".lora_" in f".{prefix}" and (id(module), name) in drawn:
                values[f"{prefix}.{name}"] = drawn[id(module), name].detach()
    lost = [name for name, p in model.named_parameters() if p.requires_grad and name not in values]
    if lost:
        raise RuntimeError(
            f"lora_on_meta: peft kept no initial value of {lost[0]} ({len(lost)} adapter tensors): a sharded start "
            "with LoRA cannot equal one process with this peft; launch with `distributed: ddp`"
        )
    return model, values


@torch.no_grad()
def fill_from_folder(model: torch.nn.Module, folder: Path, *, values: dict[str, torch.Tensor] | None = None) -> int:
    """Once `model` (`meta_model`, with LoRA perhaps, sharded) is allocated: this rank's rows of every parameter
    and every persistent buffer read from `folder`'s safetensors files; the tensors named in `values` (LoRA's
    initial adapters, whole) cut to this rank's rows; the buffers no file holds computed as transformers' own
    loading computes them. Returns the bytes this rank read from the files (about 1/W of them)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    values = values or {}
    for name, tensor in model.named_parameters():
        if name in values:
            shard_of(tensor).copy_(own_rows(values[name], tensor))
    targets = dict(stored_tensors(model))
    reader = slice_reader(folder)
    dcp.load(targets, storage_reader=reader, no_dist=not dist.is_initialized())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for _, module in buffer_owners(base):
        # transformers' own step after a meta-device load (`from_pretrained`): the module's init, which for the
        # rotary embedding computes its frequencies from the config (`unfit_buffers`: these modules hold no weights)
        base._init_weights(module)
    return reader.bytes_read


def own_rows(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `whole` as FSDP2 shards `param` (dim 0, torch.chunk's split over the mesh)."""
    local = shard_of(param)
    if local is param:
        return whole
    mesh = param.device_mesh
    per_rank = math.ceil(whole.shape[0] / mesh.size())
    start = min(mesh.get_local_rank() * per_rank, whole.shape[0])
    rows = whole[start : start + local.shape[0]]
    if rows.shape != local.shape:
        raise RuntimeError(f"own_rows: {tuple(local.shape)} held here, {tuple(rows.shape)} cut from the whole")
    return rows


def slice_reader(path: Path) -> Any:
    """torch.distributed.checkpoint's reader of a Hugging Face safetensors folder, counting the bytes it reads
    (`bytes_read`): each read is the slice of one tensor that this rank holds (`get_slice`), never the whole tensor.
    One slice per opening of its file: safetensors maps the file, and every page a read touches stays in the
    process's resident memory until the file is closed, so the library's one opening per file would leave a rank
    holding all its slices twice (its shards, and the mapped pages they came from) by the end of the file."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    class SliceReader(HuggingFaceStorageReader):
        bytes_read = 0

        def read_data(self, plan, planner):
            for item in plan.items:
                self.bytes_read += math.prod(item.lengths) * self.storage_data[item.storage_index].dtype.itemsize
                super().read_data(dataclasses.replace(plan, items=[item]), planner).wait()
            done: torch.futures.Future[None] = torch.futures.Future()
            done.set_result(None)
            return done

    return SliceReader(str(path))


def tensor_bytes(folder: Path) -> int:
    """The bytes of a folder's weights' tensors (its files less their headers)."""
    total = 0
    for path in weight_files(folder):
        with path.open("rb") as f:
            total += path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")
    return total


def say_sharded_load(cluster: Cluster, folder: Path, read: dict[str, int]) -> None:
    """Rank 0 prints what each rank read of each model (`read`: what -> this rank's bytes) from `folder`, as shares
    of the files' bytes (every rank calls: the counts are gathered)."""
    every = cluster.gather_objects([read])  # rank r's at [r]
    total = tensor_bytes(folder)
    if not cluster.is_main:
        return
    parts = []
    for what in read:
        shares = ", ".join(f"rank {r} {100 * counts[what] / total:.2f}%" for r, counts in enumerate(every))
        parts.append(f"the {what}: {shares}")
    print(f"grpokit: distributed fsdp: each rank read its own rows of {folder} ({total / 2**20:.1f} MiB): "
          f"{'; '.join(parts)}", file=sys.stderr, flush=True)  # fmt: skip
