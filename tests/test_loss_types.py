"""The loss types beyond the clipped surrogate (cispo, sapo, luspo, vespo) and the loss's switches (delta,
off_policy_mask_threshold): each policy term's values and gradients against hand-computed numbers, the on-policy
gradient each gives, their config fields (YAML, command line, TRL's names) and checks, TRL 1.16's own `_compute_loss`
reproduced on random tensors (loss and gradient), and a tiny run of each that trains."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from helpers import cli_run, save_tiny, step_rows, tiny_run_args
from safetensors.torch import load_file

from grpokit.config import ConfigError, GRPOConfig, load_yaml
from grpokit.core import algo
from grpokit.core.types import InputWarning

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def example():
    """tests/test_algo.py's 2 x 3 batch: row 0 (A = 1) has ratios 1.5, 1.0, 0.5 and logp -1, -2, -0.5; row 1 (A = -2)
    ratios 0.7, 1.1 and logp -0.3, -1.2, then a padding token (ratio 3)."""
    logp = t64([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]]).requires_grad_()
    old = logp.detach() - torch.log(t64([[1.5, 1.0, 0.5], [0.7, 1.1, 3.0]]))
    return logp, old, t64([1.0, -2.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])


def loss_and_grad(loss_type, **kw):
    logp, old, a, mask = example()
    kw = {"ref_logp": None, "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.28, **kw}
    loss, stats = algo.per_token_loss(logp, old, a, mask, loss_type=loss_type, **kw)
    (grad,) = torch.autograd.grad(torch.where(mask.bool(), loss, 0.0).sum(), logp)
    return loss, grad, stats, mask


def close(got, want):
    torch.testing.assert_close(got, t64(want), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- each policy term, by hand


def test_cispo_hand_computed():
    loss, grad, stats, mask = loss_and_grad("cispo", epsilon_high=1.2)
    loss = loss.detach()
    # weights sg(min(rho, 1.2)): row 0 1.2 (capped), 1.0, 0.5; row 1 0.7, 1.1. L = -w A logp:
    # row 0: -1.2 * 1 * -1 = 1.2; -1 * -2 = 2; -0.5 * -0.5 = 0.25
    # row 1: -0.7 * -2 * -0.3 = -0.42; -1.1 * -2 * -1.2 = -2.64
    close(loss[0], [1.2, 2.0, 0.25])
    close(loss[1, :2], [-0.42, -2.64])
    # the weight is detached: d L / d logp = -w A exactly (no term through the ratio)
    close(grad, [[-1.2, -1.0, -0.5], [1.4, 2.2, 0.0]])
    assert stats["cispo_clipped"].tolist() == [[1, 0, 0], [0, 0, 0]]  # capped with A > 0 (row 1's padding: A < 0)
    assert stats["clipped_low"].sum() == stats["clipped_high"].sum() == 0  # no hard clip
    # aggregated as dapo: 24 tokens in 8 generated sequences, 2 here -> 6; (1.2 + 2 + 0.25 - 0.42 - 2.64) / 6
    norm = algo.step_normalizer("cispo", mask, generation_tokens=24, generation_sequences=8, max_completion_length=4)
    assert norm == 6.0
    assert float(algo.aggregate_loss(loss, mask, loss_type="cispo", normalizer=norm)) == pytest.approx(0.065, abs=1e-12)


def test_sapo_hand_computed():
    loss, grad, stats, mask = loss_and_grad("sapo")
    loss = loss.detach()
    # f(rho) = 4 / tau * sigmoid(tau (rho - 1)), L = -f A; tau = 1 for row 0 (A > 0), 1.05 for row 1:
    # row 0: -4 s(0.5) = -2.48983732480742, -4 s(0) = -2, -4 s(-0.5) = -1.51016267519258
    # row 1: 2 * 4 / 1.05 * s(-0.315) = 3.21443632088145, 2 * 4 / 1.05 * s(0.105) = 4.00934026188243
    close(loss[0], [-2.4898373248074184, -2.0, -1.5101626751925816])
    close(loss[1, :2], [3.2144363208814535, 4.0093402618824285])
    # d L / d logp = -f'(rho) rho A, f' = 4 s (1 - s): at rho = 1, -A (GRPO's); row 0: -4 s(.5) s(-.5) 1.5 = -1.41002
    close(grad[0], [-1.410022273209567, -1.0, -0.470007424403189])
    close(grad[1, :2], [1.365837606538092, 2.193947374762951])
    assert stats["clipped_low"].sum() == stats["clipped_high"].sum() == 0
    # aggregated as grpo: the mean of the 2 per-sequence means
    expected = (
        (-2.4898373248074184 - 2.0 - 1.5101626751925816) / 3 + (3.2144363208814535 + 4.0093402618824285) / 2
    ) / 2
    norm = algo.step_normalizer("sapo", mask, generation_tokens=24, generation_sequences=8, max_completion_length=4)
    assert norm == 2.0
    assert float(algo.aggregate_loss(loss, mask, loss_type="sapo", normalizer=norm)) == pytest.approx(
        expected, abs=1e-12
    )


def test_luspo_sums_each_sequence_and_averages_the_sequences():
    logp, old, a, mask = example()
    kw = {"ref_logp": None, "beta": 0.0, "epsilon_low": 0.1, "epsilon_high": 0.28, "importance_level": "sequence"}
    loss, _ = algo.per_token_loss(logp, old, a, mask, loss_type="luspo", **kw)
    # GSPO's ratios (tests/test_algo.py): rho_0 = 0.75^(1/3) = 0.90856 (inside [0.9, 1.28]) -> L = -rho_0 on its 3
    # tokens; rho_1 = sqrt(0.77) = 0.87750 < 0.9 with A = -2: clipped -> L = 0.9 * 2 = 1.8 on its 2 tokens
    rho0 = 0.75 ** (1 / 3)
    norm = algo.step_normalizer("luspo", mask, generation_tokens=24, generation_sequences=8, max_completion_length=4)
    assert norm == 2.0  # sequences with a token
    value = algo.aggregate_loss(loss, mask, loss_type="luspo", normalizer=norm)
    assert value.item() == pytest.approx((3 * -rho0 + 2 * 1.8) / 2, abs=1e-12)  # 0.43716; grpo's: (-rho0 + 1.8) / 2
    (grad,) = torch.autograd.grad(value, logp)
    # d/dlogp_t of -3 rho_0 / 2 with rho_0 = exp(mean_t of the log ratio): -3 rho_0 / 3 / 2 = -rho_0 / 2 per token
    # (grpo's is a third of that: the length weighs in); row 1 is clipped: no gradient
    close(grad, [[-rho0 / 2] * 3, [0.0, 0.0, 0.0]])


PHI0 = 0.75**2 * math.exp(3 * (1 - 0.75))  # row 0: w = 1.5 * 1 * 0.5, A >= 0: k = 2, lambda = 3 -> 1.19081250934463
PHI1 = 0.77**3 * math.exp(2 * (1 - 0.77))  # row 1: w = 0.7 * 1.1 (padding left out), A < 0: k = 3, lambda = 2


def test_vespo_hand_computed():
    loss, grad, stats, _ = loss_and_grad("vespo")
    loss = loss.detach()
    assert pytest.approx((1.1908125093446296, 0.7231820485914858), abs=1e-15) == (PHI0, PHI1)
    # L = -phi A logp: row 0: phi0 * (-1, -2, -0.5) * -1; row 1: -phi1 * -2 * (-0.3, -1.2)
    close(loss[0], [PHI0, 2 * PHI0, 0.5 * PHI0])
    close(loss[1, :2], [-0.6 * PHI1, -2.4 * PHI1])
    close(grad, [[-PHI0] * 3, [2 * PHI1, 2 * PHI1, 0.0]])  # phi is detached: -phi A
    close(stats["vespo_phi"], [[PHI0] * 3, [PHI1] * 3])


def test_vespo_folds_the_sampler_correction_into_its_weight_and_zeroes_an_overflow():
    logp, old, a, mask = example()
    weight = t64([[1.0, 2.0, 1.0], [0.0, 1.0, 1.0]])  # row 0: a token weighed 2; row 1: a token dropped (mask mode)
    kw = {"ref_logp": None, "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.28, "sampler_weight": weight}
    loss, stats = algo.per_token_loss(logp, old, a, mask, loss_type="vespo", **kw)
    # row 0: w = 0.75 * 2 = 1.5 -> phi = 1.5^2 e^(3 (1 - 1.5)) = 2.25 e^-1.5 = 0.50204; the loss is -phi A logp with
    # no second factor of the weight. row 1: the dropped token's log weight is bounded at ln 1e-8: w = 7.7e-9, phi ~ 0
    phi0 = 2.25 * math.exp(-1.5)
    close(stats["vespo_phi"][0], [phi0] * 3)
    close(loss[0], [phi0, 2 * phi0, 0.5 * phi0])
    w1 = 0.77e-8
    assert float(stats["vespo_phi"][1, 0]) == pytest.approx(w1**3 * math.exp(2 * (1 - w1)), rel=1e-9)
    # a sequence ratio of e^30 is bounded at e^20, and e^(lambda + k 20 - lambda e^20) underflows to 0
    far = algo.vespo_weights(
        t64([[30.0]]), t64([[1.0]]), torch.ones(1, 1), k_pos=2, lambda_pos=3, k_neg=3, lambda_neg=2
    )
    assert far.item() == 0.0


def test_delta_caps_the_unclipped_ratio_of_negative_advantages():
    ratio = t64([2.0, 1.2, 0.5]).requires_grad_()
    neg = t64([-1.0, -1.0, -1.0])
    # A = -1: L = max(rho, clip(rho, 0.8, 1.2)) -> 2.0, 1.2, 0.8; with delta 1.5: max(min(rho, 1.5), clip) -> 1.5
    plain = algo.clipped_surrogate(ratio, neg, epsilon_low=0.2, epsilon_high=0.2)
    capped = algo.clipped_surrogate(ratio, neg, epsilon_low=0.2, epsilon_high=0.2, delta=1.5)
    close(plain.detach(), [2.0, 1.2, 0.8])
    close(capped.detach(), [1.5, 1.2, 0.8])
    (g_plain,) = torch.autograd.grad(plain.sum(), ratio)
    (g_capped,) = torch.autograd.grad(capped.sum(), ratio)
    close(g_plain, [1.0, 1.0, 0.0])
    close(g_capped, [0.0, 1.0, 0.0])  # the capped token stops pushing
    # A = +1: -min(min(rho, 1.5), clip(rho)) = -1.2 at rho = 2, as without delta (delta > 1 + eps_high)
    pos = algo.clipped_surrogate(ratio, -neg, epsilon_low=0.2, epsilon_high=0.2, delta=1.5)
    close(pos.detach(), [-1.2, -1.2, -0.5])
    logp, old, a, mask = example()
    with pytest.raises(ValueError, match=r"delta=1.5 .*loss_type='sapo' has none"):
        algo.per_token_loss(logp, old, a, mask, ref_logp=None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                            loss_type="sapo", delta=1.5)  # fmt: skip


def test_off_policy_mask_drops_negative_advantage_rows_that_drifted():
    logp = torch.zeros(5, 2, dtype=F64)
    sampling = t64([[1.0, 1.0], [0.5, 0.1], [0.3, 0.1], [float("nan"), 0.6], [0.2, 5.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]])
    adv = t64([[1.0], [-1.0], [-1.0], [-1.0], [-1.0]])
    # mean log q - log pi over the loss tokens: 1.0 (A > 0: kept), 0.3 > 0.25 (dropped), 0.2 (kept),
    # (0 for the NaN + 0.6) / 2 = 0.3 (dropped), 0.2 (the masked 5.0 left out: kept)
    keep = algo.off_policy_keep(adv, logp, sampling, mask, threshold=0.25)
    close(keep, [[1.0], [0.0], [1.0], [0.0], [1.0]])
    # in the loss: a dropped row keeps only its KL term (beta 0.5, k3 of d = ref - logp = 0.1: e^0.1 - 1.1)
    ref = torch.full((5, 2), 0.1, dtype=F64)
    kw = {"ref_logp": ref, "beta": 0.5, "epsilon_low": 0.2, "epsilon_high": 0.2, "sampling_logp": sampling}
    loss, stats = algo.per_token_loss(logp, logp.clone(), adv[:, 0], mask, off_policy_mask_threshold=0.25, **kw)
    kl = 0.5 * (math.exp(0.1) - 1.1)
    close(loss[:, 0], [-1.0 + kl, kl, 1.0 + kl, kl, 1.0 + kl])
    close(stats["off_policy_dropped"][:, 0], [0.0, 1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="off_policy_mask_threshold=0.25 needs sampling_logp"):
        algo.per_token_loss(logp, logp, adv[:, 0], mask, ref_logp=None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                            off_policy_mask_threshold=0.25)  # fmt: skip


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "vespo"])
def test_on_policy_every_new_loss_has_the_policy_gradient_of_grpo(loss_type):
    """rho = 1: CISPO's weight min(1, cap) = 1 (cap >= 1), SAPO's gate slope f'(1) = 1, VESPO's phi(1) = 1, LUSPO's
    unclipped surrogate: each token's gradient is -A_i, the policy gradient."""
    logp = t64([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]]).requires_grad_()
    a, mask = t64([1.0, -2.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    kw = {"ref_logp": None, "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 1.28}
    loss, stats = algo.per_token_loss(logp, logp.detach(), a, mask, loss_type=loss_type, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    close(grad, [[-1.0] * 3, [2.0] * 3])
    if loss_type == "vespo":
        close(stats["vespo_phi"], [[1.0] * 3, [1.0] * 3])


# ---------------------------------------------------------------- config: fields, checks, TRL's names


def grpo(**overrides) -> GRPOConfig:
    return GRPOConfig(**{"model": "some/path", "task": "addition", **overrides})


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        ({"delta": 1.0}, "delta", "must be > 1"),
        ({"delta": 4.0, "loss_type": "sapo"}, "delta", "loss_type 'sapo' has no clipped surrogate"),
        ({"delta": float("nan")}, "delta", "must be a finite number"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg", "must be > 0"),
        ({"vespo_lambda_pos": -1.0}, "vespo_lambda_pos", "must be > 0"),
        ({"vespo_k_neg": -0.5}, "vespo_k_neg", "must be >= 0"),
        ({"off_policy_mask_threshold": 0.0}, "off_policy_mask_threshold", "must be > 0"),
        ({"off_policy_mask_threshold": float("inf")}, "off_policy_mask_threshold", "must be a finite number"),
        ({"loss_type": "ppo"}, "loss_type", "'cispo', 'sapo', 'luspo', 'vespo'"),
    ],
)
def test_a_bad_loss_setting_is_named(overrides, field, detail):
    with pytest.raises(ConfigError) as err:
        grpo(**overrides).validate()
    assert f"`{field}`" in str(err.value) and detail in str(err.value)


def test_vespo_refuses_a_sequence_level_vllm_correction():
    with pytest.raises(ConfigError, match=r"`vllm_importance_sampling_mode` is 'sequence_mask', but loss_type vespo"):
        grpo(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="sequence_mask").validate()
    grpo(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="token_truncate").validate()


def said(**overrides) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grpo(**overrides).validate()
    return [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"loss_type": "luspo"}, "luspo is LUSPO with importance_level: sequence"),
        ({"loss_type": "vespo", "importance_level": "sequence"}, "vespo computes its own sequence weight"),
        ({"loss_type": "dapo", "importance_level": "sequence"}, "weighs each sequence by its length"),
        ({"loss_type": "cispo"}, "caps each token's weight at epsilon_high = 0.2"),
        ({"delta": 1.1}, "delta = 1.1 is not above 1 + epsilon_high"),
        ({"vespo_k_pos": 1.0}, "vespo_k_pos set, but only loss_type vespo reads them (it is grpo)"),
    ],
)
def test_trls_warnings_and_settings_that_do_nothing_are_said(overrides, warning):
    assert any(warning in text for text in said(**overrides)), said(**overrides)


