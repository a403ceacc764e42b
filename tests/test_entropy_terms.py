"""The entropy terms of the update, TRL's `top_entropy_quantile` (keep only the step's highest-entropy tokens in the
policy-gradient term: Wang et al. 2025, "Beyond the 80/20 Rule") and `entropy_coef` (loss = policy loss - coef x
the mean token entropy): the differentiable entropy of the LM head against autograd, hand-computed thresholds,
masks and bonuses, parity with TRL 1.16's own `_compute_loss`, micro-batches and ranks giving the gradient of one
batch, tiny runs with each switch, and the checks on the fields."""

from __future__ import annotations

import collections
import copy
import math
import types
import warnings

import pytest
import torch
from helpers import cli_run, config, read_jsonl, save_tiny, step_rows, tiny_lm, tiny_run_args

from grpokit.config import ConfigError, GRPOConfig, PPOConfig
from grpokit.core import algo
from grpokit.core.types import InputWarning, Rollout
from grpokit.model.logprobs import completion_logprobs
from grpokit.stages import update
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.setup import stage_policy

F64 = torch.float64

# ---------------------------------------------------------------- the differentiable entropy of the LM head


def plain(hidden, head, ids, temperature):
    """logp of `ids` and the entropy, by autograd through a whole log_softmax."""
    all_logp = torch.log_softmax(head(hidden) / temperature, -1)  # (M, V)
    return all_logp.gather(-1, ids[:, None]).squeeze(-1), -(all_logp.exp() * all_logp).sum(-1)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("head_kind", ["linear", "other"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_the_entropy_gradient_is_autograds_of_a_plain_log_softmax(chunk_size, head_kind, frozen):
    """float64, temperature 0.7, a bias; a plain Linear head takes the hand-written backward (dH/dz = -p (log p + H)
    / T), any other the checkpointed chunk; a frozen head (LoRA) gets no weight gradient."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 13, dtype=F64).requires_grad_(not frozen)
    head = linear if head_kind == "linear" else torch.nn.Sequential(linear)
    hidden = torch.randn(10, 6, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 13, (10,))
    wants = [hidden] if frozen else [hidden, linear.weight, linear.bias]
    a, b = torch.randn(10, dtype=F64), torch.randn(10, dtype=F64)  # upstream gradients of logp and of H

    logp, entropy = algo.logprobs_from_hidden(hidden, head, ids, temperature=0.7, chunk_size=chunk_size,
                                              entropy_grad=True)  # fmt: skip
    want_logp, want_entropy = plain(hidden, head, ids, 0.7)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-12)
    assert entropy.requires_grad
    pairs = [
        ((logp * a).sum() + (entropy * b).sum(), (want_logp * a).sum() + (want_entropy * b).sum()),
        ((entropy * b).sum(), (want_entropy * b).sum()),
    ]  # with the logp term, and the entropy alone
    for upstream, want_upstream in pairs:
        got = torch.autograd.grad(upstream, wants, retain_graph=True)
        want = torch.autograd.grad(want_upstream, wants, retain_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert linear.weight.grad is None  # (autograd.grad, not backward)


def test_without_entropy_grad_the_entropy_is_a_metric():
    torch.manual_seed(0)
    head, hidden, ids = torch.nn.Linear(4, 7), torch.randn(5, 4, requires_grad=True), torch.randint(0, 7, (5,))
    _, entropy = algo.logprobs_from_hidden(hidden, head, ids, temperature=1.3, with_entropy=True)
    assert not entropy.requires_grad


def test_the_bonus_value_and_gradient_hand_computed():
    """One token, two logits (0, ln 3) = (0, 2 ln 3) / T with T = 2: p = (1/4, 3/4), H = 0.5623351446188083 nats;
    dH/dz_v = -p_v (ln p_v + H): (0.2059898, -0.2059898), and d/dW = dH/dz / T x h with h = 1. A step of 4 loss
    tokens (this micro-batch holds 1): the bonus is H / 4 and the loss -coef x H / 4."""
    head = torch.nn.Linear(1, 2, bias=False, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [2 * math.log(3)]], dtype=F64))
    _, entropy = algo.logprobs_from_hidden(torch.ones(1, 1, dtype=F64), head, torch.zeros(1, dtype=torch.long),
                                           temperature=2.0, entropy_grad=True)  # fmt: skip
    H = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    assert math.isclose(H, 0.5623351446188083, abs_tol=1e-15)
    assert float(entropy.detach()) == pytest.approx(H, abs=1e-14)
    coef = 0.1
    loss = -coef * algo.entropy_bonus(entropy, torch.ones(1), normalizer=4.0)
    assert float(loss.detach()) == pytest.approx(-coef * H / 4, abs=1e-15)
    loss.backward()
    dH_dz = torch.tensor([-0.25 * (math.log(0.25) + H), -0.75 * (math.log(0.75) + H)], dtype=F64)
    assert float(dH_dz[0]) == pytest.approx(0.2059898, abs=1e-7)
    torch.testing.assert_close(head.weight.grad, (-coef / 4 * dH_dz / 2.0)[:, None], rtol=0, atol=1e-15)


# ---------------------------------------------------------------- the threshold, the mask, the bonus


@pytest.mark.parametrize("keep", [0.0, 0.2, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_the_threshold_is_torch_quantiles_linear_one(keep, n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 5
    assert algo.entropy_threshold(values, keep) == float(torch.quantile(values, 1 - keep))


# Loss-token entropies 0.5 2.0 1.0 | 2.0 0.1 3.0, sorted 0.1 0.5 1.0 2.0 2.0 3.0; 9.9 and 7.0 are padding.
ENTROPY = torch.tensor([[0.5, 2.0, 1.0, 9.9], [2.0, 0.1, 3.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])


@pytest.mark.parametrize(
    ("keep", "threshold", "kept"),
    [
        (1.0, 0.1, [[1, 1, 1, 0], [1, 1, 1, 0]]),  # the 0 quantile: the least entropy, all kept
        (0.5, 1.5, [[0, 1, 0, 0], [1, 0, 1, 0]]),  # rank 2.5: halfway from 1.0 to 2.0
        (0.2, 2.0, [[0, 1, 0, 0], [1, 0, 1, 0]]),  # rank 4: a tie at 2.0, both kept (3 of 6 tokens, not 1.2)
        (0.0, 3.0, [[0, 0, 0, 0], [0, 0, 1, 0]]),  # the largest: TRL's "all but the highest-entropy token"
    ],
)
def test_the_high_entropy_mask_hand_computed(keep, threshold, kept):
    got = algo.entropy_threshold(ENTROPY[MASK.bool()], keep)
    assert got == pytest.approx(threshold, abs=1e-6)
    assert torch.equal(algo.high_entropy_mask(ENTROPY, MASK, got), torch.tensor(kept, dtype=torch.bool))


def test_no_loss_tokens_select_nothing():
    threshold = algo.entropy_threshold(torch.zeros(0), 0.2)
    assert threshold == math.inf
    assert not algo.high_entropy_mask(ENTROPY, MASK, threshold).any()
    with pytest.raises(ValueError, match="keep must be in"):
        algo.entropy_threshold(ENTROPY[0], 1.5)


def test_the_bonus_is_a_share_of_the_steps_mean_over_its_tokens():
    """Micro-batch 1 holds entropies 0.5, 2.0, 1.0 of a step whose 6 loss tokens hold 8.6 nats: share 3.5 / 6, and
    the two shares add up to the mean 8.6 / 6; padding (9.9, 7.0) never counts."""
    first = algo.entropy_bonus(ENTROPY[:1], MASK[:1], normalizer=6.0)
    second = algo.entropy_bonus(ENTROPY[1:], MASK[1:], normalizer=6.0)
    assert float(first) == pytest.approx(3.5 / 6)
    assert float(first + second) == pytest.approx(8.6 / 6)


# ---------------------------------------------------------------- TRL 1.16's own loss


# the other loss types' settings at TRL's defaults, but for SAPO's 1.05, which TRL rounds to float32: 1.25 is exact
LOSS_SETTINGS = {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.25, "vespo_k_pos": 2.0,
                 "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}  # fmt: skip


def trl_loss(trl, logp, entropy, old, advantages, mask, *, loss_type, keep, coef, beta, ref):
    """TRL 1.16's GRPOTrainer._compute_loss on these per-token tensors, one process, one micro-batch."""
    identity = types.SimpleNamespace(
        pad_across_processes=lambda t, dim=0, pad_index=0: t, gather=lambda t: t,
        reduce=lambda t, reduction="sum": t, num_processes=1, sync_gradients=True,
    )  # fmt: skip
    fake = types.SimpleNamespace(
        accelerator=identity, top_entropy_quantile=keep, entropy_coef=coef, use_adaptive_entropy=False,
        _entropy_bonus_enabled=coef != 0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), max_completion_length=mask.shape[1],
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1, **LOSS_SETTINGS),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, entropy, None),  # the leaf tensors
    )  # fmt: skip
    fake.get_high_entropy_mask = types.MethodType(trl.GRPOTrainer.get_high_entropy_mask, fake)
    fake.get_gamma_weights = trl.GRPOTrainer.get_gamma_weights  # (a staticmethod)
    n, T = mask.shape
    ones = torch.ones(n, 1, dtype=torch.long)
    inputs = {"prompt_ids": ones, "prompt_mask": ones, "completion_ids": torch.ones(n, T, dtype=torch.long),
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum(), "ref_per_token_logps": ref}  # fmt: skip
    return trl.GRPOTrainer._compute_loss(fake, None, inputs)


