"""Every field of TRL 1.16's GRPOConfig has one answer in grpokit.trl: mapped, accepted with no effect (named in
one InputWarning), or refused with its reason; and the fields a TRL script sets without thinking work: optim's
AdamW names, adam_epsilon, chat_template_kwargs, min_p, repetition_penalty, generation_kwargs, cosine_with_min_lr,
use_bias_correction_kl, bf16 on a CPU said once. The sampling and schedule math is checked against hand-computed
numbers."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import warnings

import pytest
import torch
import yaml
from datasets import Dataset
from helpers import read_jsonl, save_tiny

from grpokit.config import ConfigError, load_yaml
from grpokit.config import GRPOConfig as NativeConfig
from grpokit.config.trl_names import MAPPED, NO_EFFECT, OLDER_NAMES, TRL_DEFAULTS, UNSUPPORTED
from grpokit.core import algo
from grpokit.core.types import InputWarning
from grpokit.data.rows import encode_prompts
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.model.optim import OptimizerSettings, build_optimizer, lr_factor
from grpokit.rollout.sampler import SamplingParams, filter_logits, generate, penalize_repeats, sample_tokens
from grpokit.trl import GRPOConfig, GRPOTrainer


def input_warnings(build) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


# ---------------------------------------------------------------- the walk over TRL's own dataclass


def test_every_trl_1_16_field_has_exactly_one_answer_and_trls_default():
    """Every default is comparable: all are plain values, and the one factory (include_for_metrics) makes []; an enum
    default (none in 1.16) would compare by its value."""
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"grpokit's tables are TRL 1.16.0's; the installed trl is {trl.__version__}")
    fields = dataclasses.fields(trl.GRPOConfig)
    assert len(fields) > 180  # TrainingArguments' fields are among them
    for f in fields:
        answers = [name for name, table in (("mapped", MAPPED), ("no effect", NO_EFFECT), ("refused", UNSUPPORTED))
                   if f.name in table]  # fmt: skip
        assert len(answers) == 1, (f.name, answers)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = default.value if isinstance(default, enum.Enum) else default
        assert (type(TRL_DEFAULTS[f.name]), TRL_DEFAULTS[f.name]) == (type(default), default), f.name
    names = {f.name for f in fields}  # nothing else is answered, but the older names TRL scripts still carry
    assert (MAPPED | set(NO_EFFECT) | set(UNSUPPORTED)) - names == set(TRL_DEFAULTS) - names == set(OLDER_NAMES)


def test_a_no_effect_field_set_away_from_its_default_is_named_in_one_warning():
    said = input_warnings(lambda: GRPOConfig(
        logging_first_step=True, torch_empty_cache_steps=10, hub_model_id="me/run", hub_strategy="end",
        ds3_gather_for_generation=False, dataloader_pin_memory=True, tf32=True,
    ))  # fmt: skip
    assert len(said) == 1
    named = re.findall(r"`(\w+)` \(", said[0])
    # dataloader_pin_memory=True is TRL's default: not named
    assert named == ["logging_first_step", "torch_empty_cache_steps", "hub_model_id", "hub_strategy",
                     "ds3_gather_for_generation", "tf32"]  # fmt: skip
    assert "grpokit logs every step, the first one included" in said[0]
    assert input_warnings(lambda: GRPOConfig(dataloader_pin_memory=True, logging_first_step=False)) == []


def test_ddp_timeout_is_the_process_groups_timeout_under_trls_name():
    """A TRL script's `ddp_timeout` (accelerate's process-group timeout) is grpokit's field of that name, not one
    accepted with no effect."""
    assert input_warnings(lambda: GRPOConfig(ddp_timeout=600)) == []
    assert GRPOConfig(ddp_timeout=600).to_grpokit(num_prompts=64).ddp_timeout == 600


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "DeepSpeed is not used: launch under torchrun"),
        ({"fsdp_config": {"min_num_params": 1}}, "accelerate's FSDP is not used"),
        ({"torch_compile": True}, "compiles the model with torch.compile"),
        ({"torch_compile_mode": "max-autotune"}, "compiles the model with torch.compile"),
        ({"neftune_noise_alpha": 5.0}, "NEFTune: noise added to the input embeddings"),
        ({"load_best_model_at_end": True}, "the best metric_for_best_model the final model"),
        ({"average_tokens_across_devices": False}, "own token count"),
        ({"cast_lm_head_to_fp32": True}, "keeps the LM head in float32"),
        ({"shuffle_dataset": False}, "keeps the data set's order (a curriculum)"),
    ],
)
def test_a_refused_field_says_what_it_does_in_trl(fields, reason):
    (name, value), *_ = fields.items()
    with pytest.raises(ConfigError, match=re.escape(f"TRL field `{name}` = {value!r} is not supported: ") + ".*"
                       + re.escape(reason)):  # fmt: skip
        GRPOConfig(**fields)


def test_a_name_trl_lacks_is_refused_truthfully_with_the_nearest_field():
    with pytest.raises(ConfigError, match=r"`learnig_rate` is not a field of TRL 1.16's GRPOConfig; did you mean "
                       r"`learning_rate`\?"):  # fmt: skip
        GRPOConfig(learnig_rate=1e-5)
    with pytest.raises(ConfigError, match=r"`prompts_per_step` is not a field .*grpokit's own GRPOConfig"):
        GRPOConfig(prompts_per_step=4)


def test_a_trl_name_in_native_yaml_gets_its_answer(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nlogging_first_step: true\n")
    with pytest.raises(ConfigError, match="`logging_first_step` is TRL's name. In grpokit: nothing: no effect"):
        load_yaml(NativeConfig, path)


# ---------------------------------------------------------------- optimizer and schedule


def test_adamw_names_are_accepted_and_other_optimizers_refused_by_what_they_are():
    assert GRPOConfig(optim="adamw_torch", max_steps=1).to_grpokit().learning_rate == 1e-6
    GRPOConfig(optim="adamw_torch_fused")
    with pytest.raises(ConfigError, match=r"`optim` = 'adafactor' \(Adafactor .*\) is not supported: .*adamw_torch"):
        GRPOConfig(optim="adafactor")
    with pytest.raises(ConfigError, match=r"`optim` = 'adamw_bnb_8bit' \(8-bit AdamW \(bitsandbytes\)\)"):
        GRPOConfig(optim="adamw_bnb_8bit")


def test_adam_epsilon_reaches_adamw():
    cfg = GRPOConfig(adam_epsilon=1e-6, max_steps=1).to_grpokit()
    settings = OptimizerSettings(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, warmup_steps=0,
                                 lr_schedule="constant", max_grad_norm=1.0, adam_epsilon=cfg.adam_epsilon)  # fmt: skip
    optimizer, _ = build_optimizer(torch.nn.Linear(2, 2), settings, total_steps=1)
    assert optimizer.param_groups[0]["eps"] == 1e-6


def test_cosine_with_min_lr_is_transformers_schedule_by_hand():
    # 4 steps, no warm-up, floor 0.1: 0.1 + 0.9 (1 + cos(pi s / 4)) / 2
    expected = [1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1 + 0.45 * (1 - math.sqrt(0.5)), 0.1]
    kw = {"warmup_steps": 0, "total_steps": 4, "schedule": "cosine_with_min_lr", "min_lr_rate": 0.1}
    got = [lr_factor(s, **kw) for s in range(5)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert expected[1] == pytest.approx(0.868198, abs=1e-6)
    settings = OptimizerSettings(learning_rate=2.0, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, warmup_steps=0,
                                 lr_schedule="cosine_with_min_lr", max_grad_norm=1.0, min_lr_rate=0.1)  # fmt: skip
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), settings, total_steps=4)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2 * e for e in expected], abs=1e-12)


def test_trls_cosine_with_min_lr_takes_min_lr_or_min_lr_rate():
    by_rate = GRPOConfig(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.2}, max_steps=1)
    assert (by_rate.to_grpokit().lr_schedule, by_rate.to_grpokit().min_lr_rate) == ("cosine_with_min_lr", 0.2)
    by_lr = GRPOConfig(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs='{"min_lr": 1e-7}', max_steps=1)
    assert by_lr.to_grpokit().min_lr_rate == pytest.approx(0.1)  # min_lr / learning_rate (TRL's 1e-6)
    with pytest.raises(ConfigError, match="needs exactly one of min_lr and min_lr_rate"):
        GRPOConfig(lr_scheduler_type="cosine_with_min_lr", max_steps=1).to_grpokit()
    with pytest.raises(ConfigError, match=r"`lr_scheduler_kwargs` key `power` = 2 is not supported"):
        GRPOConfig(lr_scheduler_kwargs={"power": 2}, max_steps=1).to_grpokit()
    with pytest.raises(ConfigError, match=r"`lr_scheduler_type` = 'warmup_stable_decay' \(warm-up, a constant"):
        GRPOConfig(lr_scheduler_type="warmup_stable_decay", max_steps=1).to_grpokit()
    with pytest.raises(ConfigError, match="`min_lr_rate` is 0.1, but lr_schedule is 'cosine'"):
        NativeConfig(model="m", task="addition", lr_schedule="cosine", min_lr_rate=0.1).validate()


def test_transformers_constant_schedule_has_no_warmup_and_says_so():
    cfg = []
    said = input_warnings(lambda: cfg.append(GRPOConfig(lr_scheduler_type="constant", warmup_steps=5, max_steps=10)
                                             .to_grpokit()))  # fmt: skip
    assert cfg[0].warmup_steps == 0 and any("`warmup_steps` = 5 has no effect" in s for s in said)
    warming = GRPOConfig(lr_scheduler_type="constant_with_warmup", warmup_steps=5, max_steps=10)
    assert warming.to_grpokit().warmup_steps == 5


# ---------------------------------------------------------------- sampling: min-p, repetition penalty


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # probabilities 0.5, 0.3, 0.15, 0.05
    inf = float("-inf")
    kept = filter_logits(logits, top_k=0, top_p=1.0, min_p=0.2)  # threshold 0.2 x 0.5 = 0.1
    assert torch.isinf(kept).tolist() == [[False, False, False, True]]
    kept = filter_logits(logits, top_k=0, top_p=1.0, min_p=0.4)  # threshold 0.2: 0.15 goes too
    assert kept[0, 2:].tolist() == [inf, inf] and kept[0, :2].tolist() == logits[0, :2].tolist()
    # after top-p (transformers' order): top_p 0.7 keeps 0.5 and 0.3, then min_p 0.7 (threshold 0.35) only 0.5
    kept = filter_logits(logits, top_k=0, top_p=0.7, min_p=0.7)
    assert torch.isinf(kept).tolist() == [[False, True, True, True]]
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0, min_p=0.0), logits)  # 0 = off


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_penalized_draws_report_the_models_own_logprob():
    """Greedy over [3, 2, 0] with token 0 already seen and a penalty of 2: the draw sees [1.5, 2, 0] and takes token
    1; its logprob is the model's, log(e^2 / (e^3 + e^2 + e^0)), what the trainer computes, not the penalized one."""
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    seen = torch.tensor([[True, False, False]])
    params = SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=2.0)
    tokens, logp = sample_tokens(logits, params, None, seen=seen)
    assert tokens.tolist() == [1]
    assert logp.item() == pytest.approx(2 - math.log(math.e**3 + math.e**2 + 1), abs=1e-6)
    assert sample_tokens(logits, SamplingParams(max_new_tokens=1, temperature=0.0), None)[0].tolist() == [0]


