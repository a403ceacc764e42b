"""The GRPO trainer end to end on tiny saved models: what a run leaves on disk, data sources (text, chat
messages, `datasets` folders), errors that name the field or the sample (invariant 9), micro-batching
(invariant 4), the reference model and the on-policy identity (invariant 1), pad == eos (invariant 3),
the signal monitor, and SFT; rows handed in without a task or data file, a step's count of flat groups over
scorable rows, and the Python API given a model path, a `datasets` object and a function, recorded in config.yaml."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    HIDDEN,
    STEP_KEYS,
    RecordingSampler,
    config,
    digit_share,
    llama,
    module_level_reward,
    read_jsonl,
    save_tiny,
    step_rows,
    text_rows,
    with_digit_share,
)

import grpokit.core.algo
from grpokit.config import ConfigError, SFTConfig
from grpokit.data.rows import DataError
from grpokit.data.tasks import AdditionTask, build_char_tokenizer, tiny_model
from grpokit.report.monitor import SignalMonitor
from grpokit.rewards.functions import RewardError
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.sft import train_sft

# ---------------------------------------------------------------- a run from a saved checkpoint


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_train_from_saved_checkpoint_writes_the_run(tmp_path, arch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "init", arch)
    initial = AutoModelForCausalLM.from_pretrained(path).state_dict()
    out = tmp_path / "run"
    cfg = config(path, out, tensorboard=True, num_eval_prompts=4)
    trainer = GRPOTrainer(cfg, reward_funcs=with_digit_share())
    result = trainer.train()

    rows = step_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        missing = [k for k in STEP_KEYS if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert all(math.isfinite(row[k]) for k in STEP_KEYS)
        assert 0 <= row["rewards/accuracy/mean"] <= 1 and 0 <= row["frac_reward_zero_std"] <= 1
        assert 1 <= row["completions/mean_length"] <= cfg.max_completion_length
        assert 0 <= row["completions/clipped_ratio"] <= 1
        assert row["learning_rate"] == pytest.approx(cfg.learning_rate)
        assert row["grad_norm"] > 0  # the graded reward gives every group a spread
        assert row["sampler_logp_diff"] < 1e-4  # invariant 6 inside the loop (fp32)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy_greedy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert [h["step"] for h in result.eval_history] == [0, 2]
    assert result.final_metrics["reward"] == rows[-1]["reward"]

    # the final model loads with plain transformers and is not the initial one
    assert result.model_dir == out / "model"
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert type(loaded).__name__.lower().startswith(arch)
    final = loaded.state_dict()
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    for name, value in trainer.policy.model.state_dict().items():
        assert torch.equal(final[name], value), name  # what was saved is what was trained

    assert (out / "curves.png").stat().st_size > 0 and result.plot_path == out / "curves.png"
    samples = read_jsonl(out / "completions.jsonl")
    assert samples and {s["step"] for s in samples} == {1}  # log_completions_every=10: step 1 only
    assert all({"prompt", "completion", "reward", "advantage"} <= s.keys() for s in samples)
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["max_steps"] == 2 and saved_cfg["model"] == str(path)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("reward")] == [1, 2]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_loaded_from_a_model_folder_encodes_like_the_original(tmp_path, arch):
    """transformers 5 maps model type qwen2 to its own tokenizer class, which rebuilt the char tokenizer's
    pre-tokenizer and dropped spaces and newlines; the trainer must load the folder's tokenizer as saved."""
    path = save_tiny(tmp_path / arch, arch, pad_equals_eos=True)
    trainer = GRPOTrainer(config(path, tmp_path / "run"))
    original = build_char_tokenizer(pad_equals_eos=True)
    text = "user: 12 + 34\nassistant: 046"
    assert trainer.tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert trainer.tokenizer.decode(original(text)["input_ids"]) == text
    assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id == original.eos_token_id
    assert trainer.tokenizer.padding_side == "left"


