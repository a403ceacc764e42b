"""The sampler on tiny random Llama / Qwen2 models: parity with the trainer's logprobs, prefix
sharing, reproducibility, EOS / stop-string endings and the top-k / top-p filters."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from grpokit.model.logprobs import completion_logprobs
from grpokit.rollout.sampler import SamplingParams, filter_logits, generate, prompt_generators

PAD, EOS, BOS = 0, 1, 2
CHARS = "0123456789+=abcdefghijklmnopq"  # 3 specials + 29 chars = vocab 32
PROMPTS = [[BOS, 5, 6, 7, 8, 9, 10], [BOS, 11], [BOS, 12, 13, 14]]  # different lengths: left padding


def tiny_model(arch: str = "llama", seed: int = 0):
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config = config_cls(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    torch.manual_seed(seed)
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    return model_cls(config).float().eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def char_tokenizer():
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_forward_logp(model, r, temperature: float) -> torch.Tensor:
    """Reference: one plain forward over [prompt | completion], log_softmax(logits / T) gathered."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)  # (N, Tp + Tc)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)  # (N, Tp + Tc)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, Tp + Tc)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()  # (N, T, V)
    tp, tc = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    logp = (logits[:, tp - 1 : tp + tc - 1] / temperature).log_softmax(-1)  # (N, Tc, V)
    return logp.gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask  # (N, Tc)


def first_end(ids: list[int], eos: set[int]) -> int | None:
    return next((t for t, tok in enumerate(ids) if tok in eos), None)


def eos_bias_hook(model, bias: dict[int, float]):
    """Add `bias` to some logits (on the lm_head output) so rows end at random, different steps."""
    add = torch.zeros(model.config.vocab_size)
    for tok, b in bias.items():
        add[tok] = b
    return model.lm_head.register_forward_hook(lambda mod, inp, out: out + add)


# ---------------------------------------------------------------- parity (DESIGN invariant 6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_sampling_logp_matches_full_forward(arch, top_k, top_p):
    model = tiny_model(arch)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=top_k, top_p=top_p)
    with eos_bias_hook(model, {EOS: 1.5}):  # some rows end early: exercises right padding too
        r = generate(
            model,
            PROMPTS,
            num_generations=4,
            params=params,
            eos_token_id=EOS,
            pad_token_id=PAD,
            generator=seeded(0),
        )
        ref = full_forward_logp(model, r, temperature=0.7)  # (N, Tc)
        with torch.no_grad():
            trainer_logp, _ = completion_logprobs(
                model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, temperature=0.7
            )
    assert r.prompt_ids.shape == (12, 7) and r.prompt_mask.sum(1).tolist() == [7] * 4 + [2] * 4 + [4] * 4
    lengths = r.completion_mask.sum(1)
    assert lengths.unique().numel() > 1  # rows of different lengths
    # a quarter of the rows end while others go on: they leave the decode batch, and the rows that stay
    # must not notice
    assert (lengths < lengths.max()).sum() >= 3
    assert r.sampling_logp.dtype == torch.float32
    assert (r.sampling_logp[r.completion_mask == 0] == 0).all()
    assert (r.sampling_logp[r.completion_mask == 1] < 0).all()
    torch.testing.assert_close(r.sampling_logp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.sampling_logp, trainer_logp, atol=1e-5, rtol=0)  # what old_logp replaces


def test_unpadded_prompts_decode_unmasked_with_the_same_logprobs(llama):
    """Prompts of one length need no attention mask in the decode (rows that ended attend to padding, but
    nothing reads them): the logprobs are still the full forward's."""
    prompts = [[BOS, 5, 6, 7], [BOS, 11, 12, 13], [BOS, 8, 9, 10]]
    with eos_bias_hook(llama, {EOS: 1.5}):
        r = generate(
            llama,
            prompts,
            num_generations=4,
            params=SamplingParams(max_new_tokens=10, temperature=0.7),
            eos_token_id=EOS,
            pad_token_id=PAD,
            generator=seeded(3),
        )
        ref = full_forward_logp(llama, r, temperature=0.7)  # (N, Tc)
    lengths = r.completion_mask.sum(1)
    assert r.prompt_mask.all() and (lengths < lengths.max()).sum() >= 3  # no padding; rows end early
    torch.testing.assert_close(r.sampling_logp, ref, atol=1e-5, rtol=0)


