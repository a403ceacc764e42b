"""What `VLLMSampler` does around the engine, without one: the requests it sends (seeds, greedy, bounds), the rows it
builds from what comes back (EOS, stop strings, truncation), its weight pushes, an engine or a server that fails; the
engine-vs-trainer importance correction by hand; the config's vLLM fields. (tests/test_vllm_engine.py and
tests/test_vllm_runs.py run a real engine.)"""

from __future__ import annotations

import math
import socket
import sys

import pytest
import torch
from helpers import cli_run, config, digit_share, tiny_run_args

from grpokit import GRPOConfig, GRPOTrainer, PPOConfig
from grpokit.config import ConfigError
from grpokit.core import algo
from grpokit.core.types import SamplerError
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.model.weights import PolicyWeights
from grpokit.rollout.sampler import KVCacheSampler, SamplingParams
from grpokit.rollout.vllm import (
    SEED_SPAN,
    Completion,
    EngineSettings,
    LocalEngine,
    ServerEngine,
    VLLMSampler,
    check_requests,
    cut_row,
    engine_requests,
    engine_seed,
    import_vllm,
    rollout_from_completions,
)

EOS = 1


# ---------------------------------------------------------------- requests


def test_requests_carry_one_seed_per_prompt_and_greedy_asks_for_single_completions():
    params = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=3, stop_strings=("\n",))
    sampled = engine_requests([[2, 5], [2, 6, 7]], num_generations=4, params=params, seeds=[11, 12], eos_token_ids=[1])
    assert [(r["prompt"], r["n"], r["seed"]) for r in sampled] == [([2, 5], 4, 11), ([2, 6, 7], 4, 12)]
    assert sampled[0] | {"prompt": None} == {
        "prompt": None, "n": 4, "seed": 11, "temperature": 0.7, "top_p": 0.9, "top_k": 3, "min_p": 0.0,
        "repetition_penalty": 1.0, "max_tokens": 5, "stop": ["\n"], "stop_token_ids": [1],
    }  # fmt: skip
    greedy = engine_requests([[2, 5]], num_generations=3, params=SamplingParams(max_new_tokens=5, temperature=0.0),
                             seeds=[11], eos_token_ids=[1])  # fmt: skip
    assert [(r["n"], r["seed"]) for r in greedy] == [(1, None)] * 3  # vLLM refuses n > 1 without sampling


def test_a_seed_keeps_its_value_unless_its_group_would_overflow_vllms_range():
    assert engine_seed(12345, 8) == 12345
    top = engine_seed(SEED_SPAN - 1, 8)
    assert top >= 0 and top + 8 - 1 <= SEED_SPAN - 1  # vLLM seeds completion g with seed + g
    assert engine_seed(SEED_SPAN - 8, 8) == SEED_SPAN - 8
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        engine_seed(-1, 8)  # -1 would mean "unseeded" to vLLM


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"prompt": [2] * 30}, "exceeds the engine's max_model_len 32"),
        ({"prompt": [2, 99]}, "prompt token 99 is outside the engine's 85 tokens"),
        ({"seed": SEED_SPAN - 1}, "outside what vLLM takes"),
        ({"temperature": 0.0}, "greedy sampling takes n = 1"),
        ({"temperature": 2.5}, "temperature 2.5 is outside"),
        ({"stop_token_ids": [85]}, r"a stop \(EOS\) token id in \[85\] is outside the engine's 85 tokens"),
    ],
)
def test_what_vllm_would_refuse_is_refused_before_it_is_sent(change, expected):
    request = engine_requests([[2, 5]], num_generations=4, params=SamplingParams(max_new_tokens=4), seeds=[0],
                              eos_token_ids=[1])[0]  # fmt: skip
    check_requests([request], max_model_len=32, vocab_size=85)
    with pytest.raises(ValueError, match=expected):
        check_requests([{**request, **change}], max_model_len=32, vocab_size=85)


# ---------------------------------------------------------------- the rows built from what comes back


def test_rows_end_at_eos_or_a_stop_string_and_otherwise_run_to_max_tokens_truncated(char_tokenizer):
    tok = char_tokenizer
    ids = tok("ab\ncd", add_special_tokens=False)["input_ids"]
    kw = {"max_new_tokens": 5, "eos_token_ids": [EOS], "tokenizer": tok}
    logp = [-0.1 * (i + 1) for i in range(5)]
    assert cut_row(ids, logp, "length", stop_strings=(), **kw) == (ids, logp, True)
    assert cut_row(ids, logp, "length", stop_strings=("\n",), **kw) == (ids[:3], logp[:3], False)
    assert cut_row(ids[:2] + [EOS], logp[:3], "stop", stop_strings=(), **kw) == (ids[:2] + [EOS], logp[:3], False)
    # the engine stopped at a stop string its own detokenizer saw: an ended row
    assert cut_row(ids[:3], logp[:3], "stop", stop_strings=("zz",), **kw) == (ids[:3], logp[:3], False)