def grpokit_loss(logp, entropy, old, advantages, mask, *, loss_type, keep, coef, beta, ref):
    """The same step through grpokit's functions, as `update.step_entropy` and `update.policy_pass` chain them."""
    selected = None
    if keep < 1:
        threshold = algo.entropy_threshold(entropy.detach()[mask.bool()], keep)
        selected = algo.high_entropy_mask(entropy.detach(), mask, threshold)
    loss, _ = algo.per_token_loss(logp, old, advantages, mask, ref_logp=ref, beta=beta, epsilon_low=0.2,
                                  epsilon_high=0.28, selected=selected, loss_type=loss_type,
                                  **LOSS_SETTINGS)  # fmt: skip
    normalizer = algo.step_normalizer(loss_type, mask, generation_tokens=int(mask.sum()),
                                      generation_sequences=len(mask), max_completion_length=mask.shape[1])  # fmt: skip
    value = algo.aggregate_loss(loss, mask, loss_type=loss_type, normalizer=normalizer)
    if coef:
        tokens = mask.bool() if selected is None else selected
        value = value - coef * algo.entropy_bonus(entropy, tokens, normalizer=float(tokens.sum()))
    return value


@pytest.mark.parametrize(("keep", "coef", "beta"), [(0.2, 0.0, 0.0), (1.0, 0.01, 0.0), (0.2, 0.01, 0.04)])
@pytest.mark.parametrize("loss_type", algo.LOSS_TYPES)
def test_the_loss_and_its_gradient_are_trls(loss_type, keep, coef, beta):
    """On random tensors (off-policy enough to clip, uneven lengths), the loss and its gradient with respect to the
    per-token logps and entropies equal TRL 1.16's: its mask (quantile, ties, padding), its bonus on the same
    tokens, the KL term on every token."""
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    n, T = 8, 12
    mask = (torch.arange(T) < torch.randint(1, T + 1, (n,), generator=g)[:, None]).long()  # (n, T)
    # float64: luspo's token sums reach ~2, where float32's rounding alone is 1e-7
    logp0 = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    old = logp0 + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)
    entropy0 = torch.rand(n, T, generator=g, dtype=torch.float64) * 4
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    ref = logp0 + 0.2 * torch.randn(n, T, generator=g, dtype=torch.float64)
    results = []
    for loss in (lambda *a, **k: trl_loss(trl, *a, **k), grpokit_loss):
        logp, entropy = logp0.clone().requires_grad_(True), entropy0.clone().requires_grad_(True)
        value = loss(logp, entropy, old, advantages, mask, loss_type=loss_type, keep=keep, coef=coef, beta=beta,
                     ref=ref)  # fmt: skip
        grads = torch.autograd.grad(value, [logp, entropy], allow_unused=True)
        results.append([value.detach(), *(torch.zeros(n, T, dtype=torch.float64) if x is None else x for x in grads)])
    (want, want_logp, want_entropy), (got, got_logp, got_entropy) = results
    assert float(got) == pytest.approx(float(want), abs=1e-7)
    torch.testing.assert_close(got_logp, want_logp, rtol=0, atol=1e-8)
    torch.testing.assert_close(got_entropy, want_entropy, rtol=0, atol=1e-8)
    assert bool((got_entropy != 0).any()) == (coef != 0)