def test_chat_messages_from_jsonl_use_the_chat_template(tmp_path, qwen2_path):
    questions = ["12+34=", "50+07=", "99+01=", "23+45="]
    answers = ["046", "057", "100", "068"]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": [{"role": "user", "content": q}], "answer": a}) for q, a in zip(questions, answers)
        )
        + "\n"
    )
    sampler = RecordingSampler()
    out = tmp_path / "run"
    GRPOTrainer(config(qwen2_path, out, train_data=str(data), log_completions_every=1), sampler=sampler).train()
    rollouts = sampler.rollouts

    assert [r["step"] for r in step_rows(out)] == [1, 2]
    prompts = {s["prompt"] for s in read_jsonl(out / "completions.jsonl")}
    # 2 steps x 2 prompts walk the 4 rows once: every rendered prompt was logged
    assert prompts == {f"user: {q}\nassistant: " for q in questions}
    assert "user: 12+34=\nassistant: " in prompts
    # the tokens fed to the model are the template's, with no extra special token in front
    tokenizer = build_char_tokenizer()
    fed = {
        tokenizer.decode(ids[mask.bool()].tolist()) for r in rollouts for ids, mask in zip(r.prompt_ids, r.prompt_mask)
    }
    assert fed == prompts


def test_datasets_folder_as_train_data(tmp_path, qwen2_path):
    from datasets import Dataset

    rows = AdditionTask().rows(6, seed=5)
    folder = tmp_path / "ds"
    Dataset.from_list(rows).save_to_disk(str(folder))
    out = tmp_path / "run"
    trainer = GRPOTrainer(config(qwen2_path, out, train_data=str(folder)))
    assert trainer.train_rows == rows
    trainer.train()
    assert [r["step"] for r in step_rows(out)] == [1, 2]
    logged = {s["prompt"] for s in read_jsonl(out / "completions.jsonl")}
    assert logged and logged <= {r["prompt"] for r in rows}


# ---------------------------------------------------------------- errors name the field or the sample


def test_missing_prompt_column_names_column_and_row(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "02"}\n{"question": "2+2=", "answer": "04"}\n')
    with pytest.raises(DataError) as err:
        GRPOTrainer(config(tmp_path / "no-model", tmp_path / "run", train_data=str(data)))
    assert "row 1" in str(err.value) and "'prompt'" in str(err.value)


def test_a_row_missing_a_column_the_others_have_is_named(tmp_path):
    # reward functions receive every column for every completion, so a ragged data set fails up front
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "02", "level": 1}\n{"prompt": "2+2=", "answer": "04"}\n')
    with pytest.raises(DataError, match=r"train.jsonl, row 1 \(line 2\) lacks 'level'"):
        GRPOTrainer(config(tmp_path / "m", tmp_path / "run", train_data=str(data)))


def test_custom_prompt_column_is_the_one_checked(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "02"}\n')
    with pytest.raises(DataError, match=r"row 0 \(line 1\) has no column 'question'"):
        GRPOTrainer(config(tmp_path / "m", tmp_path / "run", train_data=str(data), prompt_column="question"))


