"""Hostile use of the Python API (round two): what a caller hands over that grpokit cannot use is refused with an
error naming the argument the caller wrote, before the work it would spoil."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import RecordingSampler, config, save_tiny

from grpokit.trainer import GRPOTrainer
from grpokit.types import Rollout


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
    "a list": (lambda r: r.completion_ids.tolist(), r"a list; expected a grpokit.types.Rollout"),
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


def test_what_a_sampler_returns_is_checked_every_step_naming_the_sampler(tmp_path):
    from grpokit.sampler import SamplerError

    sampler = MangledSampler(lambda r: r)
    trainer = GRPOTrainer(config(save_tiny(tmp_path / "tiny"), tmp_path / "out", max_steps=1), sampler=sampler)
    assert isinstance(trainer.sample().rollout, Rollout)  # the sampler's own answer passes
    named = r"`sampler` \(MangledSampler\)\.generate returned "
    for mangle, message in MANGLED.values():
        sampler.mangle = mangle
        with pytest.raises(SamplerError, match=named + message):
            trainer.sample()


def test_nan_logprobs_from_a_sampler_of_its_own_are_named_as_the_samplers(tmp_path):
    from grpokit.policy import NumericsError

    nan_logp = MangledSampler(
        lambda r: dataclasses.replace(r, sampling_logp=torch.full_like(r.sampling_logp, float("nan")))
    )
    trainer = GRPOTrainer(config(save_tiny(tmp_path / "tiny"), tmp_path / "out", max_steps=1), sampler=nan_logp)
    with pytest.raises(NumericsError, match=r"`sampler` \(MangledSampler\)'s logprobs in the rollout are NaN or inf"):
        trainer.sample()


def test_a_model_on_the_meta_device_is_refused_naming_model(tmp_path):
    from grpokit.arguments import ArgumentError
    from grpokit.tasks import build_char_tokenizer, tiny_model

    with torch.device("meta"):  # as accelerate's init_empty_weights makes it: shapes, no values
        model = tiny_model(build_char_tokenizer(), "qwen2", hidden_size=32)
    with pytest.raises(ArgumentError, match=r"`model` has its weights on the meta device \(e\.g\. model\.embed"):
        GRPOTrainer(config("never-loaded", tmp_path / "out"), model=model)
    assert not (tmp_path / "out").exists()


def _ppo_config(grpo_config):
    from grpokit.config import GRPOConfig, PPOConfig

    return PPOConfig(**{f.name: getattr(grpo_config, f.name) for f in dataclasses.fields(GRPOConfig)})


def test_a_critic_argument_is_checked_before_any_work_naming_critic(tmp_path):
    from transformers import AutoModelForCausalLM

    from grpokit.arguments import ArgumentError
    from grpokit.critic import ValueModel
    from grpokit.ppo import PPOTrainer

    lm = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "tiny"))
    cfg = _ppo_config(config(tmp_path / "tiny", tmp_path / "out", max_steps=1))
    hidden = lm.config.hidden_size
    critics = {
        r"`critic` is an object; expected a grpokit\.critic\.ValueModel": object(),
        rf"`critic`'s head reads 7 features but its body \(Qwen2Model\) has hidden size {hidden}": ValueModel(
            lm.model, torch.nn.Linear(7, 1)
        ),
        r"`critic` wraps a whole causal LM \(Qwen2ForCausalLM\).*ValueModel\(model\.get_decoder\(\)\)": ValueModel(lm),
    }
    for message, critic in critics.items():
        with pytest.raises(ArgumentError, match=message):
            PPOTrainer(cfg, critic=critic)
        assert not (tmp_path / "out").exists()


def test_reward_model_pairs_handed_in_without_held_out_ones_or_a_task_train_with_no_accuracy(tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.reward_model import train_reward_model

    cfg = RewardModelConfig(
        model=str(save_tiny(tmp_path / "tiny")), output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4,
        max_completion_length=4, device="cpu", warmup_steps=0,
    )  # fmt: skip
    result = train_reward_model(cfg, train_pairs=[{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4)
    assert result.eval_accuracy is None
    assert result.model_dir.is_dir()


def test_an_image_column_is_refused_naming_it_unless_a_reward_function_reads_it(tmp_path):
    from grpokit.data import DataError

    model = save_tiny(tmp_path / "tiny")
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "images": [f"picture {i}"]} for i in range(4)]

    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def mentions_picture(completions, images, **kwargs):
        return [float(str(i[0]) in c) for c, i in zip(completions, images)]

    cfg = config(model, tmp_path / "out", train_data=None, max_steps=1)
    with pytest.raises(DataError, match=r"train data has an 'images' column .*the images would be dropped"):
        GRPOTrainer(cfg, train_dataset=rows, reward_funcs=length)
    text_rows = [{k: v for k, v in row.items() if k != "images"} for row in rows]
    with pytest.raises(DataError, match=r"eval data has an 'images' column"):
        GRPOTrainer(
            dataclasses.replace(cfg, num_eval_prompts=4),
            train_dataset=text_rows,
            eval_dataset=rows,
            reward_funcs=length,
        )
    assert not (tmp_path / "out").exists()
    trainer = GRPOTrainer(cfg, train_dataset=rows, reward_funcs=[length, mentions_picture])
    assert trainer.sample().rewards.shape == (8, 2)  # the column reached the function that asked for it


def test_sft_rows_with_a_task_are_refused_as_rows_with_train_data_are(tmp_path):
    from grpokit.config import ConfigError, SFTConfig
    from grpokit.sft import train_sft

    model = str(save_tiny(tmp_path / "tiny"))
    cfg = SFTConfig(model=model, output_dir=str(tmp_path / "sft"), task="addition", max_steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"`task` is 'addition' but training rows were passed in \(`rows`\)"):
        train_sft(cfg, rows=[{"prompt": "1+1=", "completion": "2"}] * 4)
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("kind", ["trl", "native"])
def test_trl_args_changed_after_the_trainer_is_built_are_refused_naming_them(tmp_path, kind):
    from grpokit.config import ConfigError
    from grpokit.trl import GRPOConfig as TRLConfig
    from grpokit.trl import GRPOTrainer as TRLTrainer

    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    if kind == "trl":
        args = TRLConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_steps=1,
                         max_completion_length=4, disable_tqdm=True)  # fmt: skip
    else:
        args = config(model, out, train_data=None, max_steps=1)
    rows = [{"prompt": f"{a}+{a}="} for a in range(8)]
    trainer = TRLTrainer(str(model), reward_funcs=lambda completions, **kw: [1.0] * len(completions), args=args,
                         train_dataset=rows)  # fmt: skip
    trainer.args.max_steps = 3  # TRL's own trainer reads args in train(); grpokit's was built from them
    trainer.args.learning_rate = 0.5
    with pytest.raises(ConfigError, match=r"`learning_rate` \(.* -> 0\.5\), `max_steps` \(1 -> 3\).*set them before"):
        trainer.train()
    assert not (out / "metrics.jsonl").exists()
