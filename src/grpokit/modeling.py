"""Model-level helpers: device/dtype resolution, local loading, and completion log-probs.

Row layout: prompts LEFT-padded (N, Tp), completions RIGHT-padded (N, Tc). The completion mask is
always passed in, never derived from `ids != pad`, because pad may equal eos.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpokit import algo

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """Device by name; auto means cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device) -> torch.dtype:
    """Dtype by name; auto means bfloat16 on cuda, float32 elsewhere (CPU bf16 is slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _existing(path) -> str:
    if not Path(path).exists():
        raise FileNotFoundError(f"model/tokenizer path {str(path)!r} does not exist (only local paths load)")
    return str(path)


def load_model(path, device, dtype):
    """AutoModelForCausalLM from a LOCAL directory (never the hub), on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_existing(path), dtype=dtype, local_files_only=True)
    return model.to(device)


def load_tokenizer(path):
    """AutoTokenizer from a LOCAL directory; a tokenizer without a pad token pads with eos.

    A folder whose tokenizer_config.json declares the generic fast class loads as exactly that: transformers 5
    otherwise picks the model type's own class for some types (qwen2 among them), which rebuilds the
    pre-tokenizer and silently drops characters such as spaces and newlines from a custom tokenizer.json.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = _existing(path)
    config_file = Path(path) / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Base checkpoints often have no pad token; pad with EOS (padding is always masked out)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the same RoPE angles as unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int = 512,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N, Tc) float32 of the completion tokens under logits / temperature, 0 where masked.

    Runs the decoder body once on [prompt | completion] and applies the LM head only to the hidden
    states that predict a valid completion token (positions Tp-1 .. Tp+Tc-2), in chunks.
    """
    tp = prompt_ids.shape[1]
    if tp == 0:
        raise ValueError("completion_logprobs needs at least one prompt token (e.g. BOS) per row")
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, Tp+Tc)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (N, Tp+Tc)
    out = model.get_decoder()(
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, tp - 1 : -1]  # (N, Tc, H); position t predicts token t + 1
    valid = completion_mask.bool()  # (N, Tc)
    logp_flat, entropy_flat = algo.logprobs_from_hidden(
        hidden[valid],  # (M, H)
        model.get_output_embeddings(),
        completion_ids[valid],  # (M,)
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )
    zeros = torch.zeros(valid.shape, dtype=torch.float32, device=hidden.device)  # (N, Tc)
    logp = zeros.masked_scatter(valid, logp_flat.float())  # (N, Tc)
    entropy = zeros.masked_scatter(valid, entropy_flat.float()) if with_entropy else None  # (N, Tc)
    return logp, entropy