def test_the_recommended_setups_warn_nothing():
    assert said(loss_type="luspo", importance_level="sequence", delta=4.0) == []
    assert said(loss_type="cispo", epsilon_high=5.0, off_policy_mask_threshold=0.5) == []
    assert said(loss_type="sapo", sapo_temperature_pos=0.9) == []


def test_yaml_sets_the_fields_and_the_surrogate_hands_them_to_the_loss(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nloss_type: vespo\nvespo_k_pos: 1.5\noff_policy_mask_threshold: 0.5\n")
    cfg = load_yaml(GRPOConfig, path)
    assert (cfg.loss_type, cfg.vespo_k_pos, cfg.off_policy_mask_threshold) == ("vespo", 1.5, 0.5)
    surrogate = cfg.surrogate()
    assert (surrogate["vespo_k_pos"], surrogate["off_policy_mask_threshold"], surrogate["delta"]) == (1.5, 0.5, None)
    logp, old, a, mask = example()
    algo.per_token_loss(logp, old, a, mask, ref_logp=None, beta=0.0, loss_type="vespo", sampling_logp=old, **surrogate)


def test_the_trl_adapter_maps_the_loss_types_and_switches_with_trls_defaults():
    from grpokit.trl import GRPOConfig as TRLConfig

    cfg = TRLConfig(loss_type="sapo", sapo_temperature_neg=2.0, off_policy_mask_threshold=0.5, max_steps=1).to_grpokit(
        world_size=1
    )
    assert (cfg.loss_type, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg) == ("sapo", 1.0, 2.0)
    assert (cfg.off_policy_mask_threshold, cfg.delta) == (0.5, None)
    assert (cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)
    cfg = TRLConfig(loss_type="cispo", epsilon_high=5.0, max_steps=1).to_grpokit(world_size=1)
    assert (cfg.loss_type, cfg.epsilon_high) == ("cispo", 5.0)
    cfg = TRLConfig(loss_type="luspo", importance_sampling_level="sequence", delta=4.0, max_steps=1).to_grpokit(
        world_size=1
    )
    assert (cfg.loss_type, cfg.importance_level, cfg.delta) == ("luspo", "sequence", 4.0)


# ---------------------------------------------------------------- TRL 1.16's own loss, reproduced


def trl_loss(loss_type, inputs, logp, *, level, beta, delta, threshold, vllm, **args):
    """TRL's `GRPOTrainer._compute_loss` on `inputs`, with the per-token logprobs `logp` (a leaf) in place of its
    model's: a stand-in `self` holding what the method reads (one process, one accumulation step, one step per
    generation batch, training)."""
    trl = pytest.importorskip("trl")
    trainer = trl.GRPOTrainer
    n, t = logp.shape

    class Metrics(dict):
        def __missing__(self, key):
            self[key] = []
            return self[key]

    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros(n, t, dtype=logp.dtype), None),
        get_off_policy_mask=trainer.get_off_policy_mask,
        get_gamma_weights=trainer.get_gamma_weights,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        _entropy_bonus_enabled=False,
        off_policy_mask_threshold=threshold,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=args.pop("epsilon_high", 0.28),
        use_vllm=vllm,
        vllm_importance_sampling_correction=vllm,
        max_completion_length=t,
        current_gradient_accumulation_steps=1,
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _metrics={"train": Metrics()},
        args=types.SimpleNamespace(
            use_bias_correction_kl=True,
            delta=delta,
            steps_per_generation=1,
            sapo_temperature_pos=1.0,
            sapo_temperature_neg=1.05,
            vespo_k_pos=2.0,
            vespo_lambda_pos=3.0,
            vespo_k_neg=3.0,
            vespo_lambda_neg=2.0,
        ),  # fmt: skip
    )
    return trainer._compute_loss(fake, None, inputs), fake._metrics["train"]


