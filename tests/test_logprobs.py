"""completion_logprobs on a tiny Llama: index alignment, padding invariance, pad == eos, loading."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_lm

from grpokit.core import algo, packing
from grpokit.model import loading, logprobs

PAD, EOS, BOS = 0, 1, 2
TEMPERATURE = 0.8


def tiny_llama(pad_token_id=PAD, attn="sdpa"):
    return tiny_lm("llama", attn, pad_token_id=pad_token_id, eos_token_id=EOS, bos_token_id=BOS)


def make_batch(prompts, completions, lengths, *, extra_left=0, extra_right=0, fill=PAD, seed=0):
    """Left-pad prompts and right-pad completions; `lengths` = valid completion tokens per row.

    fill="junk" puts random ids in every padded slot: only the masks may decide what counts.
    """
    g = torch.Generator().manual_seed(seed)
    tp = max(map(len, prompts)) + extra_left
    tc = max(map(len, completions)) + extra_right

    def pad_value(shape):
        if fill == "junk":
            return torch.randint(3, 32, shape, generator=g)
        return torch.full(shape, fill)

    prompt_ids, prompt_mask, completion_ids, completion_mask = [], [], [], []
    for prompt, completion, n in zip(prompts, completions, lengths):
        p, c = torch.tensor(prompt), torch.tensor(completion)
        prompt_ids.append(torch.cat([pad_value((tp - len(p),)), p]))
        prompt_mask.append(torch.cat([torch.zeros(tp - len(p)), torch.ones(len(p))]).long())
        completion_ids.append(torch.cat([c, pad_value((tc - len(c),))]))
        completion_mask.append((torch.arange(tc) < n).long())
    return tuple(torch.stack(x) for x in (prompt_ids, prompt_mask, completion_ids, completion_mask))


PROMPTS = [[BOS, 5, 6], [BOS, 7, 8, 9, 10], [BOS, 11, 12, 13]]
COMPLETIONS = [[14, 15, 16, EOS], [17, EOS], [18, 19, 20]]  # the last one is truncated (no EOS)
LENGTHS = [4, 2, 3]


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert packing.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_completion_logprobs_match_a_plain_forward(attn):
    """Index alignment: hidden state Tp-1+t must score completion token t."""
    model = tiny_llama(attn=attn)
    batch = make_batch(PROMPTS, COMPLETIONS, LENGTHS)
    logp, entropy = logprobs.completion_logprobs(model, *batch, temperature=TEMPERATURE, with_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == (3, 4)
    with torch.no_grad():
        for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            logits = model(torch.tensor([prompt + completion])).logits[0] / TEMPERATURE  # (L, V)
            all_logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)  # (Lc, V)
            want = all_logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(logp[i, : len(completion)], want, rtol=0, atol=1e-5)
            want_entropy = -(all_logp.exp() * all_logp).sum(-1)
            torch.testing.assert_close(entropy[i, : len(completion)], want_entropy, rtol=0, atol=1e-5)
    assert logp[1, 2:].eq(0).all() and logp[2, 3:].eq(0).all() and entropy[1, 2:].eq(0).all()


def loss_and_grads(model, batch, loss_type, tc):
    """logp, masked per-token loss, step loss and parameter gradients for fixed old/ref/advantages.

    tc = width of the unpadded batch: the fixed offsets land on the same real positions either way.
    """
    model.zero_grad()
    logp, _ = logprobs.completion_logprobs(model, *batch, temperature=TEMPERATURE, chunk_size=3)
    mask = batch[3]
    g = torch.Generator().manual_seed(7)
    shift = torch.zeros(logp.shape)
    shift[:, :tc] = 0.3 * torch.randn(len(logp), tc, generator=g)
    old, ref = logp.detach() + shift, logp.detach() - 0.5 * shift
    loss, _ = algo.per_token_loss(
        logp,
        old,
        torch.tensor([1.0, -0.5, 2.0])[: len(logp)],
        mask,
        ref_logp=ref,
        beta=0.05,
        epsilon_low=0.2,
        epsilon_high=0.28,
    )
    norm = algo.step_normalizer(loss_type, mask, generation_tokens=9, generation_sequences=3, max_completion_length=6)
    value = algo.aggregate_loss(loss, mask, loss_type=loss_type, normalizer=norm)
    value.backward()
    return logp.detach(), (loss * mask).detach(), value.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_invariance(attn):
    """Invariant 2: extra left padding on prompts and right padding on completions change nothing."""
    model = tiny_llama(attn=attn)
    tight = make_batch(PROMPTS, COMPLETIONS, LENGTHS)
    padded = make_batch(PROMPTS, COMPLETIONS, LENGTHS, extra_left=3, extra_right=2, fill="junk")
    assert padded[0].shape == (3, 8) and padded[2].shape == (3, 6)
    for loss_type in ("grpo", "bnpo"):  # a per-sequence and a per-token aggregation
        logp_a, token_loss_a, loss_a, grads_a = loss_and_grads(model, tight, loss_type, 4)
        logp_b, token_loss_b, loss_b, grads_b = loss_and_grads(model, padded, loss_type, 4)
        torch.testing.assert_close(logp_b[:, :4], logp_a, rtol=0, atol=1e-5)
        assert torch.equal(logp_b[:, 4:], torch.zeros(3, 2))
        torch.testing.assert_close(token_loss_b[:, :4], token_loss_a, rtol=0, atol=1e-5)
        assert torch.equal(token_loss_b[:, 4:], torch.zeros(3, 2))
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
        assert sum(float(g.abs().sum()) for g in grads_a) > 1e-3
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(gb, ga, rtol=0, atol=1e-5)


def test_pad_equal_to_eos_scores_the_eos_and_masks_what_follows():
    """Invariant 3: with pad == eos the EOS is scored from the mask, not guessed from the ids."""
    model = tiny_llama(pad_token_id=EOS)
    prompts = [[BOS, 5, 6, 7], [BOS, 8]]  # the second prompt is left-padded with EOS (== pad)
    completions = [[9, 10, EOS, EOS, EOS], [11, EOS, EOS, EOS, EOS]]
    batch = make_batch(prompts, completions, [3, 2], fill=EOS)
    assert batch[0][1, 0] == EOS and batch[3].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    logp, _ = logprobs.completion_logprobs(model, *batch, temperature=TEMPERATURE)
    assert logp[0, 2] < 0 and logp[1, 1] < 0  # the EOS tokens are scored
    assert torch.equal(logp[0, 3:], torch.zeros(2)) and torch.equal(logp[1, 2:], torch.zeros(3))

    # what the sampler leaves after the EOS must not matter
    other_ids = batch[2].clone()
    other_ids[0, 3:] = torch.tensor([25, 26])
    other_ids[1, 2:] = torch.tensor([30, 3, 4])
    other = (batch[0], batch[1], other_ids, batch[3])
    for loss_type in ("grpo", "bnpo"):
        logp_a, _, loss_a, grads_a = loss_and_grads(model, batch, loss_type, 5)
        logp_b, _, loss_b, grads_b = loss_and_grads(model, other, loss_type, 5)
        torch.testing.assert_close(logp_b, logp_a, rtol=0, atol=1e-6)
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(gb, ga, rtol=0, atol=1e-6)


def test_resolve_device_and_dtype():
    assert loading.resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert loading.resolve_device("auto") == expected
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert loading.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="'float8'"):
        loading.resolve_dtype("float8", "cpu")


def test_load_model_from_a_local_path(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    loaded = loading.load_model(tmp_path / "m", torch.device("cpu"), torch.float32)
    ids = torch.tensor([[BOS, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        loading.load_model(missing, "cpu", torch.float32)
    with pytest.raises(FileNotFoundError, match="nope"):
        loading.load_tokenizer(missing)