def test_accuracy_reward_needs_an_answer_column(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n')
    with pytest.raises(DataError) as err:
        GRPOTrainer(config(tmp_path / "m", tmp_path / "run", train_data=str(data)))
    assert "'answer'" in str(err.value) and "accuracy" in str(err.value) and "row 0" in str(err.value)


def test_missing_train_data_file_names_the_field(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError) as err:
        GRPOTrainer(config(tmp_path / "m", tmp_path / "run", train_data=str(missing)))
    assert "`train_data`" in str(err.value) and str(missing) in str(err.value)


def test_nonexistent_model_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(FileNotFoundError) as err:
        GRPOTrainer(config(missing, tmp_path / "run"))
    assert str(missing) in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"num_generations": 1}, "num_generations"), ({"loss_type": "ppo"}, "loss_type")],
)
def test_bad_config_fails_in_the_trainer_constructor(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        GRPOTrainer(config(tmp_path / "m", tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_raising_reward_stops_train_at_step_1_naming_it(tmp_path, qwen2_path):
    calls = []

    def broken(prompts, completions, **_):
        calls.append(len(completions))
        raise KeyError("no such field")

    out = tmp_path / "run"
    trainer = GRPOTrainer(config(qwen2_path, out), reward_funcs=[("broken_reward", broken)])
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    with pytest.raises(RewardError) as err:
        trainer.train()
    assert "`broken_reward`" in str(err.value) and "KeyError" in str(err.value)
    assert calls == [8]  # the first generation batch: P * G = 2 * 4
    assert step_rows(out) == []  # nothing logged for the failed step, no model written
    assert not (out / "model").exists()
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.model.state_dict().items())


def test_nan_reward_names_the_sample(tmp_path, qwen2_path):
    def nan_at_3(prompts, completions, **_):
        return [float("nan") if i == 3 else 1.0 for i in range(len(completions))]

    trainer = GRPOTrainer(config(qwen2_path, tmp_path / "run"), reward_funcs=[("nan_reward", nan_at_3)])
    with pytest.raises(RewardError) as err:
        trainer.train()
    assert "`nan_reward`" in str(err.value) and "sample 3" in str(err.value)


# ---------------------------------------------------------------- micro-batching (invariant 4), end to end


def one_step(base, rows, **overrides):
    """A fresh trainer on a copy of `base`: one step on `rows`; returns (trainer, metrics, grads, rollout), the
    grads as AdamW sees them at each optimizer step (after clipping)."""
    sampler = RecordingSampler()
    cfg = config(
        "in-memory", Path("unused"), max_steps=1, prompts_per_step=4, num_generations=4, learning_rate=1e-4, **overrides
    )
    trainer = GRPOTrainer(
        cfg,
        model=copy.deepcopy(base),
        tokenizer=build_char_tokenizer(),
        reward_funcs=with_digit_share(),
        sampler=sampler,
    )
    grads = []
    params = list(trainer.policy.model.parameters())
    trainer.policy.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: grads.append([p.grad.detach().clone() for p in params])
    )
    metrics, _ = trainer.step(rows)
    return trainer, metrics, grads, sampler.rollouts[-1]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize(
    "schedule",
    [{}, {"minibatch_size": 8, "num_iterations": 2}],
    ids=["one-optimizer-step", "minibatches-x2-iterations"],
)
def test_micro_batches_give_the_same_update(loss_type, schedule):
    tokenizer = build_char_tokenizer()
    base = tiny_model(tokenizer, "llama", hidden_size=HIDDEN, seed=1)
    rows = AdditionTask().rows(4, seed=7)
    whole, m_whole, g_whole, r_whole = one_step(base, rows, loss_type=loss_type, **schedule)
    micro, m_micro, g_micro, r_micro = one_step(base, rows, loss_type=loss_type, micro_batch_size=2, **schedule)

    # the same seed gives the same rollout, so any difference below comes from the update
    assert torch.equal(r_whole.completion_ids, r_micro.completion_ids)
    assert torch.equal(r_whole.completion_mask, r_micro.completion_mask)
    assert r_whole.completion_mask.sum(-1).unique().numel() > 1  # rows of different lengths: padding matters

    n_steps = 2 * 2 if schedule else 1
    assert len(g_whole) == len(g_micro) == n_steps
    assert m_whole["grad_norm"] > 0
    assert m_micro["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-5)
    assert m_micro["loss"] == pytest.approx(m_whole["loss"], rel=1e-4, abs=1e-6)
    for step_whole, step_micro in zip(g_whole, g_micro):
        for a, b in zip(step_whole, step_micro):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-6)

    moved = max((p - q).abs().max().item() for p, q in zip(whole.policy.model.parameters(), base.parameters()))
    assert moved > 5e-5  # the update is far larger than the tolerance below
    for (name, a), b in zip(whole.policy.model.named_parameters(), micro.policy.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize(
    "forward",
    [
        {"training_forward": "packed"},
        {"training_forward": "shared_prefix"},
        {"training_forward": "shared_prefix", "max_tokens_per_micro_batch": 40},  # several micro-batches
    ],
    ids=["packed", "shared-prefix", "shared-prefix-token-budget"],
)
def test_training_forwards_give_the_same_update(loss_type, forward):
    """The packed and shared-prefix forwards (with KL to a reference and mu = 2 passes, so the old-policy and
    reference passes run through them too) give the padded forward's gradients at every optimizer step."""
    tokenizer = build_char_tokenizer()
    base = tiny_model(tokenizer, "qwen2", hidden_size=HIDDEN, seed=2)
    rows = AdditionTask().rows(4, seed=8)
    schedule = {"loss_type": loss_type, "beta": 0.1, "minibatch_size": 8, "num_iterations": 2}
    padded, m_padded, g_padded, r_padded = one_step(base, rows, training_forward="padded", **schedule)
    other, m_other, g_other, r_other = one_step(base, rows, **forward, **schedule)
    assert torch.equal(r_padded.completion_ids, r_other.completion_ids)
    assert r_padded.completion_mask.sum(-1).unique().numel() > 1  # rows of different lengths: padding matters
    if "max_tokens_per_micro_batch" in forward:
        assert all(len(other.policy.micro_batches(r_other, torch.arange(8 * k, 8 * k + 8))) > 1 for k in range(2))
    assert m_padded["grad_norm"] > 0 and m_padded["kl"] > 0
    for key in ("grad_norm", "loss", "kl", "entropy"):
        assert m_other[key] == pytest.approx(m_padded[key], rel=1e-4, abs=1e-6), key
    assert len(g_padded) == len(g_other) == 4
    for step_padded, step_other in zip(g_padded, g_other):
        for a, b in zip(step_padded, step_other):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-6)
    for (name, a), b in zip(padded.policy.model.named_parameters(), other.policy.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- reference model and on-policy identity


def test_beta_loads_a_frozen_reference_and_kl_starts_at_zero(tmp_path, qwen2_path):
    out = tmp_path / "run"
    trainer = GRPOTrainer(config(qwen2_path, out, beta=0.1), reward_funcs=with_digit_share())
    ref = trainer.policy.ref_model
    assert ref is not None and ref is not trainer.policy.model
    assert not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in trainer.policy.model.parameters())
    ref_ptrs = {p.data_ptr() for p in ref.parameters()}
    assert ref_ptrs.isdisjoint(p.data_ptr() for p in trainer.policy.model.parameters())  # a copy, not shared storage
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}

    trainer.train()
    first, second = step_rows(out)
    assert first["kl"] == 0.0  # the policy is the reference before the first update
    assert first["grad_norm"] > 0  # ... and the loss still has a gradient (invariant 1)
    assert abs(first["loss"]) < 1e-5  # ratio 1, KL 0, advantages sum to 0 per group
    assert second["kl"] > 0  # the policy moved; the reference did not
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(ref_before[k], v) for k, v in trainer.policy.model.state_dict().items())


