"""A model's weights on disk in `save_pretrained`'s form: one `model.safetensors`, or shards
`model-0000K-of-0000N.safetensors` that `model.safetensors.index.json` names; written tensor by tensor (under FSDP
rank 0 never holds the whole model, `write_weight_files`) and read back one file at a time (`read_weight_files`).

The layout is transformers' (huggingface_hub's `split_torch_state_dict_into_shards`): the tensors in state-dict order,
a new shard when the next tensor would take the current one past `max_shard_size`, a tensor larger than that alone in
a shard of its own; tied weights once; every file's metadata {"format": "pt"}; the index's metadata the parameter
count and the bytes of tensors. `AutoModelForCausalLM.from_pretrained` reads either form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from grpokit.runtime.distributed import full

MAX_SHARD_SIZE = "5GB"  # the config's default (`max_shard_size`); transformers 5's save_pretrained says 50GB
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # as huggingface_hub reads a size: powers of 1000
SIZE_TEXT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]B)", re.IGNORECASE)


def shard_size_bytes(size: str | int) -> int:
    """`5GB` -> 5_000_000_000: a number and one of the units KB, MB, GB, TB (powers of 1000, as `save_pretrained`
    reads them), or a whole number of bytes; at least 1 byte. ValueError, saying what is accepted, otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        found = size
    else:
        match = SIZE_TEXT.fullmatch(str(size).strip())
        found = int(float(match[1]) * SIZE_UNITS[match[2].upper()]) if match else 0
    if found < 1:
        raise ValueError(f"{size!r} is not a size: give a number and a unit, e.g. 5GB or 500MB (KB, MB, GB, TB)")
    return found


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """The names of each shard file, in order, for tensors of (name, bytes) in state-dict order: a shard takes the
    next tensor while it stays within `limit` bytes; a tensor larger than `limit` is a shard of its own (where it
    falls, as huggingface_hub places it). An empty list of tensors is one empty file."""
    shards: list[list[str]] = []
    current: list[str] = []
    held = 0
    for name, size in sizes:
        if size > limit:
            shards.append([name])
            continue
        if current and held + size > limit:
            shards.append(current)
            current, held = [], 0
        current.append(name)
        held += size
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """`model.safetensors` alone, or model-00001-of-0000N.safetensors ..."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


@dataclass(frozen=True)
class WeightSource:
    """One tensor to write: its name on disk, its size in bytes (known before anything is gathered), and `produce`,
    which returns its whole value. Under FSDP `produce` is a collective (it gathers the shards): every rank calls the
    sources' `produce` in the same order, and only the writing rank keeps what they return."""

    name: str
    nbytes: int
    produce: Callable[[], torch.Tensor]


def tensor_source(name: str, tensor: torch.Tensor) -> WeightSource:
    """`tensor` written under `name`: its whole value (a DTensor's gathered, a collective; a plain tensor as it is)."""
    return WeightSource(name, tensor.numel() * tensor.element_size(), lambda: full(tensor).detach())


@dataclass(frozen=True)
class WrittenWeights:
    """What `write_weight_files` wrote: the files in order, the bytes of tensors in all of them, and the most bytes of
    tensors the writer held at once (at most one shard's worth, or the one tensor larger than a shard)."""

    files: list[str]
    total_size: int
    largest_held: int


def write_weight_files(
    folder: Path | None, sources: list[WeightSource], max_shard_size: str | int, *, total_parameters: int
) -> WrittenWeights:
    """The sources as `save_pretrained` writes weights, into `folder` (the writing rank; None on the other ranks,
    which take part in every gather and write nothing). Each shard file is written as soon as its last tensor is
    produced and then let go; the index, when there are several, comes last. `total_parameters` goes in the index
    (save_pretrained's `num_parameters()`)."""
    from safetensors.torch import save_file

    plan = plan_shards([(s.name, s.nbytes) for s in sources], shard_size_bytes(max_shard_size))
    names = shard_file_names(len(plan))
    by_name = {s.name: s for s in sources}
    largest = 0
    for file, shard in zip(names, plan):
        held: dict[str, torch.Tensor] = {}
        held_bytes = 0
        for name in shard:
            tensor = by_name[name].produce()
            if folder is not None:
                held[name] = tensor.detach().to("cpu").contiguous()
                held_bytes += held[name].nbytes
                largest = max(largest, held_bytes)
            del tensor
        if folder is not None:
            save_file(held, str(folder / file), metadata={"format": "pt"})
        del held
    total = sum(s.nbytes for s in sources)
    if folder is not None and len(names) > 1:
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": total},
            "weight_map": {name: file for file, shard in zip(names, plan) for name in shard},
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return WrittenWeights(names, total, largest)


# safetensors' names of torch's dtypes (its format's `dtype` field)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def write_streamed_file(out: BinaryIO | None, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """`tensors` as one safetensors file written to `out` (the writing rank; None on the others, which take part in
    every gather and write nothing), holding one whole tensor at a time: every tensor's dtype and shape (a
    DTensor's are the whole one's) are known before any is gathered, so the header goes first, then each tensor's
    bytes as it is gathered (`full`, a collective), in order. The file is what safetensors' `save_file` writes,
    but for the order of the tensors. Returns the most bytes of tensor held at once (the largest tensor)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads its header
    if out is not None:
        out.write(len(text).to_bytes(8, "little") + text)
    largest = 0
    for _, tensor in tensors:
        whole = full(tensor).detach()
        if out is not None:
            data = whole.to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (little-endian, as the format's)
            out.write(data.numpy().data)  # (no copy)
            largest = max(largest, data.numel())
        del whole
    return largest


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a folder written by `save_pretrained`: the shards its index names, in order,
    or `model.safetensors`; [] when it has neither. FileNotFoundError naming the file when the index names a
    shard that is not there, or is not an index."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return [folder / WEIGHTS_NAME] if (folder / WEIGHTS_NAME).is_file() else []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        listed = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FileNotFoundError(
            f"{index} is not a weights index (JSON with a `weight_map` of tensor -> file)"
        ) from None
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists {missing[0]}, which is missing ({len(missing)} missing)")
    return [folder / name for name in sorted(listed)]


def read_weight_files(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in `folder` (`weight_files`), one tensor at a time: no file is read whole."""
    from safetensors import safe_open

    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                yield name, f.get_tensor(name)