# ---------------------------------------------------------------- micro-batches and ranks


class TinyLM(torch.nn.Module):
    """Embedding -> tanh -> linear head: the entropy and the logprobs both depend on every parameter."""

    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def per_token(self, ctx, targets, mask, *, entropy_grad=True):
        valid = mask.bool()  # (n, T)
        hidden = torch.tanh(self.embed(ctx))[valid]  # (M, H)
        logp, entropy = algo.logprobs_from_hidden(hidden, self.head, targets[valid], temperature=0.9, chunk_size=4,
                                                  with_entropy=True, entropy_grad=entropy_grad)  # fmt: skip
        zeros = torch.zeros(valid.shape)
        return zeros.masked_scatter(valid, logp), zeros.masked_scatter(valid, entropy)  # (n, T), (n, T)


LENGTHS = [8, 1, 3, 0, 8, 2, 5, 8, 1, 7, 4, 6]  # very uneven, one empty row
SPLITS = {  # ranks -> their micro-batches (rows); the gradients of the ranks are summed, as the optimizer step does
    "K=2": [[range(6), range(6, 12)]],
    "K=3": [[range(5), range(5, 7), range(7, 12)]],
    "W=2xK=2": [[range(2), range(2, 6)], [range(6, 8), range(8, 12)]],
}