def test_beta_zero_loads_no_reference(tmp_path, qwen2_path):
    out = tmp_path / "run"
    trainer = GRPOTrainer(config(qwen2_path, out, max_steps=1), reward_funcs=with_digit_share())
    assert trainer.policy.ref_model is None
    trainer.train()
    (row,) = step_rows(out)
    assert "kl" not in row
    assert row["grad_norm"] > 0


# ---------------------------------------------------------------- pad == eos (invariant 3), end to end


def test_pad_equal_to_eos_keeps_the_eos_in_the_completion(tmp_path, monkeypatch):
    path = save_tiny(tmp_path / "init", "llama", pad_equals_eos=True)
    out = tmp_path / "run"
    sampler = RecordingSampler(build_char_tokenizer(pad_equals_eos=True))
    loss_masks = []  # the token mask each loss aggregation sees (one call per step: no micro-batching)
    real_aggregate = grpokit.core.algo.aggregate_loss

    def recording_aggregate(loss, mask, **kwargs):
        loss_masks.append(mask.detach().clone())
        return real_aggregate(loss, mask, **kwargs)

    monkeypatch.setattr(grpokit.core.algo, "aggregate_loss", recording_aggregate)
    trainer = GRPOTrainer(
        config(path, out, prompts_per_step=4, max_completion_length=12),
        reward_funcs=with_digit_share(),
        sampler=sampler,
    )
    eos = trainer.tokenizer.eos_token_id
    assert trainer.tokenizer.pad_token_id == eos
    # make EOS likely so that rows end at different steps (a hook on the LM head: sampler and trainer see it)
    bias = torch.zeros(trainer.policy.model.config.vocab_size)
    bias[eos] = 4.0
    handle = trainer.policy.model.get_output_embeddings().register_forward_hook(lambda mod, inp, logits: logits + bias)
    try:
        trainer.train()
    finally:
        handle.remove()

    rows, rollouts = step_rows(out), sampler.rollouts
    assert len(rollouts) == len(rows) == len(loss_masks) == 2
    ended_rows = after_eos_slots = 0
    for rollout, row, loss_mask in zip(rollouts, rows, loss_masks):
        lengths = rollout.completion_mask.sum(-1)
        # the loss covers exactly the sampler's tokens: every EOS in, everything after it out
        width = loss_mask.shape[1]
        assert width == int(lengths.max())
        assert torch.equal(loss_mask, rollout.completion_mask[:, :width].float())
        assert row["completions/mean_length"] == pytest.approx(lengths.float().mean().item())
        assert row["completions/clipped_ratio"] == pytest.approx(rollout.truncated.float().mean().item())
        for ids, mask, n, cut in zip(rollout.completion_ids, rollout.completion_mask, lengths, rollout.truncated):
            if cut:
                continue
            ended_rows += 1
            assert ids[n - 1] == eos and (ids[: n - 1] != eos).all()  # the EOS is the last real token
            assert (ids[n:] == eos).all() and (mask[n:] == 0).all()  # padding (== EOS) after it is masked
            after_eos_slots += int((mask == 0).sum())
        # the trainer scored the same tokens as the sampler, the EOS included (a masked EOS would give |logp|)
        assert row["sampler_logp_diff"] < 1e-4
    assert ended_rows >= 4 and after_eos_slots > 0
    # the decoded completions drop the EOS: the text is one character per token before it
    samples = read_jsonl(out / "completions.jsonl")
    assert all("<eos>" not in s["completion"] for s in samples)


