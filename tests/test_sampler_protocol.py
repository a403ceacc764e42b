"""The sampler protocol an engine can serve: integer seeds per prompt (`prompt_seeds`), and the policy's weights
handed over as `PolicyWeights` (the live module for the in-process sampler; the full tensors in the model's own
names, LoRA merged, for an engine in another memory). What a sampler returns is checked every step, and what it
returns or raises wrongly is named as the sampler's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import RecordingSampler, config, save_tiny, tiny_lm

from grpokit.config import GRPOConfig, LoRAConfig
from grpokit.core.types import Rollout
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.model.weights import PolicyWeights
from grpokit.rollout.evaluate import completions_for
from grpokit.rollout.sampler import KVCacheSampler, SamplingParams, prompt_generators, prompt_seeds
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.setup import stage_policy


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

    from grpokit.runtime.distributed import Cluster

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


# ---------------------------------------------------------------- what a sampler returns and raises


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


class MangledSampler(RecordingSampler):
    """The in-process sampler, whose answer `mangle` changes: a sampler of another engine that returns wrong things."""

    def __init__(self, mangle):
        super().__init__()
        self.mangle = mangle

    def generate(self, *args, **kwargs):
        return self.mangle(super().generate(*args, **kwargs))


def _fewer_rows(r):
    return dataclasses.replace(
        r, prompt_ids=r.prompt_ids[:-1], prompt_mask=r.prompt_mask[:-1], completion_ids=r.completion_ids[:-1],
        completion_mask=r.completion_mask[:-1], sampling_logp=r.sampling_logp[:-1], truncated=r.truncated[:-1],
    )  # fmt: skip


MANGLED = {
    "fewer rows": (_fewer_rows, r"`completion_ids` of shape \(7, \d+\); expected \(8, completion length\)"),
    "logp shape": (
        lambda r: dataclasses.replace(r, sampling_logp=torch.nn.functional.pad(r.sampling_logp, (0, 2))),
        r"`sampling_logp` of shape \(8, \d+\); expected \(8, \d+\), as `completion_ids`",
    ),
    "ids past the vocabulary": (
        lambda r: dataclasses.replace(r, completion_ids=torch.full_like(r.completion_ids, 99999)),
        r"completion ids from 99999 to 99999; token ids are >= 0 and below the model's \d+ token embeddings",
    ),
    "a list": (lambda r: r.completion_ids.tolist(), r"a list; expected a grpokit.core.types.Rollout"),
    "other prompt tokens": (
        lambda r: dataclasses.replace(r, prompt_ids=r.prompt_ids.roll(1, dims=1)),
        r"a Rollout whose row 0 holds other prompt tokens \(under `prompt_mask`\) than prompt 0 it was given",
    ),
    "another group size": (
        lambda r: dataclasses.replace(r, group_size=2),
        r"a Rollout whose `group_size` is 2; it was asked for num_generations = 4 completions of each of 2 prompts",
    ),
    "an empty completion": (
        lambda r: dataclasses.replace(r, completion_mask=torch.zeros_like(r.completion_mask)),
        r"a Rollout whose row 0 has no completion token \(its `completion_mask` is all 0",
    ),
    "float mask": (
        lambda r: dataclasses.replace(r, completion_mask=r.completion_mask.float()),
        r"`completion_mask` of dtype torch.float32",
    ),
}


class FailingEngine:
    """A sampler whose engine dies when the weights are pushed after the first update."""

    def __init__(self, inner):
        self.inner, self.pushes = inner, 0

    def update_weights(self, model):
        self.pushes += 1
        if self.pushes > 1:
            raise RuntimeError("engine crashed")
        self.inner.update_weights(model)

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


def test_what_a_sampler_returns_is_checked_every_step_naming_the_sampler(tmp_path):
    from grpokit.rollout.sampler import SamplerError

    sampler = MangledSampler(lambda r: r)
    trainer = GRPOTrainer(config(save_tiny(tmp_path / "tiny"), tmp_path / "out", max_steps=1), sampler=sampler)
    assert isinstance(trainer.sample().rollout, Rollout)  # the sampler's own answer passes
    named = r"`sampler` \(MangledSampler\)\.generate returned "
    for mangle, message in MANGLED.values():
        sampler.mangle = mangle
        with pytest.raises(SamplerError, match=named + message):
            trainer.sample()


def test_nan_logprobs_from_a_sampler_of_its_own_are_named_as_the_samplers(tmp_path):
    from grpokit.model.policy import NumericsError

    nan_logp = MangledSampler(
        lambda r: dataclasses.replace(r, sampling_logp=torch.full_like(r.sampling_logp, float("nan")))
    )
    trainer = GRPOTrainer(config(save_tiny(tmp_path / "tiny"), tmp_path / "out", max_steps=1), sampler=nan_logp)
    with pytest.raises(NumericsError, match=r"`sampler` \(MangledSampler\)'s logprobs in the rollout are NaN or inf"):
        trainer.sample()


def test_a_sampler_whose_update_weights_fails_is_named(model, tmp_path):
    from helpers import RecordingSampler

    from grpokit.rollout.sampler import SamplerError
    from grpokit.stages.grpo import GRPOTrainer

    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=2), sampler=FailingEngine(RecordingSampler()))
    with pytest.raises(SamplerError, match=r"`sampler` \(FailingEngine\)\.update_weights raised RuntimeError: engine"):
        trainer.train()


def test_a_sampler_that_fails_in_evaluation_is_named_as_in_training():
    """Held-out evaluation calls the sampler as a training step does: what its `generate` raises (an engine that
    died, a division by a greedy temperature of 0) comes out as a SamplerError naming the sampler, not as the
    engine's own traceback."""
    from grpokit.core.types import SamplerError

    class Failing:
        def update_weights(self, weights):
            pass

        def generate(self, prompt_ids, *, num_generations, params, seeds):
            raise ZeroDivisionError("float division by zero")

    with pytest.raises(SamplerError, match=r"`sampler` \(Failing\)\.generate raised ZeroDivisionError"):
        completions_for(Failing(), build_char_tokenizer(), ["1+1="], temperature=0.0, max_new_tokens=4, seed=0)