@pytest.mark.parametrize("loss_type", algo.LOSS_TYPES)
def test_micro_batches_and_ranks_give_the_gradient_of_one_batch(loss_type):
    """The threshold is taken over the whole step's loss tokens (each rank's gathered) and the bonus's normalizer
    counts the step's selected tokens, so any split into micro-batches and ranks gives one batch's loss and
    gradient."""
    model = TinyLM()
    g = torch.Generator().manual_seed(1)
    n, T = len(LENGTHS), 8
    ctx, targets = torch.randint(0, 11, (n, T), generator=g), torch.randint(0, 11, (n, T), generator=g)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    with torch.no_grad():
        base, entropy = model.per_token(ctx, targets, mask, entropy_grad=False)
    old = base + 0.3 * torch.randn(base.shape, generator=g)
    advantages = torch.randn(n, generator=g)
    normalizer = algo.step_normalizer(loss_type, mask, generation_tokens=123, generation_sequences=24,
                                      max_completion_length=T)  # fmt: skip

    def run(rows, ranks):
        """One micro-batch; the threshold from every rank's loss-token entropies, as Cluster.gather_uneven gives."""
        rows = list(rows)
        gathered = torch.cat([entropy[list(r)][mask[list(r)].bool()] for rank in ranks for r in rank])
        selected = algo.high_entropy_mask(entropy, mask, algo.entropy_threshold(gathered, 0.3))  # (n, T)
        logp, h = model.per_token(ctx[rows], targets[rows], mask[rows])
        loss, _ = algo.per_token_loss(logp, old[rows], advantages[rows], mask[rows], ref_logp=None, beta=0.0,
                                      epsilon_low=0.2, epsilon_high=0.28, selected=selected[rows],
                                      loss_type=loss_type)  # fmt: skip
        value = algo.aggregate_loss(loss, mask[rows], loss_type=loss_type, normalizer=normalizer)
        value = value - 0.05 * algo.entropy_bonus(h, selected[rows], normalizer=float(selected.sum()))
        value.backward()
        return float(value)

    model.zero_grad()
    whole = run(range(n), [[range(n)]])
    expected = [p.grad.clone() for p in model.parameters()]
    for name, ranks in SPLITS.items():
        model.zero_grad()  # the ranks' gradients add up in .grad, as the optimizer step sums them
        total = sum(run(rows, ranks) for rank in ranks for rows in rank)
        assert total == pytest.approx(whole, abs=1e-6), name
        for got, want in zip([p.grad for p in model.parameters()], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


PAD, EOS, BOS = 0, 1, 2
PROMPTS = [[BOS, 5, 6], [BOS, 7, 8, 9], [BOS, 12]]
COMPLETIONS = [[14, 15, 16, 17, 18, EOS], [19, 20, 21, 22, EOS], [23, 24, EOS], [25, 26, 27, 28, 29, 30],
               [31, 3, 4, 5, 6, EOS], [7, EOS]]  # fmt: skip
ADVANTAGES = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 0.9])