def test_the_sampler_penalizes_the_prompt_and_the_completion_so_far():
    """The KV-cache sampler's greedy completion under a penalty equals a step-by-step reference without any cache: the
    full forward of the prompt and the tokens so far, `penalize_repeats` over exactly those tokens (padding of the
    shorter prompt not among them), argmax."""
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=32, seed=3).eval()
    prompts = [tokenizer("12+34=")["input_ids"], tokenizer("7=")["input_ids"]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, repetition_penalty=3.0)
    kw = {"eos_token_id": -1, "pad_token_id": tokenizer.pad_token_id}  # no EOS: every row writes 8 tokens
    rollout = generate(model, prompts, num_generations=1, params=params, **kw)
    plain = generate(model, prompts, num_generations=1, params=SamplingParams(max_new_tokens=8, temperature=0.0), **kw)
    for row, prompt in enumerate(prompts):
        ids = list(prompt)
        for _ in range(8):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[:, -1].float()  # (1, V)
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, ids] = True
            ids.append(int(penalize_repeats(logits, seen, 3.0).argmax()))
        assert rollout.completion_ids[row].tolist() == ids[len(prompt) :]
    assert not torch.equal(rollout.completion_ids, plain.completion_ids)  # the penalty changed what was written


def test_min_p_and_the_penalty_reach_the_samplers_from_trl_fields():
    cfg = GRPOConfig(min_p=0.05, repetition_penalty=1.2, generation_kwargs={"top_k": 20, "stop": "\n"}, max_steps=1)
    native = cfg.to_grpokit()
    assert (native.min_p, native.repetition_penalty, native.top_k, native.stop_strings) == (0.05, 1.2, 20, ["\n"])
    from grpokit.rollout.vllm import engine_requests
    from grpokit.stages.setup import sampling_params

    (request,) = engine_requests([[2, 5]], num_generations=2, params=sampling_params(native), seeds=[0],
                                 eos_token_ids=[1])  # fmt: skip
    assert (request["min_p"], request["repetition_penalty"], request["top_k"]) == (0.05, 1.2, 20)
    assert GRPOConfig(generation_kwargs={"min_p": 0.1}, min_p=0.3, max_steps=1).to_grpokit().min_p == 0.1  # TRL's
    # order: generation_kwargs override the fields
    with pytest.raises(ConfigError, match="`generation_kwargs` key `num_beams` is not supported"):
        GRPOConfig(generation_kwargs={"num_beams": 4})
    with pytest.raises(ConfigError, match="`generation_kwargs` key `top_p` expects float, got '0.9'"):
        GRPOConfig(generation_kwargs={"top_p": "0.9"})
    assert NativeConfig().min_p == 0.0 and NativeConfig().repetition_penalty == 1.0  # off unless asked


