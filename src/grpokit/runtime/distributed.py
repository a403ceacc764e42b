"""Several processes, one run: where this process stands in a `torchrun` launch and the few collectives the
GRPO loop needs.

`torchrun --nproc_per_node N grpokit train CONFIG.yaml` starts N copies of the same command; each reads its
rank and the world size from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and joins one `torch.distributed` process group: gloo on CPUs, NCCL on GPUs. In one process
(`python`, `grpokit train` without torchrun) the world size is 1 and every collective below is the identity,
so the loop has one code path.

The split of a step (DESIGN.md, "one optimizer step is one algorithm step"): every rank walks the same
seeded prompt order and takes its contiguous share of the step's prompts with all G completions of each,
so advantages are computed from the whole step's rewards (gathered: cheap) and every normalizer is counted
over the whole step. Each backward adds its rows' share of the step loss, and the gradients are summed
across ranks, so the step is the one a single process would take (to float rounding). Under `ddp` every
rank holds the whole model and the sum is one all-reduce per optimizer step, before clipping; under `fsdp`
(FSDP2, `fully_shard`) every decoder layer and the rest of the model are sharded over the ranks, gathered
layer by layer for each forward and backward (so every rank runs as many of them: `Policy.micro_batches`),
and gathered whole once per rollout (`full_weights`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

WORLD_ENV = "WORLD_SIZE"
MODES = ("ddp", "fsdp")


class DistributedError(ValueError):
    """A launch the run cannot split as asked (world size against the batch shape, a missing variable)."""


class LostRankError(RuntimeError):
    """A collective failed because a rank left the launch (killed, crashed, its node lost) or stopped answering for
    `ddp_timeout` seconds: this rank cannot go on alone."""


# What the gloo backend's errors say when a peer's connection closed or a collective timed out (they are plain
# RuntimeErrors; NCCL's are torch.distributed.DistError)
_GLOO_PEER_LOST = ("gloo/transport", "pair closure", "Connection closed by peer", "Connection reset by peer")


def launch_world_size() -> int:
    """The processes of this launch: torchrun's WORLD_SIZE, 1 without torchrun."""
    return int(os.environ.get(WORLD_ENV, "1"))