def parity_tensors(seed=0, n=6, t=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])  # every row has a token (TRL's means count empty rows as well)
    mask = (torch.arange(t) < lengths[:, None]).long()  # (n, t)
    logp = -torch.rand(n, t, generator=g, dtype=F64) * 3  # (n, t)
    old = logp + 0.3 * torch.randn(n, t, generator=g, dtype=F64)
    sampling = old + 0.3 * torch.randn(n, t, generator=g, dtype=F64)
    ref = logp + 0.2 * torch.randn(n, t, generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64)
    return logp, old, sampling, ref, adv, mask


PARITY_CASES = {
    **{name: {"loss_type": name} for name in algo.LOSS_TYPES},
    "cispo-capped": {"loss_type": "cispo", "epsilon_high": 1.1},
    "luspo-sequence": {"loss_type": "luspo", "level": "sequence"},
    "grpo-delta": {"loss_type": "grpo", "delta": 1.1},
    "dapo-delta": {"loss_type": "dapo", "delta": 1.1},
    "grpo-off-policy": {"loss_type": "grpo", "threshold": 0.02},
    "cispo-off-policy": {"loss_type": "cispo", "threshold": 0.02},
    "vespo-off-policy": {"loss_type": "vespo", "threshold": 0.02},
    "vespo-vllm-correction": {"loss_type": "vespo", "vllm": True},
    "sapo-vllm-correction": {"loss_type": "sapo", "vllm": True},
}


