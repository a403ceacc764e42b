"""Nothing silent: each case a hostile but realistic user tried (issue "Nothing silent") gets a clear error before
any training step (rc 2, naming the file, row, field or function), the documented warning, or, for numbers that
cannot train, a stop before a bad update, and no saved model holding NaN."""

from __future__ import annotations

import json
import math
import re
import threading
import warnings

import pytest
import torch
from helpers import config, digit_share, read_jsonl, save_tiny, step_rows
from safetensors.torch import load_file

from grpokit.cli import main
from grpokit.config import ConfigError, GRPOConfig
from grpokit.data.rows import DataError, InputWarning
from grpokit.model.loading import ModelFolderError
from grpokit.model.policy import NumericsError
from grpokit.model.saving import save_trained
from grpokit.report.monitor import SignalMonitor
from grpokit.rewards.functions import RewardError, call_with_timeout, check_advantages, score
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.setup import run_directory, stage_policy


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def strict_json(line: str):
    """json.loads that refuses NaN / Infinity, as strict parsers (and other languages) do."""
    return json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(f"bare {name}")))


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def write_yaml(path, cfg: GRPOConfig, **extra) -> str:
    import dataclasses

    import yaml

    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"} | extra
    path.write_text(yaml.safe_dump(values))
    return str(path)


def no_step_ran(out) -> bool:
    return not (out / "metrics.jsonl").exists() or not step_rows(out)


# ---------------------------------------------------------------- silent cases, now stopped or said


def test_learning_rate_1e30_stops_non_zero_and_saves_nothing_non_finite(tmp_path, model, capsys):
    out = tmp_path / "run"
    # a graded reward: with a 0/1 reward the untrained model scores 0 everywhere, the gradient is 0 and any
    # learning rate moves nothing
    cfg = config(model, out, max_steps=3, learning_rate=1e30, save_every=1, reward_funcs=["helpers:digit_share"])
    rc, err = cli(capsys, "train", write_yaml(tmp_path / "run.yaml", cfg))
    assert rc == 3, err
    stopped = r"stopped: step \d+ \(learning rate 1e\+30\): .*(nan|NaN or inf)"
    assert re.search(stopped + r".*the last checkpoint \(finite, written before it\) is", err), err
    assert not (out / "model").exists()  # the final model is never written
    for weights in out.glob("checkpoint-*/model.safetensors"):  # what was saved before the stop is finite
        assert all(bool(t.isfinite().all()) for t in load_file(weights).values()), weights


def test_a_nan_gradient_is_refused_before_the_optimizer_step(tmp_path):
    from grpokit.data.tasks import build_char_tokenizer, tiny_model

    model = tiny_model(build_char_tokenizer(), "llama", hidden_size=32, seed=0)
    policy = stage_policy(
        model, GRPOConfig(learning_rate=1e-2), total_steps=1, device=torch.device("cpu"), dtype=torch.float32
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NumericsError, match="gradient norm is nan; the optimizer step was not applied"):
        policy.optimizer_step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(NumericsError, match="holds NaN or inf"):
        save_trained(policy, tmp_path / "m", build_char_tokenizer())
    assert not (tmp_path / "m").exists()


def test_learning_rate_10_collapse_is_named_a_cliff(tmp_path, model):
    # one update takes the entropy from 4.43 to 0.00 nats/token and every group to one completion
    cfg = config(model, tmp_path / "run", max_steps=4, learning_rate=10.0, prompts_per_step=4)
    result = GRPOTrainer(cfg, reward_funcs=[("digit_share", digit_share)]).train()
    assert result.monitor_fired["collapse_cliff"].startswith("step 2: entropy fell off a cliff: 4.43 -> 0.00")
    assert any("collapse_cliff" in line for line in result.monitor_summary)


def test_cliff_monitor_fires_on_a_cliff_and_not_on_a_slow_drift():
    cliff, drift = SignalMonitor(), SignalMonitor()
    fired_at = None
    for step in range(1, 30):
        entropy = 4.4 if step < 5 else 0.0
        if cliff.update(step, {"entropy": entropy, "diversity": 1.0 if step < 5 else 0.125}) and fired_at is None:
            fired_at = step
        drift.update(step, {"entropy": 4.4 - 0.14 * step, "diversity": 1.0 - 0.025 * step})
    assert fired_at == 5 and "4.40 -> 0.00" in cliff.fired["collapse_cliff"]
    assert "collapse_cliff" not in drift.fired