def test_a_rollout_is_built_in_the_trainers_layout_and_a_short_answer_is_a_sampler_error(char_tokenizer):
    done = [Completion([5, 6, EOS], [-1.0, -2.0, -0.5], "stop"), Completion([7, 8, 9, 10], [-1.0] * 4, "length")]
    params = SamplingParams(max_new_tokens=4)
    rollout = rollout_from_completions(
        [[2, 5, 6], [2]], [done, done], num_generations=2, params=params, eos_token_ids=[EOS], pad_token_id=0,
        tokenizer=char_tokenizer,
    )  # fmt: skip
    assert rollout.prompt_ids.tolist() == [[2, 5, 6]] * 2 + [[0, 0, 2]] * 2  # left-padded
    assert rollout.completion_ids.tolist()[0] == [5, 6, EOS, 0]  # right-padded
    assert rollout.completion_mask.tolist()[:2] == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert rollout.truncated.tolist() == [False, True, False, True]
    assert rollout.sampling_logp[0].tolist() == [-1.0, -2.0, -0.5, 0.0]
    with pytest.raises(SamplerError, match="returned 3 completions in 2 answers for 2 prompts x num_generations = 2"):
        rollout_from_completions([[2], [2]], [done, done[:1]], num_generations=2, params=params,
                                 eos_token_ids=[EOS], pad_token_id=0, tokenizer=char_tokenizer)  # fmt: skip


# ---------------------------------------------------------------- the sampler around an engine


class FakeEngine:
    """An engine that writes the same two tokens for every completion, or raises when told to."""

    max_model_len, vocab_size = 128, 85

    def __init__(self):
        self.loads, self.fail = 0, None

    def complete(self, requests):
        if self.fail:
            raise self.fail
        return [[Completion([5, EOS], [-1.0, -1.0], "stop")] * r["n"] for r in requests]

    def load_weights(self, tensors):
        self.loads += 1
        assert dict(tensors)


def test_weights_are_pushed_once_per_version_and_a_failed_engine_is_not_used_again(char_tokenizer):
    model = tiny_model(char_tokenizer, "llama", seed=0)
    engine = FakeEngine()
    sampler = VLLMSampler(engine, char_tokenizer)
    version = [0]
    weights = PolicyWeights(model, version=lambda: version[0])
    sampler.update_weights(weights)
    sampler.update_weights(weights)  # the same weights: nothing sent
    version[0] = 1
    sampler.update_weights(weights)
    assert (engine.loads, sampler.pushes) == (2, 2)
    engine.fail = RuntimeError("engine died")
    with pytest.raises(RuntimeError, match="engine died"):
        sampler.generate([[2, 5]], num_generations=2, params=SamplingParams(max_new_tokens=2), seeds=[0])
    engine.fail = None
    with pytest.raises(SamplerError, match="the vLLM engine failed earlier .generate: RuntimeError: engine died"):
        sampler.generate([[2, 5]], num_generations=2, params=SamplingParams(max_new_tokens=2), seeds=[0])


def test_an_unreachable_server_is_an_error_naming_it_within_its_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SamplerError, match=rf"no vLLM server answered at http://127.0.0.1:{port} within 1 s"):
        ServerEngine(f"http://127.0.0.1:{port}", timeout=1)


def test_a_run_with_an_unreachable_server_stops_before_its_first_step(qwen2_path, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    server = ["--use-vllm", "--vllm-mode", "server", "--vllm-server-port", port, "--vllm-server-timeout", "1"]
    rc, err = cli_run(capsys, "train", *tiny_run_args(qwen2_path, out, *server))
    assert rc == 3, err
    assert f"no vLLM server answered at http://0.0.0.0:{port} within 1 s" in err and "grpokit vllm-serve" in err
    assert not (out / "metrics.jsonl").exists()


def test_without_vllm_installed_the_error_names_the_field_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets when it is not installed
    with pytest.raises(ImportError, match=r"use_vllm: vLLM is not installed .*scripts/setup.sh --vllm"):
        import_vllm()


def test_sleep_mode_is_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="vllm_enable_sleep_mode frees GPU memory"):
        LocalEngine(EngineSettings(model="unused", enable_sleep_mode=True))


# ---------------------------------------------------------------- the importance correction


