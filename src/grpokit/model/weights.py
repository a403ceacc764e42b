"""The policy's weights as it hands them to a sampler (`sampler.Sampler.update_weights`): the live module for a
sampler in the same process, or the full named tensors an engine in another memory loads."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from grpokit.model.lora import merged_state_dict, uses_lora


@dataclass(frozen=True)
class PolicyWeights:
    """The policy's weights as a sampler takes them (`Sampler.update_weights`), once per generation step: before
    the first rollout and after each step's update (all its optimizer steps).

    `module`: the live policy module, for a sampler in the same process (it shares the parameters: nothing to copy);
    `gather()`: a context in which that module holds its whole weights (FSDP's shards gathered once for all the
    decode steps of a call). `named_tensors(dtype)`: the full weights in the model's own names (those of its
    `state_dict` / `save_pretrained`), gathered from every rank's shards under FSDP (every rank must call it; rank 0
    gets them, the others none), LoRA adapters merged into their base weights, cast to `dtype` if given: what an
    engine in another memory loads. `version()`: what the weights' identity is (see the field)."""

    module: torch.nn.Module
    gather: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    gathered_state: Callable[[], dict[str, torch.Tensor] | None] = lambda: None
    version: Callable[[], object] = lambda: None
    """Changes whenever the weights do (the policy's optimizer steps taken, restored on resume): an engine that holds
    a version's weights skips the next push of the same version. None: unknown, always pushed."""

    def named_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        state = self.gathered_state()  # None: this process holds the whole model
        if state is not None and not state:
            return  # a rank other than 0 under FSDP: it took part in the gather, rank 0 holds the tensors
        if uses_lora(self.module):
            state = merged_state_dict(self.module, state)
        elif state is None:
            state = self.module.state_dict()
        for name, tensor in state.items():
            yield name, tensor.detach().to(dtype) if dtype is not None else tensor.detach()