# ---------------------------------------------------------------- the signal monitor


def feed(monitor: SignalMonitor, steps, zero_std: float, truncated: float) -> list[list[str]]:
    return [
        monitor.update(s, {"frac_reward_zero_std": zero_std, "completions/clipped_ratio": truncated}) for s in steps
    ]


def test_monitor_warns_once_when_groups_have_no_spread():
    """A run that starts healthy and then loses its spread: the window's bar (more than 90% over 10 steps)."""
    monitor = SignalMonitor()
    per_step = feed(monitor, range(1, 4), 0.3, 0.0) + feed(monitor, range(4, 14), 0.95, 0.0)
    assert per_step[:12] == [[]] * 12  # until the window holds 10 flat steps
    (warning,) = per_step[12]
    assert "frac_reward_zero_std" in warning and "step 13" in warning and "over the last 10 steps" in warning
    assert feed(monitor, range(14, 31), 0.95, 0.0) == [[]] * 17  # never repeated
    assert monitor.warnings == [warning]


def test_monitor_is_quiet_on_a_healthy_signal():
    monitor = SignalMonitor()
    assert feed(monitor, range(1, 31), 0.5, 0.1) == [[]] * 30
    assert monitor.warnings == []


def test_monitor_warns_on_truncation_once():
    monitor = SignalMonitor()
    flat = [w for ws in feed(monitor, range(1, 31), 0.0, 0.8) for w in ws]
    assert len(flat) == 1 and "completions/clipped_ratio" in flat[0] and "frac_reward_zero_std" not in flat[0]


def test_monitor_uses_a_sliding_window():
    monitor = SignalMonitor()
    assert feed(monitor, range(1, 11), 0.0, 0.0) == [[]] * 10
    per_step = feed(monitor, range(11, 21), 1.0, 0.0)  # the mean passes 0.9 only once 10 of 10 are bad
    assert [bool(w) for w in per_step] == [False] * 9 + [True]