def test_a_penalty_under_vllm_says_what_the_engines_logprobs_are():
    from grpokit.stages.setup import sampler_correction

    class Engine:  # an engine whose logprobs are its own, as VLLMSampler's
        corrects_sampling = True

    cfg = NativeConfig(model="m", task="addition", repetition_penalty=1.2, min_p=0.1)
    said = input_warnings(lambda: sampler_correction(cfg, Engine()))
    assert len(said) == 1 and said[0].startswith("min_p = 0.1, repetition_penalty = 1.2 with vLLM")
    assert "above it for a penalized token" in said[0]
    assert input_warnings(lambda: sampler_correction(NativeConfig(model="m", task="addition"), Engine())) == []


# ---------------------------------------------------------------- the KL's importance weight


@pytest.mark.parametrize(("weighted", "gradient"), [(False, 1 - math.exp(-0.5)), (True, 0.5)])
def test_use_bias_correction_kl_weighs_the_kl_by_the_ratio(weighted, gradient):
    """On-policy (ratio 1), k3 = e^(ref - logp) - (ref - logp) - 1 with ref - logp = -0.5: its gradient in logp is
    1 - e^-0.5; weighed by the ratio, the term adds k3 itself: e^-0.5 - 0.5 + 1 - e^-0.5 ... = 0.5 exactly."""
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, stats = algo.per_token_loss(
        logp, logp.detach(), torch.zeros(1), torch.ones(1, 1), ref_logp=torch.tensor([[-1.5]]), beta=1.0,
        epsilon_low=0.2, epsilon_high=0.2, kl_importance_weight=weighted,
    )  # fmt: skip
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(gradient, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-6)  # logged unweighted