def test_a_reward_that_is_none_everywhere_is_logged_as_null_and_said(tmp_path, model):
    def never(prompts, completions, **_):
        return [None] * len(completions)

    out = tmp_path / "run"
    result = GRPOTrainer(config(model, out), reward_funcs=[("never", never)]).train()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [strict_json(line) for line in lines]  # parses strictly: no bare NaN
    steps = [r for r in rows if "reward" in r]
    assert steps and all(r["reward"] is None and r["rewards/never/mean"] is None for r in steps)
    assert all(r["rewards/scored_frac"] == 0.0 for r in steps)
    assert "unscored" in result.monitor_fired
    assert all(strict_json(line)["reward"] is None for line in (out / "completions.jsonl").read_text().splitlines())


def test_a_reward_that_never_returns_is_stopped_by_reward_timeout(tmp_path, model):
    def hangs(prompts, completions, **_):
        threading.Event().wait()  # never set: blocks for ever

    out = tmp_path / "run"
    cfg = config(model, out, reward_timeout=0.5)
    with pytest.raises(RewardError, match=r"reward function `hangs` did not return within reward_timeout = 0.5 s"):
        GRPOTrainer(cfg, reward_funcs=[("hangs", hangs)]).train()
    assert not (out / "model").exists()


def test_reward_timeout_off_the_main_thread_abandons_the_late_call():
    box = {}

    def run():
        try:
            call_with_timeout("hangs", lambda: threading.Event().wait(), 0.2)
        except RewardError as err:
            box["err"] = str(err)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    assert "`hangs` did not return within reward_timeout = 0.2 s" in box["err"]
    assert call_with_timeout("quick", lambda x: x + 1, 5.0, 1) == 2  # a punctual call just returns


def test_a_cut_prompt_is_warned_with_counts_and_logged_as_the_model_saw_it(tmp_path, model):
    data = tmp_path / "train.jsonl"
    long_prompt = "1+1=" * 90  # 360 characters, one token each
    data.write_text(json.dumps({"prompt": long_prompt, "answer": "2"}) + "\n" + '{"prompt": "2+2=", "answer": "4"}\n')
    out = tmp_path / "run"
    cfg = config(model, out, train_data=str(data), max_prompt_length=20, log_completions_every=1)
    with pytest.warns(InputWarning, match=r"1 of 2 prompts are longer than max_prompt_length = 20 tokens"):
        trainer = GRPOTrainer(cfg)
    trainer.train()
    logged = {r["prompt"] for r in read_jsonl(out / "completions.jsonl")}
    assert long_prompt not in logged and "2+2=" in logged
    assert any(len(p) <= 20 and long_prompt.endswith(p) for p in logged)  # the last 20 tokens, as seen


def test_characters_the_tokenizer_does_not_know_are_warned(tmp_path, model):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "ü+1=", "answer": "2"}\n')
    with pytest.warns(InputWarning, match=r"1 of 2 prompts hold text the tokenizer does not know.*'ü' in row 1"):
        GRPOTrainer(config(model, tmp_path / "run", train_data=str(data)))


