"""The sampler protocol an engine can serve: integer seeds per prompt (`prompt_seeds`), and the policy's weights
handed over as `PolicyWeights` (the live module for the in-process sampler; the full tensors in the model's own
names, LoRA merged, for an engine in another memory)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_lm

from grpokit.config import GRPOConfig, LoRAConfig
from grpokit.evaluate import completions_for
from grpokit.run_setup import stage_policy
from grpokit.sampler import KVCacheSampler, SamplingParams, prompt_generators, prompt_seeds
from grpokit.tasks import build_char_tokenizer, tiny_model
from grpokit.weights import PolicyWeights


def test_prompt_seeds_are_the_integers_the_training_generators_were_seeded_with():
    """The in-process draws are unchanged by the move to integer seeds (the loss record holds them too)."""
    seeds = prompt_seeds(7, 3, [0, 1, 5])
    assert all(isinstance(s, int) and 0 <= s < 2**64 for s in seeds) and len(set(seeds)) == 3
    assert [g.initial_seed() for g in prompt_generators(7, 3, [0, 1, 5], "cpu")] == seeds
    assert prompt_seeds(7, 3, [1]) == seeds[1:2]  # a prompt's seed depends on its place, not on the others


def test_an_integer_seed_reproduces_a_prompts_completions_whatever_else_is_in_the_call():
    tokenizer = build_char_tokenizer()
    sampler = KVCacheSampler(tokenizer)
    sampler.update_weights(PolicyWeights(tiny_model(tokenizer, "llama", hidden_size=32, seed=0)))
    prompts = [tokenizer("1+2=")["input_ids"], tokenizer("33+4=")["input_ids"], tokenizer("5+5=")["input_ids"]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    three = sampler.generate(prompts, num_generations=2, params=params, seeds=[11, 12, 13])
    alone = sampler.generate(prompts[1:2], num_generations=2, params=params, seeds=[12])
    width = alone.completion_ids.shape[1]
    assert torch.equal(three.completion_ids[2:4, :width], alone.completion_ids)
    other = sampler.generate(prompts[1:2], num_generations=2, params=params, seeds=[99])
    assert not torch.equal(other.completion_ids, alone.completion_ids)


def test_sampled_evaluation_is_the_same_at_any_batch_size():
    """Each held-out prompt draws from its own seed: the eval batch size no longer changes the sampled figures."""
    tokenizer = build_char_tokenizer()
    sampler = KVCacheSampler(tokenizer)
    sampler.update_weights(tiny_model(tokenizer, "llama", hidden_size=32, seed=0))  # a bare module is its weights
    prompts = [f"{i}+{i + 1}=" for i in range(7)]
    kwargs = {"temperature": 1.0, "max_new_tokens": 5, "seed": 3}
    assert completions_for(sampler, tokenizer, prompts, batch_size=2, **kwargs) == completions_for(
        sampler, tokenizer, prompts, batch_size=256, **kwargs
    )


def test_the_weights_handed_over_are_the_models_own_names_and_a_lora_policy_hands_over_the_merged_ones():
    model = tiny_lm()
    names = list(model.state_dict())
    plain = stage_policy(tiny_lm(), GRPOConfig(), total_steps=1, device=torch.device("cpu"), dtype=torch.float32)
    handed = dict(plain.sampler_weights().named_tensors(dtype=torch.bfloat16))
    assert list(handed) == names and all(t.dtype == torch.bfloat16 for t in handed.values())

    lora = stage_policy(
        tiny_lm(), GRPOConfig(), total_steps=1, device=torch.device("cpu"), dtype=torch.float32,
        lora=LoRAConfig(r=4, alpha=8.0),
    )  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at 0 (merged == base): give the adapters something to add
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    weights = lora.sampler_weights()
    assert weights.module is lora.model  # the in-process sampler shares it
    merged = dict(weights.named_tensors())
    assert list(merged) == names  # no base_layer / lora_ names: the model's own
    q = lora.model.get_base_model().model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + (8.0 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, q.base_layer.weight)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


@pytest.mark.parametrize("bad", ["generator"])
def test_the_old_generator_keyword_is_not_the_protocol(bad):
    """The protocol takes integer seeds: a torch.Generator keyword is refused by Python itself (no silent ignore)."""
    tokenizer = build_char_tokenizer()
    sampler = KVCacheSampler(tokenizer)
    sampler.update_weights(tiny_model(tokenizer, "llama", hidden_size=32, seed=0))
    with pytest.raises(TypeError, match=bad):
        sampler.generate([[5, 6]], num_generations=1, params=SamplingParams(max_new_tokens=2), **{bad: None})


def test_under_fsdp_on_two_ranks_the_weights_handed_over_equal_the_one_process_models(tmp_path):
    """What an engine loads (`named_tensors`) from a policy sharded over 2 ranks equals what one process hands over:
    every tensor of the full fine-tune, and the merged weights of a LoRA policy."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from weights_handover_worker import handed_over

    from grpokit.distributed import Cluster

    tests = Path(__file__).resolve().parent
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(tests / "weights_handover_worker.py"),
           str(tmp_path / "out.pt")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sharded, whole = torch.load(tmp_path / "out.pt"), handed_over(Cluster())
    for name in ("full", "lora"):
        assert list(sharded[name]) == list(whole[name]) == list(tiny_lm().state_dict()), name
        for key, tensor in whole[name].items():
            assert torch.equal(sharded[name][key], tensor), (name, key)
    assert not torch.equal(whole["lora"]["model.layers.0.self_attn.q_proj.weight"],
                           whole["full"]["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
