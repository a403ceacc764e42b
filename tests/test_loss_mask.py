"""`Rollout.loss_mask`: tokens that are real (attended to, in `completion_mask`) but not trained (0 in the loss
mask: a tool's output or an observation inside a multi-turn completion). The forward reads the real tokens, every
loss and count the trained ones: the logprobs do not move when a span leaves the loss, and the gradient is the one
of a reference built by hand in which those positions contribute nothing, for every loss_type and training
layout, micro-batched or not. PPO's score sits on the last trained token and GAE passes over a hole as one step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import tiny_lm

from grpokit.config import GRPOConfig
from grpokit.core import algo
from grpokit.core.types import Rollout
from grpokit.model.logprobs import completion_logprobs
from grpokit.stages import update
from grpokit.stages.setup import stage_policy

PAD, EOS, BOS = 0, 1, 2
G = 2
PROMPTS = [[BOS, 5, 6], [BOS, 7, 8, 9], [BOS, 12]]
COMPLETIONS = [[14, 15, 16, 17, 18, EOS], [19, 20, 21, 22, EOS], [23, 24, EOS], [25, 26, 27, 28, 29, 30],
               [31, 3, 4, 5, 6, EOS], [7, EOS]]  # fmt: skip
HOLE = slice(1, 3)  # positions 1-2 of every completion of 5 tokens or more: "tool output", attended, not trained


def rollout() -> tuple[Rollout, Rollout]:
    """The same rows without and with a hole in the loss mask (rows p*G .. p*G+G-1 share prompt p)."""
    prompts = [p for p in PROMPTS for _ in range(G)]
    tp, tc = max(map(len, prompts)), max(map(len, COMPLETIONS))
    prompt_ids = torch.tensor([[PAD] * (tp - len(p)) + p for p in prompts])
    prompt_mask = (prompt_ids != PAD).long()
    completion_ids = torch.tensor([c + [PAD] * (tc - len(c)) for c in COMPLETIONS])
    completion_mask = (torch.arange(tc) < torch.tensor([len(c) for c in COMPLETIONS]).unsqueeze(1)).long()
    plain = Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(len(prompts), tc),
                    torch.zeros(len(prompts), dtype=torch.bool), G)  # fmt: skip
    loss_mask = completion_mask.clone()
    long_rows = completion_mask.sum(-1) >= 5
    loss_mask[long_rows, HOLE] = 0
    return plain, dataclasses.replace(plain, loss_mask=loss_mask)


ADVANTAGES = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 0.9])


def policy_gradients(model, cfg: GRPOConfig, batch: Rollout, *, layout: str, micro_batch_size: int | None):
    """The gradient of one on-policy update through what the trainer runs: `Policy` micro-batches in `layout` and
    `update.policy_pass`, the step's normalizer counted over the trained tokens."""
    policy = stage_policy(model, cfg, total_steps=1, device=torch.device("cpu"), dtype=torch.float32, layout=layout,
                          micro_batch_size=micro_batch_size)  # fmt: skip
    mask = batch.trained_mask.float()
    normalizer = algo.step_normalizer(cfg.loss_type, mask, generation_tokens=int(mask.sum()),
                                      generation_sequences=len(mask), max_completion_length=mask.shape[1])  # fmt: skip
    sums = dict.fromkeys((*update.FIGURES, "sampler_logp_diff"), 0.0)
    for idx in policy.micro_batches(batch):
        update.policy_pass(policy, batch, idx, mask, ADVANTAGES, None, None, loss_type=cfg.loss_type,
                           surrogate=cfg.surrogate(), normalizer=normalizer, beta=0.0, first_pass=True,
                           sums=sums)  # fmt: skip
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def reference_gradients(model, cfg: GRPOConfig, batch: Rollout, mask: torch.Tensor):
    """By hand: one padded forward over every row, the surrogate of algo.per_token_loss, aggregated over `mask`."""
    logp, _ = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                  batch.completion_mask, temperature=1.0, layout="padded")  # fmt: skip
    m = mask.float()[:, : logp.shape[1]]
    loss, _ = algo.per_token_loss(logp, logp.detach(), ADVANTAGES, m, ref_logp=None, beta=0.0, loss_type=cfg.loss_type,
                                  **cfg.surrogate())  # fmt: skip
    normalizer = algo.step_normalizer(cfg.loss_type, mask.float(), generation_tokens=int(mask.sum()),
                                      generation_sequences=len(mask), max_completion_length=mask.shape[1])  # fmt: skip
    algo.aggregate_loss(loss, m, loss_type=cfg.loss_type, normalizer=normalizer).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_a_span_out_of_the_loss_leaves_every_logprob_as_it_was():
    """The hole changes what is trained, not what is attended: the tokens after it see the same context."""
    plain, holed = rollout()
    policy = stage_policy(tiny_lm(), GRPOConfig(), total_steps=1, device=torch.device("cpu"), dtype=torch.float32)
    with_span, without_span = policy.logprobs(plain), policy.logprobs(holed)
    assert torch.equal(with_span, without_span)
    after = holed.completion_mask.bool() & ~holed.trained_mask.bool()
    assert after.any() and bool((with_span[:, HOLE.stop :] != 0).any())