def grpokit_and_trl(case: dict):
    """(grpokit's loss, TRL's, grpokit's gradient w.r.t. the logprobs, TRL's, TRL's logged figures) for a case of
    `PARITY_CASES`, on float64 random tensors with beta = 0.04 and TRL's bias-corrected KL."""
    loss_type, level = case["loss_type"], case.get("level", "token")
    delta, threshold, vllm = case.get("delta"), case.get("threshold"), case.get("vllm", False)
    epsilon_high = case.get("epsilon_high", 0.28)
    logp, old, sampling, ref, adv, mask = parity_tensors()
    weight = None
    if vllm:  # the engine-vs-trainer correction's token weights, handed to both
        weight = algo.sampler_correction(old, sampling, mask, mode="token_truncate", clip_min=None, clip_max=1.2)
        weight = weight.to(F64)  # (float32 from the correction: TRL would take its log in float32)
    n, t = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "sampling_per_token_logps": sampling, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    if weight is not None:
        inputs["importance_sampling_ratio"] = weight
    trl_leaf = logp.clone().requires_grad_()
    theirs, figures = trl_loss(loss_type, inputs, trl_leaf, level=level, beta=0.04, delta=delta, threshold=threshold,
                               vllm=vllm, epsilon_high=epsilon_high)  # fmt: skip
    ours_leaf = logp.clone().requires_grad_()
    token_loss, _ = algo.per_token_loss(
        ours_leaf, old, adv, mask, ref_logp=ref, beta=0.04, epsilon_low=0.2, epsilon_high=epsilon_high,
        importance_level=level, kl_importance_weight=True, loss_type=loss_type, delta=delta,
        off_policy_mask_threshold=threshold, sampling_logp=sampling, sampler_weight=weight,
    )  # fmt: skip
    norm = algo.step_normalizer(
        loss_type, mask, generation_tokens=int(mask.sum()), generation_sequences=n, max_completion_length=t
    )
    ours = algo.aggregate_loss(token_loss, mask, loss_type=loss_type, normalizer=norm)
    (g_theirs,) = torch.autograd.grad(theirs, trl_leaf)
    (g_ours,) = torch.autograd.grad(ours, ours_leaf)
    return ours.detach(), theirs.detach(), g_ours, g_theirs, figures