# ---------------------------------------------------------------- unclear cases, now named, before any step


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlearning_rate: [1e-3\nbeta: 0\n")
    rc, err = cli(capsys, "train", str(path))
    assert rc == 2 and f"{path}:" in err and "not valid YAML" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("empty", "has no config.json"),
        ("no-tokenizer", "has weights but no tokenizer"),
        ("truncated-weights", "model.safetensors is damaged"),
        ("no-weights", "has no weights"),
    ],
)
def test_a_broken_model_folder_says_which_part(tmp_path, capsys, damage, expected):
    folder = save_tiny(tmp_path / "m", "llama")
    if damage == "empty":
        for child in folder.iterdir():
            child.unlink()
    elif damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (folder / name).unlink(missing_ok=True)
    elif damage == "truncated-weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    else:
        (folder / "model.safetensors").unlink()
    out = tmp_path / "run"
    rc, err = cli(capsys, "train", write_yaml(tmp_path / "run.yaml", config(folder, out)))
    assert rc == 2 and expected in err and str(folder) in err, err
    assert no_step_ran(out)


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"prompt": 1234, "answer": "2"}, r"train\.jsonl, row 41 \(line 42\), column 'prompt': a prompt must be text"),
        ({"prompt": "1+1=", "answer": "2", "extra": 1}, r"row 41 \(line 42\) has the extra column 'extra'"),
        ({"prompt": [{"role": "usr", "content": "hi"}], "answer": "2"}, r"row 41.*message 0 has role 'usr'"),
        ({"prompt": "", "answer": "2"}, r"row 41.*the prompt is empty"),
    ],
    ids=["int-prompt", "extra-column", "bad-role", "empty-prompt"],
)
def test_a_bad_row_deep_in_the_data_is_named_before_the_model_loads(tmp_path, capsys, bad_row, expected):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(60)]
    rows[41] = bad_row
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = config(tmp_path / "never-loaded", out, train_data=str(data))
    rc, err = cli(capsys, "train", write_yaml(tmp_path / "run.yaml", cfg))
    assert rc == 2, err
    assert re.search(expected, err), err
    assert no_step_ran(out)


def test_a_reward_beyond_float32_names_the_function():
    def huge(prompts, completions, **_):
        return [1e39] * len(completions)

    with pytest.raises(RewardError, match=r"reward function `huge` returned 1e\+39 for sample 0: beyond float32"):
        score([("huge", huge)], {"prompts": ["p"] * 2, "completions": ["a", "b"]})


def test_a_reward_scale_that_overflows_or_vanishes_is_an_error():
    from grpokit.core import algo

    weights = torch.ones(1)
    # rewards 1e10 apart by 1: float64 sees the spread, float32 rounds both to the same number
    offset = torch.tensor([[1e10], [1e10 + 1.0], [1e10], [1e10 + 2.0]], dtype=torch.float64)
    adv = algo.multi_reward_advantages(
        offset.float(), weights, group_size=2, scale="group", aggregation="sum_then_normalize"
    )
    with pytest.raises(RewardError, match=r"every advantage of this step is below 1e-08.*`r` up to 1e\+10"):
        check_advantages(adv, offset, weights, ["r"], group_size=2)
    # Dr. GRPO (no std): rewards near float32's limit overflow the group mean
    big = torch.tensor([[3e38], [2e38], [-3e38], [3e38]], dtype=torch.float64)
    adv = algo.multi_reward_advantages(
        big.float(), weights, group_size=2, scale="none", aggregation="sum_then_normalize"
    )
    with pytest.raises(RewardError, match="the advantages overflow float32"):
        check_advantages(adv, big, weights, ["r"], group_size=2)
    # an ordinary 0/1 reward passes
    ok = torch.tensor([[0.0], [1.0], [1.0], [1.0]], dtype=torch.float64)
    adv = algo.multi_reward_advantages(
        ok.float(), weights, group_size=2, scale="group", aggregation="sum_then_normalize"
    )
    check_advantages(adv, ok, weights, ["r"], group_size=2)


def test_output_dir_below_a_regular_file_is_named_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    cfg = config(tmp_path / "never-loaded", tmp_path / "a-file" / "run")
    rc, err = cli(capsys, "train", write_yaml(tmp_path / "run.yaml", cfg))
    assert rc == 2 and "`output_dir`" in err and "is a file, not a folder" in err, err


def test_prompt_plus_completion_beyond_the_models_positions_is_refused(tmp_path, model):
    with pytest.raises(ModelFolderError, match="max_position_embeddings = 128"):
        GRPOTrainer(config(model, tmp_path / "run", max_completion_length=200))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("learning_rate", math.nan, "must be a finite number"),
        ("beta", math.inf, "must be a finite number"),
        ("adam_beta1", 1.0, "must be in [0, 1)"),
        ("adam_beta2", 1.5, "must be in [0, 1)"),
        ("epsilon_low", 1.0, "must be in [0, 1)"),
        ("weight_decay", 2e5, "1 - learning_rate x weight_decay"),
        ("reward_weights", [0.0], "are all 0"),
        ("format_pattern", "(", "is not a regular expression"),
        ("stop_strings", [""], "holds an empty string"),
        ("reward_timeout", 0.0, "must be > 0 seconds"),
        ("eval_temperature", 0.0, "must be > 0"),
    ],
)
def test_config_ranges_the_math_allows(tmp_path, field, value, expected):
    cfg = config("m", tmp_path / "run", **{field: value})
    with pytest.raises(ConfigError, match=rf"`{field}`.*{re.escape(expected)}"):
        cfg.validate()