def test_the_correction_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    engine = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -2.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # log w per token: [0.5, 0, -2], [0, 1.5, (masked)]; per row: -1.5, 1.5
    kw = {"clip_min": 0.2, "clip_max": 3.0}
    token_truncate = algo.sampler_correction(trainer, engine, mask, mode="token_truncate", **kw)
    expected = torch.tensor([[math.exp(0.5), 1.0, 0.2], [1.0, 3.0, 1.0]])
    assert torch.allclose(token_truncate, expected)
    token_mask = algo.sampler_correction(trainer, engine, mask, mode="token_mask", **kw)
    assert torch.allclose(token_mask, torch.tensor([[math.exp(0.5), 1.0, 0.0], [1.0, 0.0, 1.0]]))
    sequence_mask = algo.sampler_correction(trainer, engine, mask, mode="sequence_mask", clip_min=None, clip_max=3.0)
    assert torch.allclose(sequence_mask, torch.tensor([[math.exp(-1.5)] * 3, [0.0] * 3]))  # e^1.5 > 3: dropped
    sequence_truncate = algo.sampler_correction(trainer, engine, mask, mode="sequence_truncate", **kw)
    assert torch.allclose(sequence_truncate, torch.tensor([[math.exp(-1.5)] * 3, [3.0] * 3]))
    values = algo.correction_values(sequence_mask, mask, mode="sequence_mask")
    assert torch.allclose(values, torch.tensor([math.exp(-1.5), 0.0]))  # one per row
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        algo.sampler_correction(trainer, engine, mask, mode="token", **kw)


def test_the_correction_weighs_the_surrogate_and_not_the_kl():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    kw = {"ref_logp": ref, "beta": 0.1, "epsilon_low": 0.2, "epsilon_high": 0.2}
    plain, stats = algo.per_token_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2), **kw)
    weighted, _ = algo.per_token_loss(
        logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2), sampler_weight=torch.tensor([[0.5, 0.0]]), **kw
    )
    kl = 0.1 * stats["kl"]
    assert torch.allclose(weighted - kl, torch.tensor([[0.5, 0.0]]) * (plain - kl))


class EngineLikeSampler(KVCacheSampler):
    """The in-process sampler posing as another engine: its logprobs of row 0 are 1 nat per token too low."""

    corrects_sampling = True

    def generate(self, *args, **kwargs):
        rollout = super().generate(*args, **kwargs)
        rollout.sampling_logp[0] -= rollout.completion_mask[0].float()
        return rollout


def test_a_grpo_step_through_another_engine_weighs_its_tokens_and_logs_the_weights(tmp_path):
    """Row 0's sequence weight is e^len > 3: masked (one of 8 rows); the other rows' weights are 1. With the
    correction off, nothing is logged."""
    tokenizer = build_char_tokenizer()
    cfg = config("in-memory", tmp_path / "on", max_steps=1, max_completion_length=6)
    model = tiny_model(tokenizer, "llama", seed=0)
    step = GRPOTrainer(cfg, model=model, tokenizer=tokenizer, reward_funcs=[digit_share],
                       sampler=EngineLikeSampler(tokenizer)).step  # fmt: skip
    metrics, _ = step()
    assert metrics["sampling/importance_sampling_masked"] == pytest.approx(1 / 8)
    assert metrics["sampling/importance_sampling_ratio/min"] == 0.0
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(1.0, abs=1e-5)
    off = config("in-memory", tmp_path / "off", max_steps=1, max_completion_length=6,
                 vllm_importance_sampling_correction=False)  # fmt: skip
    trainer = GRPOTrainer(off, model=tiny_model(tokenizer, "llama", seed=0), tokenizer=tokenizer,
                          reward_funcs=[digit_share], sampler=EngineLikeSampler(tokenizer))  # fmt: skip
    assert not any(k.startswith("sampling/") for k in trainer.step()[0])


# ---------------------------------------------------------------- the config


def test_vllm_fields_without_use_vllm_and_with_ppo_are_refused():
    with pytest.raises(ConfigError, match="`vllm_server_port` is set but use_vllm is false"):
        GRPOConfig(model="m", task="addition", vllm_server_port=9000).validate()
    with pytest.raises(ConfigError, match="`use_vllm` is true, but PPO samples with grpokit's own sampler"):
        PPOConfig(model="m", task="addition", use_vllm=True).validate()
    with pytest.raises(ConfigError, match="`vllm_server_base_url` is 'localhost:8000': give a URL"):
        GRPOConfig(model="m", task="addition", use_vllm=True, vllm_mode="server",
                   vllm_server_base_url="localhost:8000").validate()  # fmt: skip