def rollout() -> Rollout:
    prompts = [p for p in PROMPTS for _ in range(2)]  # G = 2
    tp, tc = max(map(len, prompts)), max(map(len, COMPLETIONS))
    prompt_ids = torch.tensor([[PAD] * (tp - len(p)) + p for p in prompts])
    completion_ids = torch.tensor([c + [PAD] * (tc - len(c)) for c in COMPLETIONS])
    completion_mask = (torch.arange(tc) < torch.tensor([len(c) for c in COMPLETIONS])[:, None]).long()
    return Rollout(prompt_ids, (prompt_ids != PAD).long(), completion_ids, completion_mask, torch.zeros(6, tc),
                   torch.zeros(6, dtype=torch.bool), 2)  # fmt: skip


def update_gradients(model, batch: Rollout, terms: update.EntropyTerms, *, micro_batch_size, layout):
    """One optimizer step's gradient through the trainer's own pieces: `update.step_entropy` before the step's
    micro-batches, `update.policy_pass` for each."""
    policy = stage_policy(model, GRPOConfig(), total_steps=1, device=torch.device("cpu"), dtype=torch.float32,
                          layout=layout, micro_batch_size=micro_batch_size)  # fmt: skip
    mask = batch.completion_mask.float()
    normalizer = algo.step_normalizer("bnpo", mask, generation_tokens=int(mask.sum()), generation_sequences=6,
                                      max_completion_length=mask.shape[1])  # fmt: skip
    sums = dict.fromkeys((*update.FIGURES, "sampler_logp_diff"), 0.0)
    rows = torch.arange(6)
    step = update.step_entropy(policy, batch, rows, mask, mask, terms, sums)
    for idx in policy.micro_batches(batch, rows):
        update.policy_pass(policy, batch, idx, mask, ADVANTAGES, None, None, loss_type="bnpo",
                           surrogate=GRPOConfig().surrogate(), normalizer=normalizer, beta=0.0, first_pass=True,
                           sums=sums, entropy_terms=step)  # fmt: skip
    return {name: p.grad.clone() for name, p in model.named_parameters()}, sums


def by_hand(model, batch: Rollout, keep: float, coef: float):
    """One padded forward over every row: the mask, the surrogate and the bonus of the whole batch."""
    logp, entropy = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                        batch.completion_mask, temperature=1.0, entropy_grad=True)  # fmt: skip
    mask = batch.completion_mask.float()
    threshold = algo.entropy_threshold(entropy.detach()[mask.bool()], keep)
    selected = algo.high_entropy_mask(entropy.detach(), mask, threshold)
    loss, _ = algo.per_token_loss(logp, logp.detach(), ADVANTAGES, mask, ref_logp=None, beta=0.0, epsilon_low=0.2,
                                  epsilon_high=0.2, selected=selected)  # fmt: skip
    value = algo.aggregate_loss(loss, mask, loss_type="bnpo", normalizer=float(mask.sum()))
    value = value - coef * algo.entropy_bonus(entropy, selected, normalizer=float(selected.sum()))
    value.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, threshold


@pytest.mark.parametrize("layout", ["padded", "shared_prefix"])
@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_the_trainers_update_gives_the_gradient_of_one_padded_batch(micro_batch_size, layout):
    model = tiny_lm()
    terms = update.EntropyTerms(top_quantile=0.3, coef=0.05)
    got, sums = update_gradients(copy.deepcopy(model), rollout(), terms, micro_batch_size=micro_batch_size,
                                 layout=layout)  # fmt: skip
    want, threshold = by_hand(copy.deepcopy(model), rollout(), 0.3, 0.05)
    assert max(float((got[name] - want[name]).abs().max()) for name in want) < 1e-6
    assert sums["entropy/threshold"] == pytest.approx(threshold, abs=1e-6)
    without, _ = by_hand(copy.deepcopy(model), rollout(), 1.0, 0.0)
    assert max(float((without[name] - want[name]).abs().max()) for name in want) > 1e-4  # the terms change it


# ---------------------------------------------------------------- runs and fields


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2")