def test_top_k_top_p_restrict_the_draw(llama):
    """Every sampled token lies inside the top-k AND the top-p nucleus of its own logits."""
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=6, top_p=0.6)
    r = generate(
        llama,
        PROMPTS,
        num_generations=8,
        params=params,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=seeded(1),
    )
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    with torch.no_grad():
        logits = llama(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    tp, tc = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    step_logits = logits[:, tp - 1 : tp + tc - 1] / 0.7  # (N, Tc, V)
    allowed = filter_logits(step_logits.flatten(0, 1), top_k=6, top_p=0.6).isfinite()  # (N*Tc, V)
    chosen_ok = allowed.gather(-1, r.completion_ids.flatten()[:, None]).squeeze(-1)  # (N*Tc,)
    assert chosen_ok[r.completion_mask.flatten() == 1].all()
    # The filter is active here: some steps allow fewer than 6 tokens (the nucleus cut in).
    assert (allowed.sum(-1) < 6).any() and (allowed.sum(-1) <= 6).all()


def test_filter_logits_hand_computed():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # already normalized probabilities

    def keep(top_k: int = 0, top_p: float = 1.0) -> list[bool]:
        return filter_logits(logits, top_k=top_k, top_p=top_p).isfinite().tolist()[0]

    assert keep() == [True, True, True, True]
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.75) == [True, True, False, False]
    assert keep(top_p=0.85) == [True, True, True, False]
    assert keep(top_p=0.1) == [True, False, False, False]  # the most likely token always survives
    assert keep(top_k=3, top_p=0.6) == [True, True, False, False]


# ---------------------------------------------------------------- prefix sharing, greedy


def test_prefill_runs_on_prompts_not_rows_and_greedy_matches_hf_generate(llama):
    batch_sizes, lengths = [], []

    def record(mod, args, kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        lengths.append(kwargs["input_ids"].shape[1])

    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    handle = llama.register_forward_pre_hook(record, with_kwargs=True)
    try:
        r = generate(llama, PROMPTS, num_generations=4, params=params, eos_token_id=EOS, pad_token_id=PAD)
    finally:
        handle.remove()
    # One prefill over the P = 3 prompts at full width, then one-token steps over N = 12 rows.
    assert batch_sizes[0] == 3 and lengths[0] == 7
    assert batch_sizes[1:] == [12] * (len(batch_sizes) - 1) and set(lengths[1:]) == {1}
    assert len(batch_sizes) == r.completion_ids.shape[1]  # prefill + (Tc - 1) decode steps

    for p, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            hf = llama.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=PAD,
            )
        expected = hf[0, len(prompt) :].tolist()
        for g in range(4):
            row = r.completion_ids[p * 4 + g].tolist()
            assert row[: len(expected)] == expected
            assert all(t == PAD for t in row[len(expected) :])


def test_top_k_1_equals_greedy(llama):
    kw = {"num_generations": 3, "eos_token_id": EOS, "pad_token_id": PAD}
    greedy = generate(llama, PROMPTS, params=SamplingParams(max_new_tokens=8, temperature=0.0), **kw)
    top1 = generate(
        llama,
        PROMPTS,
        params=SamplingParams(max_new_tokens=8, temperature=0.7, top_k=1),
        generator=seeded(3),
        **kw,
    )
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    assert torch.equal(greedy.completion_mask, top1.completion_mask)
    # Greedy logprobs are at temperature 1, top-1 logprobs at 0.7: same tokens, different numbers.
    assert not torch.allclose(greedy.sampling_logp, top1.sampling_logp)


# ---------------------------------------------------------------- reproducibility (invariant 7)