def relative_gap(ours, theirs) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("case", PARITY_CASES)
def test_each_loss_type_and_switch_equals_trls_own_loss_and_gradient(case):
    ours, theirs, g_ours, g_theirs, figures = grpokit_and_trl(PARITY_CASES[case])
    assert theirs.abs() > 1e-3 and g_theirs.abs().max() > 1e-3  # a case with something to compare
    # float64 throughout; TRL builds sapo's temperatures in float32 (1.05 -> 1.0499999523), hence up to ~3e-7 there,
    # ~1e-15 elsewhere
    assert relative_gap(ours, theirs) < 1e-6
    assert relative_gap(g_ours, g_theirs) < 1e-6
    if "delta" in PARITY_CASES[case]:  # the cap binds (it would not if every ratio stayed below it)
        without = grpokit_and_trl({**PARITY_CASES[case], "delta": None})
        assert relative_gap(without[2], g_ours) > 1e-3
    if "threshold" in PARITY_CASES[case]:  # the mask drops something
        without = grpokit_and_trl({**PARITY_CASES[case], "threshold": None})
        assert relative_gap(without[2], g_ours) > 1e-3
    if case == "cispo-capped":
        assert 0 < figures["cispo_clip_ratio"][0] < 1


# ---------------------------------------------------------------- a tiny run of each