def test_trls_default_bias_correction_is_mapped_when_there_is_a_kl_term():
    assert GRPOConfig(beta=0.04, max_steps=1).to_grpokit().kl_importance_weight  # TRL's default: True
    assert not GRPOConfig(beta=0.04, use_bias_correction_kl=False, max_steps=1).to_grpokit().kl_importance_weight
    assert not GRPOConfig(max_steps=1).to_grpokit().kl_importance_weight  # beta 0: no KL term to weigh
    with pytest.raises(ConfigError, match="`kl_importance_weight` is true but beta = 0"):
        NativeConfig(model="m", task="addition", kl_importance_weight=True).validate()


# ---------------------------------------------------------------- precision


def test_bf16_on_a_cpu_is_said_once_naming_the_field():
    if torch.cuda.is_available():
        said = input_warnings(lambda: GRPOConfig(bf16=True, use_cpu=True))
    else:
        said = input_warnings(lambda: GRPOConfig(bf16=True))
    assert len(said) == 1 and said[0].startswith("TRL field `bf16` = True on a CPU") and "very slow" in said[0]
    assert input_warnings(lambda: GRPOConfig()) == []  # TRL's default (None): float32 on a CPU, no word


# ---------------------------------------------------------------- chat template variables

# Qwen3's switch, written small: with enable_thinking false the generation prompt holds an empty thinking block
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: "
    "{% if enable_thinking is defined and not enable_thinking %}think off {% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("chat") / "qwen2", "qwen2")