def test_seeded_rollouts_reproduce_and_groups_differ(llama):
    llama.train()  # generate must sample in eval mode and give the mode back
    params = SamplingParams(max_new_tokens=8, temperature=1.0)

    def run(seed: int):
        return generate(
            llama,
            PROMPTS[:2],
            num_generations=8,
            params=params,
            eos_token_id=EOS,
            pad_token_id=PAD,
            generator=seeded(seed),
        )

    a, b, c = run(7), run(7), run(8)
    assert llama.training
    llama.eval()
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampling_logp, b.sampling_logp)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    for p in range(2):
        group = a.completion_ids[p * 8 : (p + 1) * 8]
        assert group.unique(dim=0).shape[0] > 1


def test_per_prompt_generators_make_a_prompts_completions_independent_of_the_batch(llama):
    """Seeded per prompt (the run's seed, the step, the prompt's place): a prompt draws the same completions
    alone, beside others, in another order; with rows that end early (an EOS bias) so the batch shrinks."""
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    prompts = PROMPTS[:3]

    def run(places: list[int]):
        gens = prompt_generators(5, step=2, places=places, device="cpu")
        hook = eos_bias_hook(llama, {EOS: 2.0})
        try:
            r = generate(
                llama,
                [prompts[i] for i in places],
                num_generations=4,
                params=params,
                eos_token_id=EOS,
                pad_token_id=PAD,
                generator=gens,
            )
        finally:
            hook.remove()
        pad = params.max_new_tokens - r.completion_ids.shape[1]  # a batch that ends early is narrower
        rows = torch.nn.functional.pad(r.completion_ids * r.completion_mask, (0, pad))
        logp = torch.nn.functional.pad(r.sampling_logp, (0, pad))
        return {p: (rows[k * 4 : (k + 1) * 4], logp[k * 4 : (k + 1) * 4]) for k, p in enumerate(places)}

    together, alone, reversed_ = run([0, 1, 2]), run([1]), run([2, 1, 0])
    for p in (0, 1, 2):
        other = alone if p == 1 else reversed_
        assert torch.equal(other[p][0], together[p][0])
        torch.testing.assert_close(other[p][1], together[p][1], atol=1e-5, rtol=0)
    ended = (together[0][0] == EOS).any(-1) | (together[1][0] == EOS).any(-1)
    assert bool(ended.any())  # the batch shrank while it ran
    assert torch.equal(together[0][0], run([0, 1, 2])[0][0])
    step3 = prompt_generators(5, step=3, places=[0], device="cpu")
    assert step3[0].initial_seed() != prompt_generators(5, step=2, places=[0], device="cpu")[0].initial_seed()
    with pytest.raises(ValueError, match="2 generators for 3 prompts: give one per prompt"):
        generate(
            llama,
            prompts,
            num_generations=2,
            params=params,
            eos_token_id=EOS,
            pad_token_id=PAD,
            generator=prompt_generators(0, 1, [0, 1], "cpu"),
        )


# ---------------------------------------------------------------- EOS (invariant 3) and truncation


def check_endings(r, eos: set[int], pad: int, max_new_tokens: int):
    """Mask = 1 through the first EOS, 0 after; ids after it are pad; truncated iff no EOS."""
    tc = r.completion_ids.shape[1]
    for ids, mask, logp, trunc in zip(
        r.completion_ids.tolist(), r.completion_mask.tolist(), r.sampling_logp, r.truncated.tolist()
    ):
        end = first_end(ids, eos)
        n = tc if end is None else end + 1
        assert mask == [1] * n + [0] * (tc - n)
        assert ids[n:] == [pad] * (tc - n)
        assert (logp[:n] < 0).all() and (logp[n:] == 0).all()
        assert trunc == (end is None)
        if trunc:
            assert n == max_new_tokens