RUNS = {
    "cispo": ["--epsilon-high", "1.1", "--off-policy-mask-threshold", "0.001"],
    "sapo": [],
    "luspo": ["--importance-level", "sequence", "--delta", "4"],
    "vespo": [],
}
FIGURE = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean"}


@pytest.mark.parametrize("loss_type", RUNS)
def test_a_tiny_run_of_each_loss_type_trains(loss_type, tmp_path, capsys):
    """Two steps from the command line, mu = 2 (the second pass is off-policy): the weights move, and the loss type's
    figures are logged."""
    model = save_tiny(tmp_path / "init")
    out = tmp_path / "run"
    args = tiny_run_args(
        model, out, "--max-steps", "2", "--num-generations", "4", "--num-iterations", "2", "--reward-funcs",
        "helpers:digit_share", "--loss_type", loss_type, *RUNS[loss_type],
    )  # fmt: skip
    rc, err = cli_run(capsys, "train", *args)
    assert rc == 0, err[-3000:]
    before, after = load_file(model / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-5
    rows = step_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    if loss_type in FIGURE:
        assert all(FIGURE[loss_type] in r for r in rows)
    if "--off-policy-mask-threshold" in RUNS[loss_type]:
        assert all(0 <= r["off_policy_mask/masked_fraction"] <= 1 for r in rows)