def test_overlong_buffer_longer_than_the_completion_is_refused(tmp_path):
    cfg = config("m", tmp_path / "run", reward_funcs=["overlong"], overlong_buffer=20, max_completion_length=8)
    with pytest.raises(ConfigError, match="`overlong_buffer` is 20, more than max_completion_length = 8"):
        cfg.validate()


def test_no_warning_for_clean_input(tmp_path, model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        trainer = GRPOTrainer(config(model, tmp_path / "run"))
    assert trainer.input_warnings == []


def test_a_chat_prompt_whose_row_is_bad_is_named_even_when_sampled_late(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1="}], "answer": "x"} for i in range(20)]
    rows[17]["prompt"] = [{"role": "user"}]
    with pytest.raises(DataError, match=r"row 17, column 'prompt': message 0 must be a dict with `role` and `content`"):
        GRPOTrainer(config("m", tmp_path / "run"), train_dataset=rows)


def test_truncated_completions_and_unscored_steps_are_said_once_with_counts():
    monitor = SignalMonitor()
    said = monitor.update(
        1, {"completions/clipped_count": 0.0, "completions/clipped_ratio": 0.0, "rewards/scored_frac": 1.0}
    )
    assert said == []
    said = monitor.update(
        2, {"completions/clipped_count": 3.0, "completions/clipped_ratio": 3 / 64, "rewards/scored_frac": 0.0}
    )
    assert len(said) == 2
    assert said[0].startswith("step 2: no completion got a reward")
    assert said[1].startswith("step 2: 3 of the step's 64 completions reached max_completion_length without EOS")
    assert (
        monitor.update(
            3, {"completions/clipped_count": 9.0, "completions/clipped_ratio": 9 / 64, "rewards/scored_frac": 0.0}
        )
        == []
    )


def test_sft_says_how_many_prompts_and_completions_it_cut(char_tokenizer):
    from grpokit.config import SFTConfig
    from grpokit.stages.sft import encode_examples

    cfg = SFTConfig(max_prompt_length=4, max_completion_length=3)
    rows = [{"prompt": "12+34=", "completion": "46"}, {"prompt": "1+1=", "completion": "2"}]
    with pytest.warns(InputWarning) as said:
        examples = encode_examples(char_tokenizer, rows, cfg)
    messages = [str(w.message) for w in said]
    assert "SFT data: 1 of 2 prompts keep their last 4 tokens (max_prompt_length = 4)" in messages
    assert not any("completions" in m for m in messages)  # "46" + EOS fits in 3
    assert [len(p) for p, _ in examples] == [4, 4]
    with pytest.warns(
        InputWarning, match=r"1 of 2 completions keep their first 1 tokens \(max_completion_length = 2\)"
    ):
        encode_examples(char_tokenizer, rows, SFTConfig(max_prompt_length=8, max_completion_length=2))


# ---------------------------------------------------------------- found by a hostile probe of the first version


def inputs(n=2):
    return {"prompts": ["p"] * n, "completions": ["a", "b"][:n]}


@pytest.mark.parametrize("escape", [SystemExit(0), KeyboardInterrupt()], ids=["sys.exit", "KeyboardInterrupt"])
def test_a_reward_that_exits_or_interrupts_is_named_not_obeyed(escape):
    def leaves(completions, **_):
        raise escape

    with pytest.raises(RewardError, match=f"reward function `leaves` raised {type(escape).__name__}"):
        score([("leaves", leaves)], inputs())


def test_a_reward_that_edits_its_inputs_cannot_feed_the_next_one():
    def vandal(prompts, completions, **_):
        prompts.clear()
        completions[:] = ["MUTATED"] * len(completions)
        return [0.0, 0.0]

    seen = {}

    def spy(prompts, completions, **_):
        seen.update(prompts=prompts, completions=completions)
        return [1.0, 1.0]

    batch = inputs()
    score([("vandal", vandal), ("spy", spy)], batch)
    assert seen == {"prompts": ["p", "p"], "completions": ["a", "b"]} and batch["completions"] == ["a", "b"]


def test_a_reward_module_with_a_syntax_error_names_file_and_line(tmp_path, monkeypatch):
    from grpokit.rewards.functions import import_reward

    (tmp_path / "broken_syntax_rw.py").write_text("def fn(completions, **_)\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"'broken_syntax_rw:fn' could not be imported: .* at .*broken_syntax_rw.py:1"):
        import_reward("broken_syntax_rw:fn")


def test_rewards_whose_squares_overflow_float32_say_so():
    from grpokit.core import algo

    big = torch.tensor([[1e30], [-1e30], [1e30], [-1e30]], dtype=torch.float64)
    weights = torch.ones(1)
    adv = algo.multi_reward_advantages(
        big.float(), weights, group_size=2, scale="group", aggregation="sum_then_normalize"
    )
    with pytest.raises(RewardError, match="overflow float32 in the group statistics"):
        check_advantages(adv, big, weights, ["r"], group_size=2)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("other-arch", r"lack \d+ tensors a GPT2LMHeadModel needs"),
        ("vocab-size", r"other shapes than its config.json describes .*embed_tokens.weight is \[85, 32\]"),
        ("garbage-tokenizer", r"tokenizer.json is not valid JSON"),
        ("empty-tokenizer", r"tokenizer.json is not a `tokenizers` file"),
        ("unknown-type", r"model_type 'frobnicator', which transformers .* does not know"),
    ],
)
def test_a_model_folder_that_does_not_describe_its_weights_is_refused(tmp_path, capsys, damage, expected):
    folder = save_tiny(tmp_path / "m", "llama")
    config_file = folder / "config.json"
    spec = json.loads(config_file.read_text())
    if damage == "other-arch":
        spec = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": spec["vocab_size"]}
    elif damage == "vocab-size":
        spec["vocab_size"] += 7
    elif damage == "unknown-type":
        spec["model_type"] = "frobnicator"
    elif damage == "garbage-tokenizer":
        (folder / "tokenizer.json").write_text("this is not json")
    else:
        (folder / "tokenizer.json").write_text("{}")
    config_file.write_text(json.dumps(spec))
    rc, err = cli(capsys, "train", write_yaml(tmp_path / "run.yaml", config(folder, tmp_path / "run")))
    assert rc == 2 and re.search(expected, err) and "Traceback" not in err, err
    assert no_step_ran(tmp_path / "run")


def test_a_tokenizer_without_eos_is_refused(char_tokenizer):
    import copy

    from grpokit.model.loading import ensure_pad_token

    tokenizer = copy.deepcopy(char_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ModelFolderError, match="has no EOS token, so no completion could end"):
        ensure_pad_token(tokenizer)


def test_output_dir_may_not_be_the_model_or_hold_it_under_overwrite(tmp_path, model):
    with pytest.raises(ConfigError, match="`output_dir` is the model folder"):
        config(model, model).validate()
    from grpokit.runtime.checkpoint import RunDirectoryError

    # the model at the run's final model path: refused (by the run directory's exact check) before anything loads
    inside = save_tiny(tmp_path / "run" / "model", "llama")
    cfg = config(inside, tmp_path / "run", overwrite_output_dir=True)
    cfg.validate()
    with pytest.raises(RunDirectoryError, match="config field `model` .* which a run in output_dir .* replaces"):
        run_directory(cfg).plan()
    assert (inside / "config.json").is_file()
    with pytest.raises(ConfigError, match="`output_dir` is '/': give a folder of its own"):
        config(model, "/").validate()


def test_resuming_from_a_damaged_checkpoint_names_the_file(tmp_path, model):
    from grpokit.runtime.checkpoint import RunDirectoryError

    out = tmp_path / "run"
    GRPOTrainer(config(model, out, max_steps=1)).train()
    state = out / "checkpoint-1" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(RunDirectoryError, match=r"checkpoint-1: trainer_state.pt is damaged.*earlier checkpoint"):
        GRPOTrainer(config(model, out, max_steps=2, resume_from_checkpoint="latest")).train()


def test_device_names_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="`device` is 'tpu'; use auto, cpu, cuda, cuda:N or mps"):
        config("m", tmp_path / "run", device="tpu").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="`device` is 'cuda', but this machine has no CUDA device"):
            config("m", tmp_path / "run", device="cuda").validate()