# ---------------------------------------------------------------- SFT


def test_sft_lowers_the_loss_and_writes_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "init", "llama")
    out = tmp_path / "sft"
    cfg = SFTConfig(
        model=str(path),
        task="addition",
        output_dir=str(out),
        max_steps=40,
        batch_size=32,
        learning_rate=3e-3,
        lr_schedule="constant",
        warmup_steps=20,
        num_train_prompts=500,
        progress=False,
        seed=0,
    )
    model_dir = train_sft(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.6 * first, [r["loss"] for r in rows]
    assert model_dir == out / "model"
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    initial = AutoModelForCausalLM.from_pretrained(path)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))
    assert (model_dir / "tokenizer_config.json").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 40


# ---------------------------------------------------------------- rows handed in, flat groups in a step, the Python API


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_step_counts_groups_flat_over_their_scorable_rows(tmp_path):
    """End to end: one None per group and the same non-zero reward elsewhere is no spread at all. The old
    metric counted the None as 0 (std > 0 over [0, 1, 1, 1]) and reported 0.0."""
    G = 4

    def one_none_per_group(prompts, completions, **_):
        return [None if i % G == 0 else 1.0 for i in range(len(completions))]

    cfg = config("in-memory", tmp_path / "run", max_steps=1, prompts_per_step=2, num_generations=G)
    trainer = GRPOTrainer(
        cfg, model=llama(), tokenizer=build_char_tokenizer(), reward_funcs=[("one_none", one_none_per_group)]
    )
    metrics, samples = trainer.step()
    assert metrics["frac_reward_zero_std"] == 1.0
    assert samples and all(s["advantage"] == 0.0 for s in samples)


def test_rows_passed_in_need_neither_task_nor_train_data(tmp_path):
    """Old: validation demanded exactly one of `task` and `train_data` even when rows were handed in."""
    rows = AdditionTask().rows(8, seed=3)
    out = tmp_path / "run"
    cfg = config("in-memory", out, task=None, max_steps=1)
    assert cfg.task is None and cfg.train_data is None
    trainer = GRPOTrainer(
        cfg,
        model=llama(),
        tokenizer=build_char_tokenizer(),
        reward_funcs=[("digit_share", digit_share)],
        train_dataset=rows,
    )
    trainer.train()

    assert [r["step"] for r in step_rows(out)] == [1]
    logged_prompts = {c["prompt"] for c in read_jsonl(out / "completions.jsonl")}
    assert logged_prompts and logged_prompts <= {r["prompt"] for r in rows}  # it trained on the rows passed in


def test_train_data_and_rows_passed_in_is_a_config_error(tmp_path):
    out = tmp_path / "run"
    cfg = config("in-memory", out, task=None, train_data=str(tmp_path / "train.jsonl"), max_steps=1)
    with pytest.raises(ConfigError, match="`train_data`"):
        GRPOTrainer(
            cfg,
            model=llama(),
            tokenizer=build_char_tokenizer(),
            reward_funcs=[("digit_share", digit_share)],
            train_dataset=AdditionTask().rows(8, seed=3),
        )
    assert not out.exists()


def test_the_python_api_takes_a_path_a_dataset_and_a_function_and_records_them(tmp_path, model):
    import datasets
    import yaml

    from grpokit import GRPOConfig
    from grpokit import GRPOTrainer as TopLevelTrainer

    cfg = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        prompts_per_step=2,
        num_generations=2,
        max_completion_length=4,
        num_eval_prompts=2,
        progress=False,
        tensorboard=False,
    )
    trainer = TopLevelTrainer(
        cfg,
        model=str(model),
        reward_funcs=module_level_reward,
        train_dataset=datasets.Dataset.from_list(text_rows()),
        eval_dataset=text_rows(2),
    )
    trainer.train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"] == str(model) and saved["task"] is None and saved["train_data"] is None
    assert saved["reward_funcs"] == ["helpers:module_level_reward"]
    assert cfg.model == "" and cfg.reward_funcs == ["accuracy"]  # the caller's config is left as it was
