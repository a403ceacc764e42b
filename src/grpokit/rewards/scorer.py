"""A trained reward model behind the reward contract: it re-renders each prompt + completion with its own tokenizer
and chat template and scores the row at its last real token, so the policy and the reward model may use different
tokenizers.

A reward model is an `AutoModelForSequenceClassification` with one output. It reads prompt + completion + EOS and
its reward is the score head at the LAST real token of the row. Pooling picks the last token by the attention mask,
not by `input_ids != pad_token_id` as transformers' own forward does: with a pad == eos tokenizer the latter would
skip the EOS that ends every completion. Positions skip left padding, so padding never changes a reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from grpokit.core.packing import position_ids_from_mask
from grpokit.data.rows import completion_text, pad_batch, render_prompt, text_messages
from grpokit.model.loading import (
    check_model_source,
    check_vocabulary,
    load_reward_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)


def sequence_rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward (B,) float32 of each row: the score head applied at the row's last token with mask 1.

    Works for left and right padding alike, and for pad == eos. A model without a `score` head (not
    one of transformers' decoder classifiers) falls back to its own forward and pooling.
    """
    mask = attention_mask.long()  # (B, T)
    position_ids = position_ids_from_mask(mask)  # (B, T)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        return logits[:, 0].float()  # (B,)
    out = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)  # (B,) last position with mask 1
    pooled = out.last_hidden_state[torch.arange(mask.shape[0], device=mask.device), last]  # (B, H)
    return head(pooled)[:, 0].float()  # (B,)


def reward_model_text(tokenizer: Any, prompt: str | list[dict[str, str]], completion: str) -> str:
    """What a reward model reads for one completion, built with ITS tokenizer.

    Chat messages with a chat template: the conversation with the completion as the assistant's turn.
    Otherwise: the rendered prompt + completion + EOS (the EOS marks where the answer ends, and is the
    token whose hidden state is scored).
    """
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        messages = [*text_messages(prompt), {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return render_prompt(tokenizer, prompt) + completion + tokenizer.eos_token


def encode_texts(
    tokenizer: Any, prompts: list[Any], completions: list[str], max_length: int | None = None
) -> list[list[int]]:
    """Token ids of each `reward_model_text`; an over-long row keeps its LAST tokens (the answer and its EOS).
    A chat template already holds any BOS, so it gets no special tokens added."""
    texts = [reward_model_text(tokenizer, p, c) for p, c in zip(prompts, completions)]
    out: list[list[int]] = [[] for _ in texts]
    for plain in (True, False):  # one batched tokenizer call per setting of add_special_tokens
        rows = [i for i, p in enumerate(prompts) if isinstance(p, str) == plain]
        if rows:
            encoded = tokenizer([texts[i] for i in rows], add_special_tokens=plain)["input_ids"]
            for i, ids in zip(rows, encoded):
                out[i] = list(ids)[-max_length:] if max_length is not None else list(ids)
    return out


def encode_text(tokenizer: Any, prompt: Any, completion: str, max_length: int | None = None) -> list[int]:
    """`encode_texts` of one completion."""
    return encode_texts(tokenizer, [prompt], [completion], max_length)[0]


class RewardModelScorer:
    """A reward model folder as a reward function: fn(prompts, completions, *, raw_prompts=None, **columns) -> floats.

    Each completion is rendered with the reward model's own tokenizer and chat template from its raw prompt
    (text or chat messages; the policy-rendered `prompts[i]` when no raw prompt is given), scored in batches
    of `batch_size` without gradients, and returned as Python floats.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int | None = None,
        dtype: str = "auto",
        model: Any = None,
        tokenizer: Any = None,
        field: str = "reward_funcs",
    ):
        """`model` / `tokenizer`: use these objects instead of loading them from `path`; `field`: the config field
        that named the folder, for errors."""
        self.path = Path(path)
        # `train_reward_model` always saves to RUN/model, so the run's folder is what tells scorers apart
        self.__name__ = f"{self.path.parent.name}/{self.path.name}"
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        if model is None:
            check_model_source(self.path, field=field, tokenizer=tokenizer is None, kind="reward_model")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.path)
        if model is None:
            model = load_reward_model(
                self.path,
                self.device,
                resolve_dtype(dtype, self.device),
                pad_token_id=self.tokenizer.pad_token_id,
                field=field,
            )
        check_vocabulary(model, self.tokenizer, field=field, tokenizer_of=f"the tokenizer of {self.path}")
        self.model = model.to(self.device).eval().requires_grad_(False)

    def __repr__(self) -> str:
        return f"RewardModelScorer({str(self.path)!r})"

    def texts(self, prompts: list[str], completions: list[str], raw_prompts: list[Any] | None = None) -> list[str]:
        """The text the reward model reads for each completion."""
        sources = raw_prompts if raw_prompts is not None else prompts
        return [reward_model_text(self.tokenizer, p, c) for p, c in zip(sources, completions)]

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], completions: list[str], *, raw_prompts: list[Any] | None = None, **columns: Any
    ) -> list[float]:
        sources = raw_prompts if raw_prompts is not None else prompts
        if len(sources) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(sources)} prompts")
        texts = [completion_text(c) for c in completions]  # plain or conversational
        ids = encode_texts(self.tokenizer, list(sources), texts, self.max_length)
        pad_id = self.tokenizer.pad_token_id
        side = getattr(self.tokenizer, "padding_side", "right")
        rewards: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            b_ids, b_mask = pad_batch(ids[start : start + self.batch_size], pad_id, side=side)  # (b, T)
            rewards += sequence_rewards(self.model, b_ids.to(self.device), b_mask.to(self.device)).tolist()
        return rewards