def test_vllm_serve_on_a_port_in_use_is_refused_before_the_model_loads():
    from grpokit.rollout.vllm_server import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve(EngineSettings(model="not loaded"), host="127.0.0.1", port=port)


# ---------------------------------------------------------------- `grpokit vllm-serve` around a stand-in engine


class GatedEngine(FakeEngine):
    """A stand-in engine whose generation waits for `gate` when one is set (a slow engine)."""

    gate = None

    def complete(self, requests):
        if self.gate is not None:
            self.gate.wait(timeout=60)
        return super().complete(requests)


@pytest.fixture
def served(tmp_path, char_tokenizer):
    """(a `grpokit vllm-serve` server on a stand-in engine, listening on a free port, its model's weights)."""
    import threading

    from grpokit.rollout.vllm_server import EngineServer
    from grpokit.runtime.checkpoint import save_model

    model = tiny_model(char_tokenizer, "llama", hidden_size=32, seed=0)
    folder = save_model(model, char_tokenizer, tmp_path / "served")
    server = EngineServer(("127.0.0.1", 0), GatedEngine(), str(folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, model
    server.shutdown()
    server.server_close()


def url_of(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_a_push_of_another_models_weights_is_refused_and_leaves_the_engine_usable(served, char_tokenizer):
    server, model = served
    other = tiny_model(char_tokenizer, "llama", hidden_size=64, seed=0)
    client = ServerEngine(url_of(server), timeout=5)
    with pytest.raises(SamplerError, match="400: these weights are not the served model's .*model.embed_tokens.weight"):
        client.load_weights(PolicyWeights(other).named_tensors())
    assert server.engine.loads == 0 and server.failed is None
    client.load_weights(PolicyWeights(model).named_tensors())  # the right model's weights go in
    assert server.engine.loads == 1


def test_a_second_run_pushing_to_the_same_server_stops_the_first_instead_of_mixing_weights(served, char_tokenizer):
    server, model = served
    first = VLLMSampler(ServerEngine(url_of(server), timeout=5), char_tokenizer)
    first.update_weights(PolicyWeights(model, version=lambda: 1))
    params = SamplingParams(max_new_tokens=2)
    first.generate([[2, 5]], num_generations=2, params=params, seeds=[0])
    second = VLLMSampler(ServerEngine(url_of(server), timeout=5), char_tokenizer)
    second.update_weights(PolicyWeights(model, version=lambda: 1))
    with pytest.raises(SamplerError, match="409: this server holds other weights than the run's last push"):
        first.generate([[2, 5]], num_generations=2, params=params, seeds=[0])
    second.generate([[2, 5]], num_generations=2, params=params, seeds=[0])  # the latest run goes on


def test_a_caller_that_gives_up_leaves_the_server_healthy(served, char_tokenizer):
    """A trainer's timeout (or a killed trainer) while the engine generates: the server answers into a closed
    connection, and stays usable."""
    import threading

    server, model = served
    sampler = VLLMSampler(ServerEngine(url_of(server), timeout=0.5), char_tokenizer)
    sampler.update_weights(PolicyWeights(model, version=lambda: 1))
    server.engine.gate = threading.Event()
    with pytest.raises(SamplerError, match=r"did not answer /generate within 0.5 s \(vllm_server_timeout\)"):
        sampler.generate([[2, 5]], num_generations=2, params=SamplingParams(max_new_tokens=2), seeds=[0])
    server.engine.gate.set()
    again = VLLMSampler(ServerEngine(url_of(server), timeout=5), char_tokenizer)
    again.update_weights(PolicyWeights(model, version=lambda: 1))
    rollout = again.generate([[2, 5]], num_generations=2, params=SamplingParams(max_new_tokens=2), seeds=[0])
    assert server.failed is None and rollout.completion_ids.shape == (2, 2)


def test_an_engine_that_failed_is_reported_at_once_not_waited_for(served, char_tokenizer):
    server, model = served
    sampler = VLLMSampler(ServerEngine(url_of(server), timeout=5), char_tokenizer)
    sampler.update_weights(PolicyWeights(model, version=lambda: 1))
    server.engine.fail = RuntimeError("out of memory")
    with pytest.raises(SamplerError, match="500: /generate: RuntimeError: out of memory"):
        sampler.generate([[2, 5]], num_generations=2, params=SamplingParams(max_new_tokens=2), seeds=[0])
    with pytest.raises(SamplerError, match="answered /health with 503: the engine failed earlier .*restart the server"):
        ServerEngine(url_of(server), timeout=240)  # at once: a server that answers is not retried for 240 s
