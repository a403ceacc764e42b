"""LoRA through peft and the reference model: with LoRA and beta > 0 no second model exists and the reference
is exactly the base model; training moves only the adapters; both save forms load back to the trained model;
the TR-DPO reference sync on hand values and inside a run; a target module that matches nothing is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import RecordingSampler, config, save_tiny, step_rows, with_digit_share
from transformers import AutoModelForCausalLM

from grpokit.cli import main
from grpokit.config import ConfigError, GRPOConfig, LoRAConfig, from_dict
from grpokit.model.lora import adapters_disabled, apply_lora, save_policy, sync_reference, uses_lora
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.setup import stage_policy

R = 4


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


def lora_config(base, out: Path, **overrides) -> GRPOConfig:
    values = {"lora": LoRAConfig(r=R, alpha=2.0 * R), "beta": 0.1, "learning_rate": 1e-2}
    return config(base, out, **{**values, **overrides})


def load_base(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@pytest.fixture(scope="module")
def trained(base_path, tmp_path_factory):
    """A LoRA trainer (beta > 0) after 2 GRPO steps, the rollouts it sampled, its metrics and its weights before."""
    threads = torch.get_num_threads()  # module fixtures run before the autouse one_thread
    torch.set_num_threads(1)
    sampler = RecordingSampler()
    cfg = lora_config(base_path, tmp_path_factory.mktemp("run"))
    trainer = GRPOTrainer(cfg, reward_funcs=with_digit_share(), sampler=sampler)
    before = {name: p.detach().clone() for name, p in trainer.policy.model.named_parameters()}
    metrics = [trainer.step()[0] for _ in range(2)]
    torch.set_num_threads(threads)
    return trainer, sampler.rollouts, metrics, before


def parameter_storages(trainer: GRPOTrainer) -> dict[int, int]:
    """{storage address: elements} of every parameter the trainer can reach: each model it holds (also in
    lists, tuples and dicts, e.g. reward models) and the optimizer's parameter groups. Tied weights count once."""
    found: dict[int, int] = {}

    def visit(value, depth: int = 0) -> None:
        if isinstance(value, torch.nn.Module):
            for p in value.parameters():
                found.update(storage_of(p))
        elif isinstance(value, (list, tuple)) and depth < 3:
            for v in value:
                visit(v, depth + 1)
        elif isinstance(value, dict) and depth < 3:
            for v in value.values():
                visit(v, depth + 1)

    for value in [*vars(trainer).values(), *vars(trainer.policy).values(), *vars(trainer.sampler).values()]:
        visit(value)
    for group in trainer.policy.optimizer.param_groups:
        for p in group["params"]:
            found.update(storage_of(p))
    return found