def chat_tokenizer(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_chat_template_kwargs_reach_the_rendered_prompt(chat_model):
    tokenizer = chat_tokenizer(chat_model)
    chat = [[{"role": "user", "content": "1+1="}]]
    assert encode_prompts(tokenizer, chat, 64).texts == ["user: 1+1=\nassistant: "]
    off = encode_prompts(tokenizer, chat, 64, {"enable_thinking": False})
    assert off.texts == ["user: 1+1=\nassistant: think off "]
    with pytest.raises(ConfigError, match="`chat_template_kwargs` has the key `add_generation_prompt`"):
        NativeConfig(model="m", task="addition", chat_template_kwargs={"add_generation_prompt": False}).validate()


def test_a_trl_run_renders_training_and_evaluation_prompts_with_chat_template_kwargs(tmp_path, chat_model):
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{a}="}]} for a in range(8)]
    rendered = []

    def spy(completions, rendered_prompts, **kwargs):
        rendered.extend(rendered_prompts)
        return [0.0] * len(completions)

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_steps=1,
        max_completion_length=4, disable_tqdm=True, log_completions=True, logging_steps=1,
        chat_template_kwargs={"enable_thinking": False},
    )  # fmt: skip
    data, held_out = Dataset.from_list(rows), Dataset.from_list(rows[:2])
    trainer = GRPOTrainer(str(chat_model), spy, args=args, train_dataset=data, eval_dataset=held_out,
                          processing_class=chat_tokenizer(chat_model))  # fmt: skip
    trainer.train()
    # evaluation before and after (2 rows, greedy and sampled, each time) and the step's 4 completions (one prompt)
    assert len(rendered) == 2 * 2 * 2 + 4
    assert all(text.endswith("assistant: think off ") for text in rendered)
    assert all(r["prompt"].endswith("think off ") for r in read_jsonl(tmp_path / "out" / "completions.jsonl"))
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert recorded["chat_template_kwargs"] == {"enable_thinking": False}


def test_the_command_line_takes_chat_template_kwargs_as_json():
    from grpokit.cli import parse_config

    cfg = parse_config(NativeConfig, ["--chat-template-kwargs", '{"enable_thinking": false}', "--min-p", "0.1"], "x")
    assert (cfg.chat_template_kwargs, cfg.min_p) == ({"enable_thinking": False}, 0.1)