def test_yaml_reads_1e_minus_4_as_a_number_and_refuses_a_key_given_twice(tmp_path):
    from grpokit.config import load_yaml

    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nlearning_rate: 1e-4\n")
    assert load_yaml(GRPOConfig, path).learning_rate == 1e-4
    path.write_text("model: a\ntask: addition\nmodel: b\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3:1: the key 'model' is given twice"):
        load_yaml(GRPOConfig, path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "1+1=", "answer": "2"}\n'.encode("utf-16"), "is UTF-16"),
        (b'{"prompt": "1+1=", "prompt": "X", "answer": "2"}\n', r"train.jsonl:1: the key 'prompt' is given twice"),
        (b'{"prompt": "1+1=", "answer": NaN}\n', r"train.jsonl:1: NaN is not valid JSON"),
        (b'{"prompt": "1+1=", "answer": "\xff"}\n', r"is not UTF-8 text"),
    ],
    ids=["utf-16", "duplicate-key", "nan", "latin-1"],
)
def test_a_data_file_that_json_would_misread_is_refused(tmp_path, content, expected):
    from grpokit.data.rows import load_rows

    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        load_rows(path)
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n')  # a UTF-8 byte-order mark is fine
    assert load_rows(path) == [{"prompt": "1+1=", "answer": "2"}]