def storage_of(t: torch.Tensor) -> dict[int, int]:
    storage = t.untyped_storage()
    return {storage.data_ptr(): storage.nbytes() // t.element_size()}


def own_storages(model: torch.nn.Module) -> dict[int, int]:
    return {ptr: n for p in model.parameters() for ptr, n in storage_of(p).items()}


# ---------------------------------------------------------------- memory: no second model with LoRA


def test_lora_with_beta_allocates_no_second_model(tmp_path, base_path):
    base = load_base(base_path)
    base_count = sum(p.numel() for p in base.parameters())  # tied embedding / head counted once
    adapted = [m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    adapter_count = sum(R * (m.in_features + m.out_features) for m in adapted)  # A (r, in) + B (out, r)
    assert adapted and adapter_count < base_count / 2

    lora = GRPOTrainer(lora_config(base_path, tmp_path / "lora"))
    assert lora.cfg.beta > 0 and lora.policy.ref_model is None
    reachable = parameter_storages(lora)
    assert reachable == own_storages(lora.policy.model)  # nothing the trainer holds is outside the policy
    assert sum(reachable.values()) == base_count + adapter_count

    full = GRPOTrainer(config(base_path, tmp_path / "full", beta=0.1))
    assert full.policy.ref_model is not None
    assert sum(parameter_storages(full).values()) == 2 * base_count  # the frozen copy


# ---------------------------------------------------------------- the reference is exactly the base


def test_disabled_adapters_give_exactly_the_base_logprobs(trained, base_path):
    trainer, rollouts, metrics, _ = trained
    lora_b = [p for name, p in trainer.policy.model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at 0: the adapters are really on now
    assert metrics[0]["kl"] == 0.0  # B = 0 at step 1: the policy is the base
    assert metrics[1]["kl"] > 0

    base = load_base(base_path)
    cfg = trainer.cfg
    base_policy = stage_policy(
        base,
        cfg,
        total_steps=1,
        device=torch.device("cpu"),
        dtype=torch.float32,
        temperature=cfg.temperature,
        layout=cfg.training_forward,
        max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
    )
    trainer.policy.model.train()
    for rollout in (rollouts[0], rollouts[-1]):
        ref_logp = trainer.policy.reference_logprobs(rollout)  # (N, Tc)
        base_logp = base_policy.logprobs(rollout)  # (N, Tc)
        assert torch.equal(ref_logp, base_logp)
        policy_logp = trainer.policy.logprobs(rollout)
        assert (policy_logp - base_logp).abs().max() > 1e-4  # outside the block the adapters are back
    assert trainer.policy.model.training  # reference_logprobs restored the mode it found


def test_adapters_disabled_only_inside_the_block(trained):
    trainer, rollouts, _, _ = trained
    x = rollouts[0].prompt_ids[:2]  # (2, Tp)
    model = trainer.policy.model.eval()
    try:
        adapted = model(input_ids=x).logits
        with adapters_disabled(model):
            off = model(input_ids=x).logits
        assert not torch.equal(adapted, off)
        assert torch.equal(model(input_ids=x).logits, adapted)
    finally:
        model.train()
    with pytest.raises(ValueError, match="LoRA"), adapters_disabled(torch.nn.Linear(2, 2)):
        pass


# ---------------------------------------------------------------- training moves only the adapters


def test_training_changes_only_adapter_weights(trained):
    trainer, _, _, before = trained
    after = dict(trainer.policy.model.named_parameters())
    base_names = [n for n in after if not is_adapter(n)]
    adapter_names = [n for n in after if is_adapter(n)]
    assert base_names and adapter_names
    for name in base_names:
        assert not after[name].requires_grad, name
        assert torch.equal(after[name], before[name]), name
    changed = [n for n in adapter_names if not torch.equal(after[n], before[n])]
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)

    adapter_ids = {id(after[n]) for n in adapter_names}
    optimized = {id(p) for group in trainer.policy.optimizer.param_groups for p in group["params"]}
    assert optimized == adapter_ids
    assert trainer.policy.optimizer.state and {id(p) for p in trainer.policy.optimizer.state} <= adapter_ids


def test_target_modules_select_the_adapted_layers(tmp_path, base_path):
    model = apply_lora(load_base(base_path), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert uses_lora(model) and not uses_lora(load_base(base_path))
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="lora.r"):
        apply_lora(load_base(base_path), LoRAConfig(r=0))


# ---------------------------------------------------------------- saving: merged and adapter


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits  # (B, T, V)


def test_merged_save_loads_as_a_plain_model_with_the_trained_logits(trained, tmp_path):
    trainer, rollouts, _, _ = trained
    ids = torch.cat([rollouts[-1].prompt_ids, rollouts[-1].completion_ids], dim=1)[:8]  # (8, Tp+Tc)
    live = {n: p.detach().clone() for n, p in trainer.policy.model.state_dict().items()}
    expected = logits_of(trainer.policy.model, ids)
    path = save_policy(trainer.policy.model, trainer.tokenizer, tmp_path / "merged", "merged")
    trainer.policy.model.train()

    assert not (path / "adapter_config.json").exists() and (path / "tokenizer_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert not uses_lora(loaded)
    assert not any("lora" in n or "base_layer" in n for n in loaded.state_dict())
    torch.testing.assert_close(logits_of(loaded, ids), expected, rtol=0, atol=1e-5)
    assert all(
        torch.equal(v, live[n]) for n, v in trainer.policy.model.state_dict().items()
    )  # the live model untouched


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
def test_adapter_save_loads_on_the_base_with_the_trained_logits(trained, tmp_path, base_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    trainer, rollouts, _, _ = trained
    ids = torch.cat([rollouts[-1].prompt_ids, rollouts[-1].completion_ids], dim=1)[:8]  # (8, Tp+Tc)
    expected = logits_of(trainer.policy.model, ids)
    path = save_policy(trainer.policy.model, trainer.tokenizer, tmp_path / "adapter", "adapter")
    trainer.policy.model.train()

    assert not (path / "model.safetensors").exists()  # the adapter alone, not the base weights
    assert (path / "adapter_model.safetensors").exists() and (path / "tokenizer_config.json").exists()
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(base_path).resolve())
    assert adapter_config["r"] == R

    on_base = PeftModel.from_pretrained(load_base(base_path), path)
    torch.testing.assert_close(logits_of(on_base, ids), expected, rtol=0, atol=1e-5)
    auto = AutoPeftModelForCausalLM.from_pretrained(path)  # finds the base through the adapter config
    torch.testing.assert_close(logits_of(auto, ids), expected, rtol=0, atol=1e-5)


def test_a_run_saves_checkpoints_and_the_final_model_as_lora_save_says(tmp_path, base_path):
    out = tmp_path / "run"
    cfg = lora_config(
        base_path, out, max_steps=1, save_every=1, num_eval_prompts=4, lora=LoRAConfig(r=R, save="adapter")
    )
    result = GRPOTrainer(cfg, reward_funcs=with_digit_share()).train()
    assert [h["step"] for h in result.eval_history] == [0, 1]  # evaluation runs through the PeftModel
    for folder in (out / "checkpoint-1", result.model_dir):
        assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------- reference sync (TR-DPO)


def test_sync_reference_on_hand_values():
    ref, policy = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in ref.parameters():
            p.fill_(1.0)
        for p in policy.parameters():
            p.fill_(2.0)
    sync_reference(ref, policy, 0.6)
    for p in ref.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.6))  # 0.6 * 2 + 0.4 * 1
    for p in policy.parameters():
        assert torch.equal(p, torch.full_like(p, 2.0))
    sync_reference(ref, policy, 0.0)
    torch.testing.assert_close(ref.weight, torch.full_like(ref.weight, 1.6))
    sync_reference(ref, policy, 1.0)
    assert torch.equal(ref.weight, policy.weight)
    with pytest.raises(ValueError, match="different parameters"):
        sync_reference(torch.nn.Linear(3, 2, bias=False), policy, 0.5)


@pytest.mark.parametrize("sync_every", [0, 1])
def test_a_run_syncs_the_reference_every_n_steps(tmp_path, base_path, sync_every):
    cfg = config(base_path, tmp_path / "run", max_steps=1, beta=0.1, ref_sync_every=sync_every, ref_sync_alpha=0.6)
    trainer = GRPOTrainer(cfg, reward_funcs=with_digit_share())
    ref_before = {n: p.detach().clone() for n, p in trainer.policy.ref_model.named_parameters()}
    trainer.train()
    assert step_rows(tmp_path / "run")[0]["kl"] == 0.0
    policy = dict(trainer.policy.model.named_parameters())
    ref = dict(trainer.policy.ref_model.named_parameters())
    assert any(not torch.equal(policy[n], ref_before[n]) for n in policy)  # the policy moved
    for name, value in ref.items():
        if sync_every == 0:
            assert torch.equal(value, ref_before[name]), name
        else:
            torch.testing.assert_close(value, 0.6 * policy[name] + 0.4 * ref_before[name], rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in ref.values())


# ---------------------------------------------------------------- config


def test_lora_with_reference_sync_is_a_config_error(base_path):
    cfg = config(base_path, Path("unused"), lora=LoRAConfig(r=R), beta=0.1, ref_sync_every=5)
    with pytest.raises(ConfigError, match="ref_sync_every"):
        cfg.validate()
    values = {"model": str(base_path), "task": "addition", "lora": {"r": R}, "ref_sync_every": 1}
    from_yaml = from_dict(GRPOConfig, values)  # as a YAML file gives it
    assert isinstance(from_yaml.lora, LoRAConfig)
    with pytest.raises(ConfigError, match="ref_sync_every"):
        from_yaml.validate()


# ---------------------------------------------------------------- a target module that matches nothing


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def write_yaml(path, cfg: GRPOConfig) -> str:
    import dataclasses

    import yaml

    path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"}))
    return str(path)


def test_a_lora_target_module_matching_nothing_is_refused_beside_one_that_matches(tmp_path, model, capsys):
    out = tmp_path / "run"
    run_yaml = write_yaml(tmp_path / "run.yaml", config(model, out, max_steps=1))
    rc, err = cli(capsys, "train", run_yaml, "--lora.r", "4", "--lora.target-modules", "q_proj", "nosuch_proj")
    assert rc == 2
    assert "lora.target_modules" in err and "'nosuch_proj'" in err and "'q_proj'" not in err, err
    assert "q_proj" in err.split("linear layers are", 1)[1]  # the names that would match are listed
    assert not (out / "metrics.jsonl").exists() or not step_rows(out)
