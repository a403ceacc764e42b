"""Run by tests/test_sampler_protocol.py under `torchrun --nproc_per_node 2` (and in one process): the weights a
policy hands a sampler (`Policy.sampler_weights().named_tensors()`), written by rank 0 to OUT.pt, for a full
fine-tune and a LoRA policy whose adapters are not zero."""

from __future__ import annotations

import sys

import torch
from helpers import tiny_lm

from grpokit.config import GRPOConfig, LoRAConfig
from grpokit.model.lora import apply_lora
from grpokit.runtime.distributed import Cluster
from grpokit.stages.setup import stage_policy


def handed_over(cluster: Cluster) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, lora in (("full", None), ("lora", LoRAConfig(r=4, alpha=8.0))):
        model = tiny_lm()  # seeded: the same weights on every rank and in one process
        if lora is not None:
            model = apply_lora(model, lora)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():  # B starts at 0 (merged == base): give the adapters something to add
                for param_name, p in model.named_parameters():
                    if "lora_B" in param_name:
                        p.copy_(torch.randn(p.shape, generator=generator))
        policy = stage_policy(
            model, GRPOConfig(), total_steps=1, device=torch.device("cpu"), dtype=torch.float32, cluster=cluster
        )
        out[name] = {k: v.clone() for k, v in policy.sampler_weights().named_tensors()}
    return out


if __name__ == "__main__":
    cluster = Cluster.from_env("fsdp")
    weights = handed_over(cluster)
    if cluster.is_main:
        torch.save(weights, sys.argv[1])
    cluster.close()