def test_a_run_with_the_high_entropy_selection_trains_and_logs_its_threshold(model_path, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = cli_run(capsys, "train", *tiny_run_args(model_path, out, "--max-steps", "2", "--top-entropy-quantile",
                                                      "0.2", "--micro-batch-size", "1"))  # fmt: skip
    assert rc == 0, err
    rows = step_rows(out)
    assert len(rows) == 2
    assert all(r["entropy/threshold"] > 0 and math.isfinite(r["grad_norm"]) for r in rows)
    assert all("policy_loss" not in r for r in rows)


def test_a_run_with_an_entropy_bonus_trains_warns_and_logs_the_entropy_each_step(model_path, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = GRPOTrainer(config(model_path, tmp_path / "run", entropy_coef=0.5, micro_batch_size=2))
    assert any("verl PR #781" in str(w.message) and issubclass(w.category, InputWarning) for w in caught)
    trainer.train()
    rows = step_rows(tmp_path / "run")
    assert len(rows) == 2
    for r in rows:  # loss = policy loss - 0.5 x mean entropy: the bonus is visible in the two figures
        assert r["entropy"] > 0
        assert r["loss"] < r["policy_loss"]
        assert "entropy/threshold" not in r


def test_ppo_takes_the_entropy_terms_too(model_path, tmp_path):
    cfg = PPOConfig(**{**vars(config(model_path, tmp_path / "run")), "entropy_coef": -0.1, "top_entropy_quantile": 0.5,
                       "max_steps": 1})  # fmt: skip
    from grpokit.stages.ppo import PPOTrainer

    PPOTrainer(cfg).train()
    (row,) = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "value_loss" in r]
    assert row["loss"] > row["policy_loss"] and row["entropy/threshold"] > 0  # a negative bonus penalizes entropy


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_entropy_quantile": 1.5}, r"`top_entropy_quantile` must be in \[0, 1\]"),
        ({"top_entropy_quantile": -0.1}, r"`top_entropy_quantile` must be in \[0, 1\]"),
        ({"top_entropy_quantile": math.nan}, r"`top_entropy_quantile` must be a finite number"),
        ({"entropy_coef": math.inf}, r"`entropy_coef` must be a finite number"),
    ],
)
def test_bad_values_are_refused_by_name(fields, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config("model", tmp_path, **fields).validate(model_given=True)


def test_only_a_positive_coefficient_warns(tmp_path):
    for coef, warns in ((0.0, False), (-0.01, False), (0.001, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config("model", tmp_path, entropy_coef=coef).validate(model_given=True)
        assert any("entropy_coef" in str(w.message) for w in caught) == warns, coef


def test_the_trl_adapter_maps_both_fields_and_still_refuses_the_adaptive_coefficient():
    from grpokit.trl import GRPOConfig as TRLConfig

    cfg = TRLConfig(top_entropy_quantile=0.2, entropy_coef=0.01, max_steps=1).to_grpokit()
    assert (cfg.top_entropy_quantile, cfg.entropy_coef) == (0.2, 0.01)
    with pytest.raises(ConfigError, match="`top_entropy_quantile` must be in"):
        TRLConfig(top_entropy_quantile=2.0, max_steps=1).to_grpokit().validate(model_given=True, rows_given=True)
    with pytest.raises(ConfigError, match="use_adaptive_entropy` = True is not supported"):
        TRLConfig(use_adaptive_entropy=True, max_steps=1)


@pytest.mark.parametrize("fused", [True, False])
def test_a_token_of_probability_zero_adds_nothing_to_the_entropy_or_its_gradient(fused):
    """A logit of -inf (a vocabulary entry masked off by its bias) is a probability of 0: it adds 0 to the entropy
    (not 0 x -inf = NaN, which would make the top_entropy_quantile threshold NaN and select no token) and gets no
    NaN gradient; the entropy equals the one over the other entries."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 5)
    with torch.no_grad():
        head.bias[3] = -math.inf
    if not fused:
        head = torch.nn.Sequential(head)  # any other head: the checkpointed path
    hidden = torch.randn(6, 4, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 4, 0, 1])
    logp, entropy = algo.logprobs_from_hidden(hidden, head, ids, temperature=0.8, with_entropy=True,
                                              entropy_grad=True)  # fmt: skip
    assert torch.isfinite(entropy).all() and torch.isfinite(logp).all()
    linear = head if fused else head[0]
    kept = [0, 1, 2, 4]
    logits = ((hidden @ linear.weight.T + linear.bias) / 0.8)[:, kept]
    probs = logits.softmax(-1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(hidden.grad).all()