@dataclass
class Cluster:
    """This process's rank among `world_size` and the collectives of the loop; world size 1: the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "ddp"
    owns_group: bool = False  # this object initialised the process group, so `close` destroys it
    timeout_s: float = 1800.0  # how long a collective waits for the slowest rank before it fails (`ddp_timeout`)
    lost: str | None = None  # why the group broke (`lost_rank`): `close` then leaves it without a last barrier
    grouped: bool = False  # in a process group (a launch's, perhaps of one rank: FSDP over one)

    @classmethod
    def from_env(cls, mode: str = "ddp", *, prompts_per_step: int | None = None, timeout_s: float = 1800.0) -> Cluster:
        """The launch torchrun made (WORLD_SIZE > 1: join the process group), else a single process; checked
        against the step it must split (`share`) before any work. `timeout_s` bounds every collective's wait for a
        rank that stopped answering (a node lost without its connections closing): then the collective fails, not
        hangs (gloo's own default is 30 minutes)."""
        if mode not in MODES:
            raise DistributedError(f"config field `distributed`: unknown mode {mode!r}; expected one of {MODES}")
        world_size = int(os.environ.get(WORLD_ENV, "1"))
        import torch.distributed as dist

        # FSDP on one rank (`torchrun --nproc_per_node 1`, or a process group of one the caller made) shards over
        # a group of one, as accelerate's FSDP on one GPU does: the same code path as more ranks, nothing saved
        group_of_one = dist.is_initialized() and dist.get_world_size() == 1
        one_rank_fsdp = mode == "fsdp" and ("RANK" in os.environ or group_of_one)
        if world_size <= 1 and not one_rank_fsdp:
            return cls()
        if prompts_per_step is not None:
            cls(world_size=world_size).share(prompts_per_step)
        owns = not dist.is_initialized()
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and owns:
            raise DistributedError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with torchrun --nproc_per_node N"
            )
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if owns:
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, mode=mode, owns_group=owns,
                   timeout_s=timeout_s, grouped=True)  # fmt: skip

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, plots, completions, checkpoints and the final model."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """FSDP2: the weights, gradients and optimizer state are split over the ranks (over one: `from_env`)."""
        return self.grouped and self.mode == "fsdp"

    def device(self, name: str) -> torch.device:
        """The config's device for this rank: `auto` or `cuda` becomes this rank's own GPU (cuda:LOCAL_RANK)."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items (the step's prompts); n must split evenly over the ranks."""
        if n % self.world_size:
            raise DistributedError(
                f"config field `prompts_per_step` = {n} does not split over {self.world_size} ranks: make it a "
                "multiple of the world size (it counts the whole step over all ranks)"
            )
        per_rank = n // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    # ---------------------------------------------------------------- collectives
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (same shape on all) concatenated along dim 0, in rank order, on every rank."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        here = tensor.to(self._comm_device).contiguous()
        parts = [torch.empty_like(here) for _ in range(self.world_size)]
        dist.all_gather(parts, here)
        return torch.cat(parts).to(tensor.device)

    def gather_uneven(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values`, whose lengths may differ, concatenated in rank order, on every rank."""
        if not self.active:
            return values
        counts = self.gather(torch.tensor([values.numel()], device=values.device))  # (W,)
        padded = values.new_zeros(int(counts.max()))  # (most,)
        padded[: values.numel()] = values
        parts = self.gather(padded).reshape(self.world_size, -1)  # (W, most)
        return torch.cat([part[:n] for part, n in zip(parts, counts.tolist())])

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's list (picklable items: texts, rows) concatenated in rank order, on every rank."""
        if not self.active:
            return items
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, items)
        return [item for part in out for item in part]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks (float64, one all-reduce)."""
        return self._reduce(values, "sum")

    def max(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's maximum over the ranks."""
        return self._reduce(values, "max")

    def _reduce(self, values: dict[str, float], op: str) -> dict[str, float]:
        if not self.active or not values:
            return dict(values)
        import torch.distributed as dist

        flat = torch.tensor(list(values.values()), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return dict(zip(values, flat.tolist()))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Each parameter's gradient summed over the ranks, in place (a rank whose rows left a gradient unset
        adds zeros), in buckets of one flat tensor each: what DDP does, once per optimizer step."""
        if not self.active:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= GRADIENT_BUCKET or p is params[-1]:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
                bucket, size = [], 0

    def lost_rank(self, err: BaseException) -> str | None:
        """What happened, when `err` is a collective that failed because a rank left or stopped answering (and the
        group is then marked broken: see `close`); None for any other error."""
        import torch.distributed as dist

        # gloo raises a plain RuntimeError; a subclass is someone's own error (a reward or a vLLM server whose
        # connection was reset says "Connection reset by peer" too, and is no rank's loss)
        collective = isinstance(err, dist.DistError) or type(err) is RuntimeError
        if not self.active or not collective:
            return None
        text = str(err)
        if not isinstance(err, dist.DistError) and not any(mark in text for mark in _GLOO_PEER_LOST):
            return None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        # with two ranks the one that left is the other; with more, torchrun's failure summary names it
        who = f"rank {1 - self.rank}" if self.world_size == 2 else "another rank (torchrun's summary names it)"
        if "timed out" in text.lower() or "timeout" in text.lower():
            what = f"{who} did not answer within ddp_timeout = {self.timeout_s:g} s (stalled, or its node was lost)"
        else:
            what = f"{who} left the launch (an error there, a kill, or its node lost: its own output says which)"
        self.lost = f"rank {self.rank} of {self.world_size}: {what}; the collective said: {first}"
        return self.lost

    def close(self, *, together: bool = True) -> None:
        """Leave the process group this object joined (one the caller made is left to the caller), once every
        rank is done with it: rank 0 writes the last files alone, and a rank that tears its connections down
        while a peer still holds them open can abort (seen as SIGABRT, "terminate called without an active
        exception", at the end of a 2-rank gloo run). Left at once, without that barrier, when a rank left
        (`lost_rank`: none would complete) and when this rank stops alone (`together` False: an error here, while
        the others wait in another collective that the barrier would answer, both then hanging until
        `ddp_timeout`): its connections close, and the others' next collective fails at once."""
        if self.owns_group:
            import torch.distributed as dist

            if self.lost is None and together:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


GRADIENT_BUCKET = 25 * 2**20 // 4  # gradient elements per all-reduce: DDP's 25 MB buckets of float32


# ---------------------------------------------------------------- FSDP2 (`distributed: fsdp`)


class LogprobForward(torch.nn.Module):
    """`per_token(lm, ...)` (the policy's `completion_logprobs`) of a causal LM as a module's forward. The training
    forward calls the decoder and the LM head by themselves, never the model's own forward, so FSDP's root (the
    embeddings, the final norm and the LM head) is this module: its hooks gather those weights before the decoder
    runs and reduce their gradients after the backward."""

    def __init__(self, lm: torch.nn.Module, per_token: Callable[..., Any]):
        super().__init__()
        self.lm = lm
        self.per_token = per_token

    def forward(self, *args: Any, **kwargs: Any):
        return self.per_token(self.lm, *args, **kwargs)


def shard(
    lm: torch.nn.Module,
    per_token: Callable[..., Any],
    *,
    fill: Callable[[torch.nn.Module], None] | None = None,
    device: torch.device | None = None,
) -> LogprobForward:
    """FSDP2 over the ranks: each decoder layer is a unit of its own, the rest (embeddings, final norm, LM head,
    tied or not: one parameter in one unit) the root's. Gradients are summed, not averaged: each rank's loss
    already carries the whole step's normalizer. One tiny forward initialises FSDP from the root, so that the
    sampler may later call the layers directly; after it every weight is a shard again (AdamW must hold those,
    the objects FSDP puts back after each gather). `per_token(lm, prompt_ids, prompt_mask, completion_ids,
    completion_mask, temperature=...)` is the forward the root runs.

    A model on the meta device (no values: `model.sharded.meta_model`) is sharded as it is, then only this
    rank's shards are allocated on `device`, and `fill(lm)` writes them: every parameter's local part
    (`shard_of`) and every buffer (which FSDP does not shard)."""
    from torch.distributed.fsdp import fully_shard

    layers = list(lm.get_decoder().layers)
    for layer in layers:
        fully_shard(layer)
    root = LogprobForward(lm, per_token)
    fully_shard(root, reshard_after_forward=True)  # (the root's default keeps its weights whole after a forward)
    for unit in (root, *layers):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
    if fill is not None:
        if device is None:
            raise ValueError("shard: a model filled after sharding (`fill`) needs the `device` its shards go on")
        root.to_empty(device=device)
        fill(lm)
    device = next(lm.parameters()).device
    one = torch.ones((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        root(one, one, one, one, temperature=1.0)
    return root


@contextlib.contextmanager
def full_weights(root: LogprobForward) -> Iterator[None]:
    """The whole model gathered once on every rank (a rollout: many small forwards, a different number on each
    rank) and sharded again after: inside, no forward communicates."""
    units = [root, *root.lm.get_decoder().layers]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it); a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_of(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (no communication); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