@pytest.mark.parametrize("micro_batch_size", [None, 2])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
@pytest.mark.parametrize("loss_type", algo.LOSS_TYPES)
def test_the_gradient_is_the_one_where_the_hole_contributes_nothing(loss_type, layout, micro_batch_size):
    plain, holed = rollout()
    cfg = GRPOConfig(loss_type=loss_type)
    model = tiny_lm()
    got = policy_gradients(copy.deepcopy(model), cfg, holed, layout=layout, micro_batch_size=micro_batch_size)
    want = reference_gradients(copy.deepcopy(model), cfg, holed, holed.trained_mask)
    untouched = reference_gradients(copy.deepcopy(model), cfg, plain, plain.trained_mask)
    largest = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert largest < 1e-6, largest
    assert any(float((want[n] - untouched[n]).abs().max()) > 1e-4 for n in want)  # the hole changes the update


def test_ppo_scores_the_last_trained_token_and_gae_steps_over_a_hole():
    """A row [1, 0, 1, 1, 0] (a hole at 1, padding at 4): the score goes to position 3, not to position
    sum(mask) - 1 = 2; GAE chains 3 -> 2 -> 0, skipping 1, and sets nothing outside the loss."""
    mask = torch.tensor([[1, 0, 1, 1, 0]])
    kl = torch.tensor([[0.1, 0.5, 0.2, 0.3, 0.9]])
    rewards = algo.token_rewards(torch.tensor([2.0]), mask, kl=kl, beta=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, -0.1, 2.0 - 0.15, 0.0]]))
    values = torch.tensor([[0.4, 9.0, -0.3, 0.8, 9.0]])  # 9.0 where no value is a target
    gamma, lam = 0.9, 0.8
    advantages, returns = algo.gae(rewards, values, mask, gamma=gamma, lam=lam)
    r, v = rewards[0], values[0]
    a3 = r[3] + gamma * 0.0 - v[3]
    a2 = r[2] + gamma * v[3] - v[2] + gamma * lam * a3
    a0 = r[0] + gamma * v[2] - v[0] + gamma * lam * a2  # position 1 is passed over: one step from 2 to 0
    expected = torch.tensor([[a0, 0.0, a2, a3, 0.0]])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, (expected + values) * mask, rtol=0, atol=1e-6)


def test_a_loss_mask_the_trainer_cannot_use_is_named():
    from grpokit.rollout.sampler import SamplerError, check_rollout

    plain, holed = rollout()
    check_rollout(holed, "engine", rows=6, prompts=list(PROMPTS))
    padding = holed.loss_mask.clone()
    padding[-1, -1] = 1  # past the row's last real token
    with pytest.raises(SamplerError, match=r"a `loss_mask` that trains tokens outside `completion_mask`"):
        check_rollout(dataclasses.replace(holed, loss_mask=padding), "engine", rows=6)
    with pytest.raises(SamplerError, match=r"`loss_mask` of shape \(6, 3\); expected \(6, 6\)"):
        check_rollout(dataclasses.replace(holed, loss_mask=holed.loss_mask[:, :3]), "engine", rows=6)


def test_the_trainer_trains_on_the_loss_mask_a_sampler_returns(tmp_path):
    """Through GRPOTrainer.sample: the step's mask is the sampler's loss mask, not its real-token mask."""
    from helpers import RecordingSampler, config, save_tiny

    from grpokit.stages.grpo import GRPOTrainer

    class ToolTurns(RecordingSampler):
        def generate(self, *args, **kwargs):
            r = super().generate(*args, **kwargs)
            loss_mask = r.completion_mask.clone()
            loss_mask[r.completion_mask.sum(-1) >= 2, 0] = 0  # the first token: "not the model's"
            return dataclasses.replace(r, loss_mask=loss_mask)

    trainer = GRPOTrainer(config(save_tiny(tmp_path / "tiny"), tmp_path / "out", max_steps=1), sampler=ToolTurns())
    batch = trainer.sample()
    assert batch.rollout.loss_mask is not None and bool(
        (batch.rollout.loss_mask != batch.rollout.completion_mask).any()
    )
    assert torch.equal(batch.mask, batch.rollout.loss_mask.float())
