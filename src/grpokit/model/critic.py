"""PPO's critic: a value model V(prefix) for every completion token, the piece GRPO does without.

A `ValueModel` is a decoder body (a causal LM's, without its LM head) with a scalar head. It trains through
its own `Policy` (AdamW, schedule, micro-batches, clipping, the finite checks), whose forwards compute
`completion_values` where the policy's compute `completion_logprobs`: the same rows, layouts and micro-batch
bounds, so the two walk a step's rows in step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin

from grpokit.model.loading import enable_activation_checkpointing
from grpokit.model.logprobs import completion_hidden


class ValueModel(torch.nn.Module):
    """decoder (the body of a causal LM) + head: hidden (H) -> one value."""

    def __init__(self, decoder: torch.nn.Module, head: torch.nn.Linear | None = None):
        super().__init__()
        # the whole critic trains, also when its body comes from a model whose weights were frozen (the base of a
        # LoRA policy: peft freezes it)
        self.decoder = decoder.requires_grad_(True)
        self.config = decoder.config
        if head is None:
            # zero: every value starts at 0, a guess that favours no completion, and the first advantages are
            # the rewards themselves (a random head would add noise of the hidden states' scale to them)
            head = torch.nn.Linear(decoder.config.hidden_size, 1, bias=True)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        self.head = head

    def get_decoder(self) -> torch.nn.Module:
        return self.decoder

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Checkpointing of the body's layers (`loading.enable_activation_checkpointing`); the head is one layer."""
        enable_activation_checkpointing(self.decoder)

    gradient_checkpointing_enable = activation_checkpointing_enable  # transformers' name before 5.2x


def check_critic(critic: Any) -> None:
    """PPOTrainer's `critic` argument, up front: None (built from the config), or a `ValueModel` whose decoder is a
    causal LM's body (it returns `last_hidden_state`; the whole LM returns logits) and whose head reads that body's
    hidden size and gives one value. Otherwise an ArgumentError naming `critic`, not a traceback mid-step."""
    from grpokit.core.types import ArgumentError, kind_of

    if critic is None:
        return
    if not isinstance(critic, ValueModel):
        raise ArgumentError(
            f"`critic` is {kind_of(critic)}; expected a grpokit.model.critic.ValueModel(body, head) (body: a causal "
            "LM's decoder, `model.model`), or leave it out to build one from `critic_model` or the policy"
        )
    body = critic.decoder
    if isinstance(body, GenerationMixin) or body.get_output_embeddings() is not None:
        raise ArgumentError(
            f"`critic` wraps a whole causal LM ({type(body).__name__}), which returns logits, not hidden states: "
            "pass its decoder body, ValueModel(model.get_decoder()) (for most models `model.model`; a copy's, "
            "copy.deepcopy(model).get_decoder(), when `model` is the policy)"
        )
    hidden = getattr(critic.config, "hidden_size", None)
    reads, gives = getattr(critic.head, "in_features", None), getattr(critic.head, "out_features", None)
    if hidden is not None and reads is not None and reads != hidden:
        raise ArgumentError(
            f"`critic`'s head reads {reads} features but its body ({type(body).__name__}) has hidden size "
            f"{hidden}: make the head torch.nn.Linear({hidden}, 1), or leave the head out for a zero one"
        )
    if gives is not None and gives != 1:
        raise ArgumentError(f"`critic`'s head gives {gives} outputs; a value model gives one: torch.nn.Linear(..., 1)")


def completion_values(
    model: ValueModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    layout: str = "padded",
    group_ids: torch.Tensor | None = None,
    **_logprob_settings: Any,  # temperature, chunk_size, with_entropy, entropy_grad: a value has none of them
) -> tuple[torch.Tensor, None]:
    """V_t (N, Tc) float32 for every real completion token t, from the state before it is sampled (the hidden state
    that predicts it); 0 where masked. -> (values, None), the shape of `completion_logprobs`'s answer."""
    hidden, lay = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, layout, group_ids)
    values = model.head(hidden).squeeze(-1).float()  # (M,)
    zeros = torch.zeros(lay.valid.shape, dtype=torch.float32, device=hidden.device)  # (N, Tc)
    return zeros.masked_scatter(lay.valid, values), None


def build_critic(policy_start: torch.nn.Module | None, critic_model: str | None, device: Any) -> ValueModel:
    """The critic of a PPO run: from `critic_model` (a grpokit reward model folder: its body and its score head, as
    InstructGPT starts the value model from the reward model; a causal LM folder: its body and a zero head), or
    else from `policy_start` (the policy's own starting weights, copied, with a zero head)."""
    if critic_model is None:
        if policy_start is None:
            raise ValueError("build_critic needs the policy's starting model or a `critic_model` folder")
        return ValueModel(copy.deepcopy(policy_start.get_decoder())).to(device)
    from grpokit.model.loading import declares_classifier, load_reward_model

    # a reward model's score head must be in its weights (it is the critic's start); a causal LM's body gets a new one
    trained_head = declares_classifier(critic_model)
    scorer = load_reward_model(
        Path(critic_model), device, torch.float32, new_head=not trained_head, field="critic_model"
    )
    body = getattr(scorer, scorer.base_model_prefix)
    head = None
    if trained_head:
        head = torch.nn.Linear(body.config.hidden_size, 1, bias=True)
        with torch.no_grad():
            head.weight.copy_(scorer.score.weight)
            head.bias.zero_()  # the reward model's score head has no bias
    return ValueModel(body, head).to(device)


def critic_on_meta(policy_model: torch.nn.Module) -> tuple[ValueModel, Callable[[ValueModel], None]]:
    """The default critic of an FSDP run (`distributed: fsdp`), whose policy is sharded: a ValueModel on the meta
    device, its body built from the policy body's config (no weights anywhere), and the `fill` that writes its
    shards once `distributed.shard` has sharded it like the policy (`Policy(..., fill=)`): each weight's local part
    copied from the policy's local part of the same weight (FSDP2 cuts every parameter on dim 0 over the same ranks,
    so the parts match and no rank communicates), with LoRA from the base weight (`base_layer`: the fresh adapters
    add 0, so the policy starts as its base); the buffers (not sharded) copied whole; a zero head. No rank ever
    holds the whole critic."""
    from grpokit.runtime.distributed import shard_of

    body = policy_model.get_decoder()
    # the policy body's tensors under the critic body's names (peft puts a LoRA layer's base weight in base_layer)
    source = {name.replace(".base_layer.", "."): t for name, t in body.named_parameters() if ".lora_" not in name}
    buffers = dict(body.named_buffers())
    with torch.device("meta"):
        critic = ValueModel(type(body)(body.config))
    missing = sorted(set(dict(critic.decoder.named_parameters())) - set(source))
    if missing:
        raise ValueError(f"critic_on_meta: the policy's body has no weight {missing[0]} ({len(missing)} missing)")

    @torch.no_grad()
    def fill(model: ValueModel) -> None:
        for name, param in model.decoder.named_parameters():
            mine, policy_part = shard_of(param), shard_of(source[name])
            if mine.shape != policy_part.shape:
                raise RuntimeError(f"critic_on_meta: {name}'s shard is {tuple(mine.shape)} here but the policy's is "
                                   f"{tuple(policy_part.shape)}: they are not sharded alike")  # fmt: skip
            mine.copy_(policy_part)
        for name, buffer in model.decoder.named_buffers():
            buffer.copy_(buffers[name])
        shard_of(model.head.weight).zero_()
        shard_of(model.head.bias).zero_()

    return critic, fill