def test_what_a_run_cannot_do_with_its_inputs_is_warned(tmp_path, model):
    rows = [{"prompt": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}] + [
        {"prompt": [{"role": "user", "content": f"{i}+1="}]} for i in range(2)
    ]
    cfg = config(
        model, tmp_path / "run", prompts_per_step=4, warmup_steps=50, reward_funcs=["format"], num_eval_prompts=3
    )
    with pytest.warns(InputWarning) as said:
        GRPOTrainer(cfg, train_dataset=rows, eval_dataset=rows)
    text = " | ".join(str(w.message) for w in said)
    assert "warmup_steps = 50 is more than the run's 2 optimizer steps" in text
    assert "prompts_per_step = 4 is more than the 3 training prompts" in text
    assert "1 of 3 chat prompts end with an assistant message (first: row 0)" in text
    assert "eval data has no `answer` column" in text


def test_reward_model_pairs_that_are_all_ties_are_refused(tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.stages.reward_model import train_reward_model

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n" for _ in range(3)))
    cfg = RewardModelConfig(model="m", train_data=str(path), output_dir=str(tmp_path / "rm"))
    with pytest.raises(DataError, match="every one of its 3 pairs has chosen == rejected"):
        train_reward_model(cfg)


def test_eval_refuses_zero_prompts(capsys, model):
    rc, err = cli(capsys, "eval", "--model", str(model), "--num-eval-prompts", "0")
    assert rc == 2 and "`num_eval_prompts` must be >= 1" in err


def test_help_into_a_closed_pipe_exits_quietly():
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "grpokit.cli", "train", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # what `| head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_a_completion_limit_shorter_than_the_tasks_answers_is_warned(tmp_path):
    from grpokit.config import EvalConfig

    with pytest.warns(InputWarning, match=r"shorter than the addition task's answers \(41 digits"):
        EvalConfig(model="m", task_num_digits=40).validate()
    with pytest.warns(InputWarning, match=r"max_completion_length = 3 tokens"):
        config("m", tmp_path / "run", max_completion_length=3).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        config("m", tmp_path / "run", max_completion_length=4).validate()  # 3 digits + EOS fit


def test_reward_functions_that_cancel_inside_a_group_give_zero_advantages_without_an_error():
    """Two reward columns that differ inside a group but whose weighted sums are equal (x and 1 - x): the advantages
    are 0 in exact arithmetic too, so nothing is lost to float32 and the step trains on nothing, as it should. Fails
    if the vanishing check reads spread from the columns rather than from the advantages they give."""
    from grpokit.core import algo

    x = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    rewards, weights = torch.stack([x, 1 - x], dim=1), torch.ones(2)
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        adv = algo.multi_reward_advantages(
            rewards.float(), weights, group_size=2, scale="group", aggregation=aggregation
        )
        assert float(adv.abs().max()) == 0.0
        check_advantages(adv, rewards, weights, ["a", "b"], group_size=2, scale="group", aggregation=aggregation)