@pytest.mark.parametrize("pad", [PAD, EOS], ids=["pad!=eos", "pad==eos"])
def test_eos_ends_rows_at_different_steps_and_decoding_stops_early(llama, pad):
    params = SamplingParams(max_new_tokens=30, temperature=1.0)
    with eos_bias_hook(llama, {EOS: 4.0}):
        r = generate(
            llama,
            PROMPTS,
            num_generations=6,
            params=params,
            eos_token_id=EOS,
            pad_token_id=pad,
            generator=seeded(0),
        )
    check_endings(r, {EOS}, pad, 30)
    lengths = r.completion_mask.sum(1)
    assert lengths.unique().numel() >= 3  # rows end at different steps
    assert not r.truncated.any()
    assert r.completion_ids.shape[1] == lengths.max() < 30  # stopped once every row was done
    if pad == EOS:  # ids alone cannot tell EOS from padding, the mask must
        assert (r.completion_ids[r.completion_mask == 0] == EOS).all()


def test_truncated_rows_and_eos_list(llama):
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    with eos_bias_hook(llama, {EOS: 1.5, 20: 1.5}):
        r = generate(
            llama,
            PROMPTS,
            num_generations=8,
            params=params,
            eos_token_id=[EOS, 20],
            pad_token_id=PAD,
            generator=seeded(5),
        )
    check_endings(r, {EOS, 20}, PAD, 4)
    assert r.truncated.any() and not r.truncated.all()
    ends = {r.completion_ids[i, r.completion_mask[i].sum() - 1].item() for i in range(24) if not r.truncated[i]}
    assert ends == {EOS, 20}  # both ids end rows
    assert r.completion_ids.shape[1] == 4


# ---------------------------------------------------------------- stop strings


def test_stop_string_ends_row_untruncated(llama, char_tokenizer):
    """Same seed with and without a stop string: each row is the unstopped row cut right after the
    first token at which its decoded text contains the stop string (which may span two tokens)."""
    kw = {"num_generations": 6, "eos_token_id": EOS, "pad_token_id": PAD, "tokenizer": char_tokenizer}
    free = generate(llama, PROMPTS, params=SamplingParams(max_new_tokens=16), generator=seeded(11), **kw)
    row0 = free.completion_ids[0].tolist()
    assert all(t > BOS for t in row0[3:5])  # two ordinary chars to build the stop string from
    stop = char_tokenizer.decode(row0[3:5])
    assert len(stop) == 2
    r = generate(
        llama,
        PROMPTS,
        params=SamplingParams(max_new_tokens=16, stop_strings=(stop, "<nope>")),
        generator=seeded(11),
        **kw,
    )

    n_stopped = 0
    for i in range(free.completion_ids.shape[0]):
        ids = free.completion_ids[i][free.completion_mask[i] == 1].tolist()
        cut = next((k + 1 for k in range(len(ids)) if stop in char_tokenizer.decode(ids[: k + 1])), None)
        n = len(ids) if cut is None else cut
        got = r.completion_ids[i][r.completion_mask[i] == 1].tolist()
        assert got == ids[:n]
        assert r.truncated[i].item() == (cut is None and free.truncated[i].item())
        n_stopped += cut is not None
    assert r.completion_mask[0].sum() <= 5 and not r.truncated[0]
    assert n_stopped >= 1
    torch.testing.assert_close(r.sampling_logp, free.sampling_logp[:, : r.sampling_logp.shape[1]] * r.completion_mask)


