"""Millisecond tests of the GRPO math in grpokit.core.algo, with hand-computed expectations; flat groups (no reward
spread among a group's scorable rows) are exactly the groups whose advantages are all 0."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.core import algo

NAN = float("nan")
F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def adv(rewards, scale, group_size=4, scorable=None):
    total = t64(rewards)
    scorable = torch.ones(len(rewards), dtype=torch.bool) if scorable is None else torch.tensor(scorable)
    return algo.advantages(total, scorable, group_size=group_size, scale=scale)


# ---------------------------------------------------------------- advantages (invariant 5)

# Three groups of G=4: a split group, a constant group, a spread group.
REWARDS = [1, 0, 0, 1, 2, 2, 2, 2, 0, 1, 2, 5]


def test_advantages_group_hand_computed():
    # g1: mean 0.5, Bessel std sqrt((4 * 0.25) / 3) = 0.5773502..., A = +-0.5 / (0.5773502 + 1e-4)
    # g3: mean 2, std sqrt((4 + 1 + 0 + 9) / 3) = 2.1602469..., A = (r - 2) / (2.1602469 + 1e-4)
    a1 = 0.8658754297607016
    expected = [
        a1,
        -a1,
        -a1,
        a1,
        0,
        0,
        0,
        0,
        -0.9257772446135025,
        -0.46288862230675126,
        0.0,
        1.3886658669202538,
    ]
    torch.testing.assert_close(adv(REWARDS, "group"), t64(expected), rtol=0, atol=1e-12)


def test_advantages_batch_hand_computed():
    # group means 0.5, 2, 2; std over all 12 rewards: mean 1.5, sum of squares 21, std sqrt(21/11)=1.38169856
    a1 = 0.5 / (math.sqrt(21 / 11) + 1e-4)
    assert a1 == pytest.approx(0.36184724364707277)
    expected = [
        a1,
        -a1,
        -a1,
        a1,
        0,
        0,
        0,
        0,
        -1.447388974588291,
        -0.7236944872941455,
        0.0,
        2.1710834618824366,
    ]
    torch.testing.assert_close(adv(REWARDS, "batch"), t64(expected), rtol=0, atol=1e-12)


def test_advantages_none_hand_computed():
    expected = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -2, -1, 0, 3]
    torch.testing.assert_close(adv(REWARDS, "none"), t64(expected), rtol=0, atol=1e-12)


def test_advantages_rloo_hand_computed():
    # r_i - mean of the other three: g1 1 - 1/3, 0 - 2/3; g3 0 - 8/3, 1 - 7/3, 2 - 2, 5 - 1
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, -8 / 3, -4 / 3, 0, 4]
    torch.testing.assert_close(adv(REWARDS, "rloo"), t64(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none", "rloo"])
@pytest.mark.parametrize("value", [0.0, 1e6, -3.7, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_group_gives_exact_zero(scale, value, dtype):
    # 0.1 * 3 / 3 != 0.1 in floating point, so r - mean alone would not be 0
    total = torch.tensor([value] * 3 + [1.0, 2.0, 4.0], dtype=dtype)
    out = algo.advantages(total, torch.ones(6, dtype=torch.bool), group_size=3, scale=scale)
    assert not torch.isnan(out).any()
    assert torch.equal(out[:3], torch.zeros(3, dtype=dtype))
    assert (out[3:] != 0).any()


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(st.floats(-10, 10), min_size=8, max_size=8),
    offset=st.floats(-1000, 1000),
    scale=st.floats(0.5, 20),
)
def test_group_advantages_ignore_offset_and_scale(rewards, offset, scale):
    base = adv(rewards, "group")
    moved = adv([scale * r + offset for r in rewards], "group")
    # exact up to the 1e-4 in the denominator: |A| <= sqrt(3) and the relative change is < 1e-4/std,
    # so only groups with a real spread are compared tightly
    stds = t64(rewards).reshape(2, 4).std(-1)
    for g in range(2):
        # |A| <= 1.5, and the change from the eps is at most |A| * eps / std
        atol = 1e-9 if stds[g] == 0 else 2e-4 / float(stds[g]) + 1e-9
        torch.testing.assert_close(moved[4 * g : 4 * g + 4], base[4 * g : 4 * g + 4], rtol=0, atol=atol)


def test_unscorable_rows_get_zero_and_are_left_out():
    # row 1: every reward function returned None; its total would be 0 and must not pull the mean down
    rewards = t64([[1.0, NAN], [NAN, NAN], [NAN, 3.0], [5.0, 0.0]])
    total, scorable = algo.combine_rewards(rewards, t64([1.0, 1.0]))
    assert scorable.tolist() == [True, False, True, True]
    # scorable (1, 3, 5): mean 3, Bessel std sqrt((4 + 0 + 4) / 2) = 2
    torch.testing.assert_close(
        algo.advantages(total, scorable, group_size=4, scale="group"),
        t64([-2 / 2.0001, 0.0, 0.0, 2 / 2.0001]),
        rtol=0,
        atol=1e-12,
    )
    cases = {
        "none": [-2, 0, 0, 2],
        "rloo": [1 - 4, 0, 3 - 3, 5 - 2],
        "batch": [-2 / 2.0001, 0, 0, 2 / 2.0001],
    }
    for scale, expected in cases.items():
        out = algo.advantages(total, scorable, group_size=4, scale=scale)
        torch.testing.assert_close(out, t64(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none", "rloo"])
def test_unscorable_row_value_is_ignored_and_degenerate_groups_are_zero(scale):
    # group 1: the unscorable row carries a huge total that must have no effect;
    # group 2: nothing scorable; group 3: a single scorable row (no one to compare with)
    scorable = torch.tensor([True, False, True, False, False, False, False, True, False])
    a = algo.advantages(t64([1.0, 1e9, 4.0, 7, 8, 9, 3, 5, 6]), scorable, group_size=3, scale=scale)
    b = algo.advantages(t64([1.0, -5.0, 4.0, 0, 0, 0, 0, 5, 0]), scorable, group_size=3, scale=scale)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.equal(a[3:], torch.zeros(6, dtype=F64))
    assert a[1] == 0 and a[0] < 0 < a[2]


def test_combine_rewards_hand_computed():
    rewards = t64([[1.0, 0.5], [NAN, 2.0], [NAN, NAN], [0.0, NAN], [-1.0, -3.0]])
    total, scorable = algo.combine_rewards(rewards, t64([2.0, -1.0]))
    # 2*1 - 0.5; -2; nothing; 0; -2 + 3
    torch.testing.assert_close(total, t64([1.5, -2.0, 0.0, 0.0, 1.0]), rtol=0, atol=0)
    assert scorable.tolist() == [True, True, False, True, True]


# ---------------------------------------------------------------- KL estimators (Schulman 2020)


def test_kl_estimators_hand_computed():
    logp = t64([[-1.0, -0.2, -0.7]])
    ref = t64([[-0.5, -1.2, -0.7]])  # d = ref - logp = 0.5, -1, 0
    torch.testing.assert_close(algo.kl_k1(logp, ref), t64([[-0.5, 1.0, 0.0]]), rtol=0, atol=1e-15)
    torch.testing.assert_close(algo.kl_k2(logp, ref), t64([[0.125, 0.5, 0.0]]), rtol=0, atol=1e-15)
    # e^0.5 - 0.5 - 1 = 0.14872127...; e^-1 + 1 - 1 = 0.36787944...
    expected_k3 = t64([[0.1487212707001282, 0.36787944117144233, 0.0]])
    torch.testing.assert_close(algo.kl_k3(logp, ref), expected_k3, rtol=0, atol=1e-15)
    assert {"k1": algo.kl_k1, "k2": algo.kl_k2, "k3": algo.kl_k3} == algo.KL_ESTIMATORS


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-30, 0), min_size=2, max_size=2))
def test_k3_is_nonnegative(pair):
    logp, ref = t64([[pair[0]]]), t64([[pair[1]]])
    assert float(algo.kl_k3(logp, ref)) >= 0.0
    assert float(algo.kl_k3(logp.float(), ref.float())) >= 0.0


# ---------------------------------------------------------------- per-token loss and aggregation


def hand_example():
    """2 x 3 batch; row 0 has 3 tokens, row 1 has 2 (its last token is padding).

    ratios   row 0: 1.5 (clipped high), 1.0, 0.5 (below 1-eps but A > 0: not clipped)
             row 1: 0.7 (clipped low),  1.1, 3.0 (masked)
    d = ref - logp: row 0: 0, 0.5, -1; row 1: 0.2, 0, 0.5 (masked)
    """
    logp = t64([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]])
    log_ratio = torch.log(t64([[1.5, 1.0, 0.5], [0.7, 1.1, 3.0]]))
    ref = logp + t64([[0.0, 0.5, -1.0], [0.2, 0.0, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, logp - log_ratio, ref, t64([1.0, -2.0]), mask


# L = -min(rho A, clip(rho) A) + 0.1 * k3:
# row 0: -1.28 + 0;  -1 + 0.1 * 0.14872127;  -0.5 + 0.1 * 0.36787944
# row 1: -min(-1.4, -1.6) + 0.1 * 0.02140276 = 1.60214028;  2.2 + 0
ROW0 = [-1.28, -0.9851278729299872, -0.46321205588285574]
ROW1 = [1.602140275816017, 2.2]
HAND_LOSSES = {
    "grpo": (sum(ROW0) / 3 + sum(ROW1) / 2) / 2,  # 0.4958117474851972
    "bnpo": (sum(ROW0) + sum(ROW1)) / 5,  # 0.2147600694006349
    "dapo": (sum(ROW0) + sum(ROW1)) / 6,  # 24 tokens in 8 generated sequences, 2 in this step
    "dr_grpo": (sum(ROW0) + sum(ROW1)) / 8,  # 2 sequences * max_completion_length 4
    "luspo": (sum(ROW0) + sum(ROW1)) / 2,  # each sequence's sum, a mean over the 2 sequences
}
# the new loss types aggregate as TRL's: cispo and vespo as dapo, sapo as grpo (their own policy terms:
# tests/test_loss_types.py)
HAND_LOSSES.update(cispo=HAND_LOSSES["dapo"], vespo=HAND_LOSSES["dapo"], sapo=HAND_LOSSES["grpo"])
HAND_NORMALIZERS = {
    **{"grpo": 2.0, "bnpo": 5.0, "dapo": 6.0, "dr_grpo": 8.0},
    **{"cispo": 6.0, "sapo": 2.0, "luspo": 2.0, "vespo": 6.0},
}


def test_per_token_loss_hand_computed():
    logp, old, ref, a, mask = hand_example()
    logp.requires_grad_(True)
    loss, stats = algo.per_token_loss(logp, old, a, mask, ref_logp=ref, beta=0.1, epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss[0], t64(ROW0), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss[1, :2], t64(ROW1), rtol=0, atol=1e-12)
    assert stats["clipped_low"].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert stats["clipped_high"].tolist() == [[1, 0, 0], [0, 0, 0]]
    torch.testing.assert_close(stats["ratio"], t64([[1.5, 1.0, 0.5], [0.7, 1.1, 3.0]]), rtol=0, atol=1e-12)
    assert not stats["kl"].requires_grad
    # clipped tokens get gradient only from the KL term: beta * (1 - e^d)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert grad[0, 0] == 0.0
    assert float(grad[1, 0]) == pytest.approx(0.1 * (1 - math.exp(0.2)), abs=1e-12)
    assert float(grad[0, 2]) == pytest.approx(-0.5 + 0.1 * (1 - math.exp(-1)), abs=1e-12)


@pytest.mark.parametrize("loss_type", algo.LOSS_TYPES)
def test_aggregate_loss_hand_computed(loss_type):
    logp, old, ref, a, mask = hand_example()
    loss, _ = algo.per_token_loss(logp, old, a, mask, ref_logp=ref, beta=0.1, epsilon_low=0.2, epsilon_high=0.28)
    norm = algo.step_normalizer(loss_type, mask, generation_tokens=24, generation_sequences=8, max_completion_length=4)
    assert norm == HAND_NORMALIZERS[loss_type]
    value = algo.aggregate_loss(loss, mask, loss_type=loss_type, normalizer=norm)
    assert float(value) == pytest.approx(HAND_LOSSES[loss_type], abs=1e-12)


def test_gspo_sequence_level_hand_computed():
    logp, old, ref, a, mask = hand_example()
    # rho_0 = exp(mean(ln 1.5, 0, ln 0.5)) = 0.75^(1/3) = 0.90856 (inside [0.9, 1.28]);
    # rho_1 = exp(mean(ln 0.7, ln 1.1)) = sqrt(0.77) = 0.87750 < 0.9 with A < 0: clipped to 0.9
    torch.testing.assert_close(
        algo.sequence_ratio(logp, old, mask), t64([[0.75 ** (1 / 3)], [0.77**0.5]]), rtol=0, atol=1e-12
    )
    loss, stats = algo.per_token_loss(
        logp,
        old,
        a,
        mask,
        ref_logp=ref,
        beta=0.1,
        epsilon_low=0.1,
        epsilon_high=0.28,
        importance_level="sequence",
    )
    row0 = [-0.9085602964160698, -0.893688169346057, -0.8717723522989256]  # -rho_0 + 0.1 * k3
    row1 = [1.802140275816017, 1.8]  # 0.9 * 2 + 0.1 * k3
    torch.testing.assert_close(loss[0], t64(row0), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss[1, :2], t64(row1), rtol=0, atol=1e-12)
    assert stats["clipped_low"].tolist() == [[0, 0, 0], [1, 1, 1]]
    value = algo.aggregate_loss(loss, mask, loss_type="grpo", normalizer=2.0)
    assert float(value) == pytest.approx(0.45486493261049554, abs=1e-12)


def test_masked_inf_does_not_leak_into_the_loss():
    loss = t64([[1.0, float("inf")], [2.0, NAN]])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert float(algo.aggregate_loss(loss, mask, loss_type="bnpo", normalizer=2.0)) == 1.5


def test_step_normalizer_counts_and_never_zero():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    kw = {"generation_tokens": 30, "generation_sequences": 12, "max_completion_length": 3}
    assert algo.step_normalizer("grpo", mask, **kw) == 2.0  # the empty row is not a sequence
    assert algo.step_normalizer("bnpo", mask, **kw) == 3.0
    assert algo.step_normalizer("dapo", mask, **kw) == 7.5  # 30 * 3 / 12
    assert algo.step_normalizer("dr_grpo", mask, **kw) == 9.0
    empty = torch.zeros(2, 3)
    for loss_type in algo.LOSS_TYPES:
        assert (
            algo.step_normalizer(loss_type, empty, generation_tokens=0, generation_sequences=0, max_completion_length=0)
            == 1.0
        )


# ---------------------------------------------------------------- tiny model for gradient tests


class TinyLM(torch.nn.Module):
    """Embedding -> tanh -> linear head: enough parameters for gradient comparisons."""

    def __init__(self, vocab=11, hidden=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def logp(self, ctx, targets, mask, chunk_size=4):
        valid = mask.bool()  # (n, T)
        hidden = torch.tanh(self.embed(ctx))[valid]  # (M, H)
        flat, _ = algo.logprobs_from_hidden(hidden, self.head, targets[valid], temperature=0.9, chunk_size=chunk_size)
        return torch.zeros(valid.shape).masked_scatter(valid, flat)  # (n, T)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


LENGTHS = [8, 1, 3, 0, 8, 2, 5, 8, 1, 7, 4, 6]  # very uneven, one empty row
T_MAX = 8


def step_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    n = len(LENGTHS)
    ctx = torch.randint(0, 11, (n, T_MAX), generator=g)
    targets = torch.randint(0, 11, (n, T_MAX), generator=g)
    mask = (torch.arange(T_MAX) < torch.tensor(LENGTHS).unsqueeze(1)).long()  # (n, T)
    return ctx, targets, mask, torch.randn(n, generator=g), g


# W=2 ranks x 2 micro-batches over rows 0..5 and 6..11; DDP would average over ranks, so a trainer
# multiplies by W; here the rank gradients are simply summed.
SPLITS = {
    "K=2": [[range(6), range(6, 12)]],
    "K=3": [[range(5), range(5, 7), range(7, 12)]],
    "W=2xK=2": [[range(2), range(2, 6)], [range(6, 8), range(8, 12)]],
}


# the switches the micro-batch test adds: delta caps the clipped surrogate (the clipped loss types only), the
# off-policy mask drops some negative-advantage rows (its sampler logprobs: the old ones, noisier)
SWITCHES = {"plain": {}, "delta": {"delta": 1.1}, "off_policy_mask": {"off_policy_mask_threshold": 0.05}}


@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize(
    ("loss_type", "switch"),
    [(t, s) for t in algo.LOSS_TYPES for s in SWITCHES if s != "delta" or t in algo.CLIPPED_LOSS_TYPES],
)
def test_micro_batches_and_ranks_sum_to_the_whole_step(loss_type, switch, importance_level):
    model = TinyLM()
    ctx, targets, mask, a, g = step_data()
    with torch.no_grad():
        base = model.logp(ctx, targets, mask)
    old = base + 0.3 * torch.randn(base.shape, generator=g)  # off-policy enough to clip
    ref = base + 0.2 * torch.randn(base.shape, generator=g)
    sampling = old + 0.3 * torch.randn(base.shape, generator=g)
    norm = algo.step_normalizer(
        loss_type, mask, generation_tokens=123, generation_sequences=24, max_completion_length=T_MAX
    )
    kw = {"beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.28, "importance_level": importance_level}
    kw |= {"loss_type": loss_type, **SWITCHES[switch]}
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.2  # cispo's cap of the ratio itself: some weights below it, some capped

    def run(rows):
        rows = list(rows)
        logp = model.logp(ctx[rows], targets[rows], mask[rows])
        loss, stats = algo.per_token_loss(
            logp, old[rows], a[rows], mask[rows], ref_logp=ref[rows], sampling_logp=sampling[rows], **kw
        )
        value = algo.aggregate_loss(loss, mask[rows], loss_type=loss_type, normalizer=norm)
        value.backward()
        return float(value.detach()), stats

    model.zero_grad()
    whole, stats = run(range(12))
    clip = {"cispo": stats.get("cispo_clipped"), "vespo": stats.get("vespo_phi", 1) - 1, "sapo": stats["ratio"] - 1}
    exercised = clip.get(loss_type, stats["clipped_low"] + stats["clipped_high"])
    assert (exercised * mask).abs().sum() > 0  # the clip (cispo: the cap; vespo's weight, sapo's gate) is exercised
    if switch == "off_policy_mask":
        dropped = stats["off_policy_dropped"][:, 0][mask.sum(-1) > 0]
        assert 0 < dropped.sum() < dropped.numel()  # some rows with tokens dropped, some kept
    if switch == "delta":
        assert ((stats["ratio"] > 1.1) & (a[:, None] < 0) & mask.bool()).any()  # some tokens capped at delta
    expected = grads(model)
    for name, ranks in SPLITS.items():
        total_loss, rank_grads = 0.0, []
        for micro_batches in ranks:
            model.zero_grad()
            total_loss += sum(run(rows)[0] for rows in micro_batches)
            rank_grads.append(grads(model))
        summed = [sum(gs) for gs in zip(*rank_grads)]
        assert total_loss == pytest.approx(whole, abs=1e-6), name
        for got, want in zip(summed, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_type", algo.CLIPPED_LOSS_TYPES)
def test_on_policy_identity(loss_type):
    """Invariant 1: rho = 1 and KL = 0 at the first pass, so L_it = -A_i; the gradient is not 0. (The clipped loss
    types; the others' policy terms on-policy: tests/test_loss_types.py.)"""
    model = TinyLM()
    ctx, targets, mask, _, _ = step_data()
    rewards = torch.tensor([1.0, 0, 0, 1, 0.5, 2, 2, 0, 3, 1, 1, 0])
    a = algo.advantages(rewards, torch.ones(12, dtype=torch.bool), group_size=4, scale="group")
    logp = model.logp(ctx, targets, mask)
    assert logp.requires_grad
    loss, stats = algo.per_token_loss(
        logp,
        logp.detach().clone(),
        a,
        mask,
        ref_logp=logp.detach().clone(),
        beta=0.1,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
    )
    assert torch.equal(stats["kl"] * mask, torch.zeros_like(logp))
    assert torch.equal(stats["ratio"], torch.ones_like(logp))
    norm = algo.step_normalizer(
        loss_type, mask, generation_tokens=100, generation_sequences=16, max_completion_length=T_MAX
    )
    value = algo.aggregate_loss(loss, mask, loss_type=loss_type, normalizer=norm)
    lengths, adv = LENGTHS, a.tolist()
    if loss_type == "grpo":  # -mean of A over the 11 non-empty sequences
        expected = -sum(x for x, n in zip(adv, lengths) if n) / 11
    elif loss_type == "luspo":  # -sum_i A_i n_i over the 11 non-empty sequences
        expected = -sum(x * n for x, n in zip(adv, lengths)) / 11
    else:  # -sum_i A_i n_i / normalizer
        denom = {"bnpo": sum(lengths), "dapo": 100 * 12 / 16, "dr_grpo": 12 * T_MAX}[loss_type]
        expected = -sum(x * n for x, n in zip(adv, lengths)) / denom
    assert value.item() == pytest.approx(expected, abs=1e-6)
    value.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 1e-3


# ---------------------------------------------------------------- logprobs_from_hidden


def plain_logprobs(hidden, head, ids, temperature):
    logits = head(hidden) / temperature  # (M, V)
    all_logp = torch.log_softmax(logits, -1)  # (M, V)
    entropy = -(all_logp.exp() * all_logp).sum(-1)  # (M,)
    return all_logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy


@pytest.mark.parametrize("head_kind", ["linear", "other"])
@pytest.mark.parametrize("chunk_size", [3, 10, 64])
def test_logprobs_from_hidden_matches_plain(chunk_size, head_kind, monkeypatch):
    """A plain Linear head takes the hand-written gradient (no checkpoint); any other head a checkpointed
    log_softmax per chunk. Both give the plain log_softmax's values and gradients."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 13)
    head = linear if head_kind == "linear" else torch.nn.Sequential(linear)
    hidden = torch.randn(10, 6, requires_grad=True)
    ids = torch.randint(0, 13, (10,))
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )

    logp, entropy = algo.logprobs_from_hidden(
        hidden, head, ids, temperature=0.7, chunk_size=chunk_size, with_entropy=True
    )
    want, want_entropy = plain_logprobs(hidden, head, ids, 0.7)
    assert len(calls) == (0 if head_kind == "linear" else math.ceil(10 / chunk_size))  # one checkpoint a chunk
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-6)
    assert not entropy.requires_grad

    weights = torch.linspace(-1, 2, 10)  # a non-uniform upstream gradient
    got_grads = torch.autograd.grad((logp * weights).sum(), [hidden, linear.weight, linear.bias])
    want_grads = torch.autograd.grad((want * weights).sum(), [hidden, linear.weight, linear.bias])
    for got, exp in zip(got_grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)

    with torch.no_grad():
        calls.clear()
        nograd, none = algo.logprobs_from_hidden(hidden, head, ids, temperature=0.7, chunk_size=chunk_size)
    assert calls == [] and none is None
    torch.testing.assert_close(nograd, want.detach(), rtol=0, atol=1e-6)


def test_a_frozen_linear_head_gets_no_gradient_and_the_hidden_states_the_right_one():
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 13, bias=False).requires_grad_(False)  # LoRA leaves the head frozen
    hidden = torch.randn(7, 6, requires_grad=True)
    ids = torch.randint(0, 13, (7,))
    logp, _ = algo.logprobs_from_hidden(hidden, head, ids, temperature=1.3, chunk_size=4)
    (grad,) = torch.autograd.grad(logp.sum(), [hidden])
    want, _ = plain_logprobs(hidden, head, ids, 1.3)
    (want_grad,) = torch.autograd.grad(want.sum(), [hidden])
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-6)
    assert head.weight.grad is None


def test_logprobs_from_hidden_with_no_valid_tokens():
    """A micro-batch whose rows are all masked still yields a (0,) result that backpropagates."""
    head = torch.nn.Linear(4, 7)
    logp, entropy = algo.logprobs_from_hidden(
        torch.zeros(0, 4), head, torch.zeros(0, dtype=torch.long), temperature=1.0, with_entropy=True
    )
    assert logp.shape == (0,) and entropy.shape == (0,)
    logp.sum().backward()
    assert torch.equal(head.weight.grad, torch.zeros(7, 4))


def test_nonpositive_temperature_counts_as_one():
    torch.manual_seed(0)
    head, hidden, ids = torch.nn.Linear(4, 7), torch.randn(5, 4), torch.randint(0, 7, (5,))
    with torch.no_grad():
        want, _ = plain_logprobs(hidden, head, ids, 1.0)
        for temperature in (0.0, -1.0):
            got, _ = algo.logprobs_from_hidden(hidden, head, ids, temperature=temperature)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_selective_log_softmax_bf16_is_upcast():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 4, 50) * 5, torch.randint(0, 50, (3, 4))
    want = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    got = algo.selective_log_softmax(logits.bfloat16(), ids)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        algo.selective_log_softmax(logits, ids),
        torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1),
    )


# ---------------------------------------------------------------- bad values


def test_bad_values_raise_value_error_naming_them():
    logp, old, ref, a, mask = hand_example()
    kw = {"ref_logp": ref, "beta": 0.1, "epsilon_low": 0.2, "epsilon_high": 0.2}
    with pytest.raises(ValueError, match="'groupz'.*'batch'"):
        algo.advantages(t64([1.0, 2.0]), torch.ones(2, dtype=torch.bool), group_size=2, scale="groupz")
    with pytest.raises(ValueError, match="'k4'.*'k3'"):
        algo.per_token_loss(logp, old, a, mask, kl_estimator="k4", **kw)
    with pytest.raises(ValueError, match="'tokens'.*'sequence'"):
        algo.per_token_loss(logp, old, a, mask, importance_level="tokens", **kw)
    with pytest.raises(ValueError, match="'ppo'.*'dr_grpo'"):
        algo.step_normalizer("ppo", mask, generation_tokens=1, generation_sequences=1, max_completion_length=1)
    with pytest.raises(ValueError, match="'ppo'.*'bnpo'"):
        algo.aggregate_loss(logp, mask, loss_type="ppo", normalizer=1.0)
    with pytest.raises(ValueError, match="group_size=3"):
        algo.advantages(t64([1.0, 2.0]), torch.ones(2, dtype=torch.bool), group_size=3, scale="group")
    with pytest.raises(ValueError, match="ref_logp"):
        algo.per_token_loss(logp, old, a, mask, ref_logp=None, beta=0.1, epsilon_low=0.2, epsilon_high=0.2)


# ---------------------------------------------------------------- several reward functions


def test_multi_reward_advantages_hand_computed_both_modes():
    # one group of G = 4; column 0 a reward model's score, column 1 a 0/1 rule that returns None once
    nan = float("nan")
    rewards = torch.tensor([[2.0, 1.0], [0.0, nan], [4.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)

    # sum_then_normalize: totals [3, 0, 2, 3] (the None term is absent), mean 2, Bessel std sqrt(2)
    got = algo.multi_reward_advantages(rewards, weights, group_size=4, scale="group", aggregation="sum_then_normalize")
    std = (((3 - 2) ** 2 * 2 + (0 - 2) ** 2 + 0) / 3) ** 0.5
    expected = torch.tensor([1.0, -2.0, 0.0, 1.0], dtype=torch.float64) / (std + algo.ADV_EPS)
    torch.testing.assert_close(got, expected)

    # normalize_then_sum: column 0 [2, 0, 4, 2]: mean 2, std sqrt(8/3) -> [0, -2, 2, 0] / (std + eps);
    # column 1 over rows 0, 2, 3 only: [1, -, 0, 1]: mean 2/3, std sqrt(1/3) -> [1/3, 0, -2/3, 1/3] / (std + eps)
    got = algo.multi_reward_advantages(rewards, weights, group_size=4, scale="group", aggregation="normalize_then_sum")
    a0 = torch.tensor([0.0, -2.0, 2.0, 0.0], dtype=torch.float64) / ((8 / 3) ** 0.5 + algo.ADV_EPS)
    a1 = torch.tensor([1 / 3, 0.0, -2 / 3, 1 / 3], dtype=torch.float64) / ((1 / 3) ** 0.5 + algo.ADV_EPS)
    torch.testing.assert_close(got, 0.5 * a0 + 2.0 * a1)


def test_normalize_then_sum_ignores_each_rewards_scale():
    rewards = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0], dtype=torch.float64)
    scaled = rewards * torch.tensor([1000.0, 1.0], dtype=torch.float64)
    kw = {"group_size": 2, "scale": "group", "aggregation": "normalize_then_sum"}
    # equal up to the 1e-4 added to each std: the x1000 column no longer drowns the 0/1 one
    torch.testing.assert_close(
        algo.multi_reward_advantages(rewards, weights, **kw),
        algo.multi_reward_advantages(scaled, weights, **kw),
        atol=2e-4,
        rtol=0,
    )
    summed = algo.multi_reward_advantages(
        scaled, weights, group_size=2, scale="group", aggregation="sum_then_normalize"
    )
    assert torch.equal(summed.sign(), torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=torch.float64))  # column 0 decides
    with pytest.raises(ValueError, match="'sum_then_normalise'"):
        algo.multi_reward_advantages(rewards, weights, group_size=2, scale="group", aggregation="sum_then_normalise")


# ---------------------------------------------------------------- PPO: token rewards, GAE, whitening, value loss


def test_token_rewards_put_the_score_on_the_last_real_token_and_the_kl_penalty_on_every_one():
    scores = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    got = algo.token_rewards(scores, mask, kl=kl, beta=0.1)
    want = torch.tensor([[-0.01, -0.02, 0.97], [-0.05, -2.05, 0.0]])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(algo.token_rewards(scores, mask), torch.tensor([[0.0, 0.0, 1.0], [0.0, -2.0, 0.0]]))
    # a row without tokens gets no reward at all (not the score on column 0)
    assert algo.token_rewards(torch.tensor([3.0]), torch.tensor([[0, 0]])).abs().sum() == 0


def test_gae_matches_hand_computed_advantages_and_returns():
    # row 0, gamma 1, lam 0.5: deltas 0.1, 0.2, 0.2 -> A2 = 0.2, A1 = 0.2 + 0.5 * 0.2, A0 = 0.1 + 0.5 * 0.3
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.8]])
    adv, ret = algo.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.3, 0.2]]))
    torch.testing.assert_close(ret, torch.tensor([[0.75, 0.9, 1.0]]))
    # row 1, gamma 0.9, lam 0.95, one padded column whose reward and value must be ignored:
    # t=1: delta = 2 - 0.5 = 1.5; t=0: delta = 0.9 * 0.5 - 1 = -0.55, A0 = -0.55 + 0.9 * 0.95 * 1.5 = 0.7325
    rewards = torch.tensor([[0.0, 2.0, 5.0]])
    values = torch.tensor([[1.0, 0.5, 9.0]])
    adv, ret = algo.gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.7325, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.7325, 2.0, 0.0]]))


def test_gae_with_lambda_one_gives_the_discounted_return_and_lambda_zero_the_one_step_error():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    _, ret = algo.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    for i, n in enumerate(mask.sum(-1).tolist()):
        for t in range(n):
            discounted = sum(0.9 ** (k - t) * rewards[i, k] for k in range(t, n))
            torch.testing.assert_close(ret[i, t], torch.as_tensor(discounted, dtype=torch.float32))
    adv, _ = algo.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(3, 1)], 1)
    torch.testing.assert_close(adv, (rewards + 0.9 * next_v - values) * mask)


def test_whiten_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(algo.whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # without the shift the mean stays: (x / 1) masked
    torch.testing.assert_close(algo.whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    # one real token: its mean removed, no division by an undefined std
    torch.testing.assert_close(algo.whiten(torch.tensor([[4.0, 7.0]]), torch.tensor([[1, 0]])), torch.zeros(1, 2))


def test_clipped_value_loss_matches_hand_computed_values_and_its_gradient_stops_at_the_clip():
    values = torch.tensor([[1.0, 0.0, 0.9]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0, 1.0]])
    loss, clipped = algo.value_loss(values, old, returns, clip_range=0.2)
    # V_clip = 0.7, 0.3, 0.7; plain 1, 1, 0.01; clipped 0.49, 0.49, 0.09 -> 0.5 max
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.5, 0.5, 0.045]]))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 1.0]]))
    loss.sum().backward()
    # d/dV 0.5 (V - R)^2 = V - R where the plain term wins; 0 where the clipped (constant in V) term wins
    torch.testing.assert_close(values.grad, torch.tensor([[1.0, -1.0, 0.0]]))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert algo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert algo.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(algo.explained_variance(returns, torch.ones(1, 4), mask))


def test_per_token_advantages_broadcast_like_per_sequence_ones():
    gen = torch.Generator().manual_seed(1)
    logp = torch.randn(2, 3, generator=gen)
    old = logp + 0.3 * torch.randn(2, 3, generator=gen)
    adv = torch.tensor([0.7, -1.2])
    kwargs = {"ref_logp": None, "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2}
    per_seq, _ = algo.per_token_loss(logp, old, adv, torch.ones(2, 3), **kwargs)
    per_tok, _ = algo.per_token_loss(logp, old, adv[:, None].expand(2, 3), torch.ones(2, 3), **kwargs)
    torch.testing.assert_close(per_seq, per_tok)
    varied = torch.tensor([[0.7, 0.0, -0.7], [1.0, 2.0, 3.0]])
    loss, _ = algo.per_token_loss(logp, logp.detach(), varied, torch.ones(2, 3), **kwargs)
    torch.testing.assert_close(loss, -varied)  # ratio 1: L = -A per token


# ---------------------------------------------------------------- flat groups: no spread among scorable rows


def from_rewards(values: list[float | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, scorable) as the trainer builds them from one reward function (None = unscorable)."""
    rewards = torch.tensor([[math.nan if v is None else v] for v in values])  # (N, 1)
    return algo.combine_rewards(rewards, torch.ones(1))


@pytest.mark.parametrize("scale", sorted(algo.ADVANTAGE_SCALES))
def test_flat_groups_leave_unscorable_rows_out(scale):
    """Old: the metric took std == 0 over totals, where an unscorable row counts as 0, so [1, 1, None, 1]
    was "spread" for the metric while its advantages were all 0."""
    G = 4
    total, scorable = from_rewards([1.0, 1.0, None, 1.0] + [0.0, 0.0, None, 1.0] + [None] * 4)
    flat = algo.flat_groups(total, scorable, group_size=G)
    assert flat.tolist() == [True, False, True]
    adv = algo.advantages(total, scorable, group_size=G, scale=scale).reshape(-1, G)
    assert torch.equal(adv[0], torch.zeros(G))
    assert torch.equal(adv[2], torch.zeros(G))
    assert adv[1, 2] == 0  # the unscorable row
    assert bool((adv[1] != 0).any())


@pytest.mark.parametrize("seed", range(5))
def test_flat_groups_are_exactly_the_groups_with_zero_advantages(seed):
    """For random totals and scorable masks, `flat_groups` marks exactly the groups whose advantages are all
    0, for every advantage scale."""
    G, P = 4, 64
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.1, 0.2, 0.7])  # few values, so ties and flat groups are common; 0.1 does not round
    total = values[torch.randint(0, 3, (P * G,), generator=g)]
    scorable = torch.rand(P * G, generator=g) < 0.7
    total = torch.where(scorable, total, 0.0)  # as combine_rewards leaves an unscorable row
    flat = algo.flat_groups(total, scorable, group_size=G)
    assert flat.dtype == torch.bool and flat.shape == (P,)
    assert 0 < int(flat.sum()) < P  # both kinds occur, so the comparison below means something
    for scale in algo.ADVANTAGE_SCALES:
        adv = algo.advantages(total, scorable, group_size=G, scale=scale).reshape(P, G)
        all_zero = (adv == 0).all(-1)
        assert torch.equal(flat, all_zero), scale
