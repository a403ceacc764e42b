"""The policy's precision, its optimizer step (clipping sees the trainable gradients only), and the whole-or-absent
folders it is saved into.

bf16 compute keeps float32 master weights and AdamW state: with pure bf16 weights a step at lr 1e-6 moved
0.39% of a real model's weights (a bf16 weight of 0.02 cannot take a change of 1e-6); with master weights
it moves nearly all of them, as float32 does.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import llama, sft_config, with_digit_share

from grpokit.config import GRPOConfig
from grpokit.data.tasks import AdditionTask, build_char_tokenizer, tiny_model
from grpokit.runtime.checkpoint import atomic_folder, list_checkpoints, write_checkpoint
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.setup import stage_policy


def one_step_moved_fraction(dtype: str, tmp_path) -> tuple[float, GRPOTrainer]:
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
    cfg = GRPOConfig(
        output_dir=str(tmp_path / dtype),
        dtype=dtype,
        device="cpu",
        learning_rate=1e-6,
        max_steps=1,
        prompts_per_step=4,
        num_generations=4,
        max_completion_length=6,
        beta=0.04,
        progress=False,
        tensorboard=False,
    )
    trainer = GRPOTrainer(
        cfg, model=model, tokenizer=tokenizer, reward_funcs=with_digit_share(), train_dataset=AdditionTask().rows(8)
    )
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    metrics, _ = trainer.step()
    assert metrics["grad_norm"] > 0
    after = trainer.policy.trainable_parameters()
    moved = sum(int((a != b).sum()) for a, b in zip(after, before))
    return moved / sum(p.numel() for p in before), trainer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_step_at_lr_1e_6_moves_nearly_every_weight(dtype, tmp_path):
    fraction, trainer = one_step_moved_fraction(dtype, tmp_path)
    assert fraction > 0.99, f"{dtype}: one step moved {fraction:.2%} of the trainable weights"
    assert all(p.dtype == torch.float32 for p in trainer.policy.trainable_parameters())  # master weights
    state = trainer.policy.optimizer.state
    assert state and all(v.dtype == torch.float32 for s in state.values() for v in s.values() if v.dim() > 0)
    # the frozen reference is never trained: it is kept in the compute dtype
    assert {p.dtype for p in trainer.policy.ref_model.parameters()} == {getattr(torch, dtype)}
    assert trainer.policy.compute_dtype == getattr(torch, dtype)


def test_bf16_compute_runs_under_autocast_and_stays_near_float32(tmp_path):
    _, trainer = one_step_moved_fraction("bfloat16", tmp_path)
    rows = AdditionTask().rows(4, seed=9)
    metrics, _ = trainer.step(rows)
    # the sampler draws under the same autocast as the trainer's forward, so their logprobs stay close
    # (bf16 rounding: far above fp32's 1e-6, far below a mismatch of models)
    assert 0 < metrics["sampler_logp_diff"] < 0.1


# ---------------------------------------------------------------- whole-or-absent folders


def test_atomic_folder_writes_under_a_hidden_name_and_swaps_in_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-")  # not `model*`, not `checkpoint-*`
        (tmp / "weights").write_text("old")
    assert (target / "weights").read_text() == "old"
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("new")
        assert (target / "weights").read_text() == "old"  # untouched until the new one is complete
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_error_while_writing_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_checkpoints_carry_a_marker_and_only_the_newest_stay(tmp_path):
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step, lambda folder, s=step: (folder / "state").write_text(str(s)), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / "checkpoint-6" / "checkpoint_complete.json").unlink()  # as if its writing had been cut short
    (tmp_path / "checkpoint-8").mkdir()  # a folder of the right name and no marker
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


# ---------------------------------------------------------------- the optimizer step clips the trainable gradients only


def test_optimizer_step_clips_and_reports_the_trainable_gradients_only(tmp_path):
    """Old: SFT and the reward model clipped ALL parameters, so a frozen parameter's stale gradient entered
    the norm (and shrank the trainable gradients' clip factor)."""
    model = llama()
    frozen = model.model.norm.weight  # the final RMSNorm: a parameter of its own, not tied to anything
    frozen.requires_grad_(False)
    cfg = sft_config(tmp_path / "unused", max_grad_norm=1.0)
    policy = stage_policy(model, cfg, total_steps=1, device=torch.device("cpu"), dtype=torch.float32)

    trainable = policy.trainable_parameters()
    assert trainable and all(p is not frozen for p in trainable)
    for i, p in enumerate(trainable):
        p.grad = torch.full_like(p, 0.01 * (i % 3 + 1))
    frozen.grad = torch.full_like(frozen, 100.0)  # stale, far larger than everything trainable together
    frozen_before = frozen.detach().clone()
    expected_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in trainable))
    with_frozen = math.sqrt(expected_norm**2 + float(frozen.grad.double().pow(2).sum()))
    assert expected_norm > cfg.max_grad_norm  # clipping must act, so its factor is observable
    assert with_frozen > 10 * expected_norm

    seen = []  # the trainable gradients AdamW steps with, i.e. after clipping
    policy.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([p.grad.detach().clone() for p in trainable])
    )
    before = [p.detach().clone() for p in trainable]
    grad_norm = policy.optimizer_step()

    assert grad_norm == pytest.approx(expected_norm, rel=1e-5)
    clipped_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in seen[0]))
    assert clipped_norm == pytest.approx(cfg.max_grad_norm, rel=1e-5)  # scaled by max_norm / trainable norm
    assert torch.equal(frozen, frozen_before)
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))  # the step did happen


def test_checkpointing_is_switched_on_by_the_name_transformers_keeps(tmp_path):
    """`gradient_checkpointing: true` checkpoints the decoder layers without transformers' deprecation warning for
    the old method name (which would print on every run), for a policy and for a critic's body alike."""
    import warnings

    from grpokit.model.critic import ValueModel

    tokenizer = build_char_tokenizer()
    cfg = sft_config(tmp_path / "unused", gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        policy = stage_policy(
            tiny_model(tokenizer, "llama", hidden_size=32, seed=0),
            cfg,
            total_steps=1,
            device="cpu",
            dtype=torch.float32,
        )
        critic = ValueModel(tiny_model(tokenizer, "llama", hidden_size=32, seed=0).get_decoder())
        critic.activation_checkpointing_enable()
    for model in (policy.model, critic):
        layers = list(model.get_decoder().layers)
        assert layers and all(layer.gradient_checkpointing for layer in layers)