# ---------------------------------------------------------------- bad input (invariant 9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_k": -1}, "top_k"),
        ({"max_new_tokens": 4, "stop_strings": "ab"}, "stop_strings"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_generate_input(llama):
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(
            llama,
            PROMPTS,
            num_generations=2,
            eos_token_id=EOS,
            pad_token_id=PAD,
            params=SamplingParams(max_new_tokens=2, stop_strings=("a",)),
        )
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(llama, [[BOS], []], num_generations=2, params=params, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="num_generations"):
        generate(llama, PROMPTS, num_generations=0, params=params, eos_token_id=EOS, pad_token_id=PAD)


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    from grpokit.rollout.sampler import draw

    probs = torch.tensor([[0.5, 0.3, 0.0, 0.2, 0.0]]).expand(40000, 5)  # (N, V)
    tokens = draw(probs, torch.Generator().manual_seed(0))  # (N,)
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    assert freq[2] == 0 and freq[4] == 0  # probability 0: never, also not the last id
    torch.testing.assert_close(freq, probs[0].double(), rtol=0, atol=0.01)  # 5 sigma at N = 40000 is 0.0125
    one_hot = torch.zeros(3, 7)
    one_hot[torch.arange(3), torch.tensor([0, 3, 6])] = 1.0
    assert draw(one_hot, None).tolist() == [0, 3, 6]  # the first and last ids are reachable


def test_the_rollout_frees_its_kv_cache():
    """Nothing of the decode's KV cache outlives `generate`: the update's memory starts from the weights."""
    import gc

    from transformers import DynamicCache

    model = tiny_model("llama")
    rollout = generate(
        model,
        [[BOS, 5, 6], [BOS, 7]],
        num_generations=3,
        params=SamplingParams(max_new_tokens=6),
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.completion_ids.shape == (6, 6)
    gc.collect()
    assert not [obj for obj in gc.get_objects() if isinstance(obj, DynamicCache)]


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_single_query_attention_equals_sdpa_with_grouped_heads(mask):
    """The decode step's two matrix products against torch's sdpa: 8 query heads over 2 kv heads, a left-padded
    row (masked keys), keys read from a reserved buffer (a strided view, as the sampler's cache holds them)."""
    from grpokit.model.attention import single_query_attention

    gen = torch.Generator().manual_seed(0)
    n, hq, hkv, t, d = 5, 8, 2, 7, 16
    query = torch.randn(n, 1, hq, d, generator=gen).transpose(1, 2)  # (N, Hq, 1, D) as a transformers layer makes it
    buffer = torch.randn(2, n, hkv, t + 4, d, generator=gen)
    key, value = buffer[0, :, :, :t], buffer[1, :, :, :t]  # (N, Hkv, T, D) views of the filled part
    attend = torch.ones(n, 1, 1, t, dtype=torch.bool)
    attend[1, ..., :3] = False  # row 1: three padding keys
    given = {"none": None, "bool": attend, "additive": torch.zeros(attend.shape).masked_fill(~attend, -1e30)}[mask]
    out = single_query_attention(query, key, value, given, d**-0.5)  # (N, 1, Hq, D)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=None if mask == "none" else attend, scale=d**-0.5, enable_gqa=True
    ).transpose(1, 2)  # (N, 1, Hq, D)
    assert out.shape == (n, 1, hq, d)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    if mask != "none":  # the padding keys change nothing for row 1 and matter for the others
        alone = single_query_attention(query[1:2], key[1:2, :, 3:], value[1:2, :, 3:], None, d**-0.5)
        torch.testing.assert_close(out[1:2], alone, rtol=0, atol=1e-6)


def test_decode_steps_take_the_matrix_product_attention_and_score_as_the_full_forward(llama, monkeypatch):
    """A masked rollout (prompts of unequal length) goes through grpokit's single-query attention, and its
    sampling logprobs equal a full padded forward's over the same rows (which attends through sdpa)."""
    import grpokit.model.attention as attention

    calls = []
    real = attention.single_query_attention
    monkeypatch.setattr(attention, "single_query_attention", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    rollout = generate(
        llama,
        [[2, 5, 6, 7], [2, 9]],
        num_generations=3,
        params=SamplingParams(max_new_tokens=6),
        eos_token_id=1,
        pad_token_id=0,
        generator=g,
    )
    assert calls and llama.config._attn_implementation == "grpokit:sdpa"
    logp, _ = completion_logprobs(
        llama,
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
        temperature=1.0,
        layout="padded",
    )
    assert rollout.completion_mask.sum() > 12
    torch.testing.assert_close(rollout.sampling_logp, logp, rtol=0, atol=1e-5)
