"""Data that means something else, and the Python API given the wrong types (issue 19, classes 6 and 7).

Data: a blank prompt, chat content given as a list of parts, a written-out `<unk>` beside a character the
tokenizer does not know, a reward function that edits its inputs in place, gold answers that are not text.
API: every argument of GRPOTrainer / PPOTrainer / train_sft / train_reward_model is checked up front
(`grpokit.stages.arguments.python_arguments`) and an error names the argument as the caller wrote it. Each check runs
before any model loads: the configs below name a model folder that does not exist.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import datasets
import pytest
import torch
import yaml
from helpers import config, module_level_reward, save_tiny

from grpokit.cli import main
from grpokit.config import ConfigError, GRPOConfig, PPOConfig, RewardModelConfig, SFTConfig
from grpokit.data.rows import DataError, InputWarning, render_prompt
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.rewards.functions import build_reward_funcs, score
from grpokit.rollout.sampler import KVCacheSampler
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.ppo import PPOTrainer
from grpokit.stages.reward_model import train_reward_model
from grpokit.stages.sft import train_sft
from grpokit.trl import GRPOConfig as TRLGRPOConfig

NEVER_LOADED = "never-loaded-model"


def graded(completions, **_):
    return [float(len(c)) for c in completions]


def addition_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]


def in_memory_trainer(tmp_path, **arguments):
    """A trainer over a tiny in-memory model and the character tokenizer (no folder to load)."""
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
    overrides = arguments.pop("overrides", {})
    if "train_dataset" in arguments:  # the rows are the training rows: no task (its checker would go unused)
        overrides.setdefault("task", None)
    cfg = config("in-memory", tmp_path / "run", max_steps=1, **overrides)
    return GRPOTrainer(cfg, model=model, tokenizer=tokenizer, **arguments)


# ---------------------------------------------------------------- class 6: data that means something else


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (" \n\t ", r"row 3, column 'prompt': the prompt is only whitespace"),
        ([{"role": "user", "content": "  "}], r"row 3, column 'prompt': every message of the prompt is empty"),
    ],
    ids=["text", "chat"],
)
def test_a_blank_prompt_is_refused_naming_its_row(tmp_path, prompt, expected):
    rows = addition_rows()
    rows[3]["prompt"] = prompt
    with pytest.raises(DataError, match=expected):
        GRPOTrainer(config(NEVER_LOADED, tmp_path / "run"), train_dataset=rows)


def test_a_blank_prompt_in_a_data_file_stops_the_cli(tmp_path, capsys):
    rows = addition_rows(20)
    rows[11]["prompt"] = "   "
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path / NEVER_LOADED, tmp_path / "run", train_data=str(data))
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"})
    )
    rc = main(["train", str(tmp_path / "run.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "train.jsonl, row 11 (line 12), column 'prompt': the prompt is only whitespace" in err, err


def test_chat_content_given_as_text_parts_reaches_the_model_as_text(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": f"{i}+"}, {"type": "text", "text": "1="}]}]}
        for i in range(8)
    ]
    seen = []

    def spy(completions, rendered_prompts, **_):
        seen.extend(rendered_prompts)
        return [0.0] * len(completions)

    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # the old repr's `{` and `'` were "unknown text"
        trainer = in_memory_trainer(tmp_path, train_dataset=rows, reward_funcs=[spy])
    trainer.step()
    assert seen and all(text.startswith("user: ") and text.endswith("+\n1=\nassistant: ") for text in seen), seen
    assert render_prompt(trainer.tokenizer, rows[0]["prompt"]) == "user: 0+\n1=\nassistant: "


def test_a_reward_model_reads_text_parts_as_the_text_they_hold():
    from grpokit.rewards.scorer import reward_model_text

    tokenizer = build_char_tokenizer()
    parts = [{"role": "user", "content": [{"type": "text", "text": "1+1="}]}]
    plain = [{"role": "user", "content": "1+1="}]
    assert reward_model_text(tokenizer, parts, "2") == reward_model_text(tokenizer, plain, "2")


def test_a_non_text_content_part_is_refused_naming_row_message_and_part(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1="}]} for i in range(8)]
    image = {"type": "image_url", "image_url": {"url": "x.png"}}
    rows[5]["prompt"] = [{"role": "system", "content": "add"}, {"role": "user", "content": [image]}]
    with pytest.raises(DataError, match=r"row 5, column 'prompt': message 1 has content part 0 of type 'image_url'"):
        GRPOTrainer(config(NEVER_LOADED, tmp_path / "run"), train_dataset=rows, reward_funcs=[graded])


def test_a_written_out_unk_does_not_hide_an_unknown_character(tmp_path):
    rows = addition_rows()
    rows[2]["prompt"] = "<unk> 2+1=\u00e9"  # <unk> on purpose; the accented e is not in the tokenizer's alphabet
    with pytest.warns(InputWarning, match=r"1 of 8 prompts hold text the tokenizer does not know.*'\u00e9' in row 2"):
        in_memory_trainer(tmp_path, train_dataset=rows, reward_funcs=[graded])


def test_a_reward_that_edits_nested_inputs_in_place_cannot_feed_the_next_one():
    def vandal(completion_ids, tests, **_):
        completion_ids[0].append(99)
        tests[1]["cases"].clear()
        return [0.0, 0.0]

    seen = {}

    def spy(completion_ids, tests, **_):
        seen.update(completion_ids=completion_ids, tests=tests)
        return [1.0, 1.0]

    batch = {
        "prompts": ["p", "p"],
        "completions": ["a", "b"],
        "completion_ids": [[5, 6], [7]],
        "tests": [{"cases": [1, 2]}, {"cases": [3]}],
    }
    score([("vandal", vandal), ("spy", spy)], batch)
    assert seen == {"completion_ids": [[5, 6], [7]], "tests": [{"cases": [1, 2]}, {"cases": [3]}]}
    assert batch["completion_ids"] == [[5, 6], [7]]


def test_an_eval_dataset_longer_than_num_eval_prompts_is_said(tmp_path):
    with pytest.warns(InputWarning, match=r"eval data holds 8 rows; num_eval_prompts = 3 of them \(the first\)"):
        trainer = in_memory_trainer(
            tmp_path, eval_dataset=addition_rows(), reward_funcs=[graded], overrides={"num_eval_prompts": 3}
        )
    assert len(trainer.eval_rows) == 3


def test_a_blank_sft_completion_is_refused_naming_its_row(tmp_path):
    sft_cfg = SFTConfig(model=NEVER_LOADED, output_dir=str(tmp_path / "sft"), task=None)
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": " \n"}]
    with pytest.raises(DataError, match=r"SFT data, row 1: column 'completion' must be text that is not blank"):
        train_sft(sft_cfg, rows=rows)


def test_reward_values_as_arrays_and_tensors_are_read_alike_and_a_single_number_is_named():
    import numpy as np
    import torch

    from grpokit.rewards.functions import RewardError

    batch = {"prompts": ["p", "p"], "completions": ["a", "b"]}
    for name, values in [("column_array", np.array([[1.0], [2.0]])), ("column_tensor", torch.tensor([[1.0], [2.0]]))]:
        assert score([(name, lambda completions, values=values, **_: values)], batch).flatten().tolist() == [1.0, 2.0]
    with pytest.raises(
        RewardError, match=r"`mean_only` returned Tensor tensor\(0\.5000\); expected a list of 2 floats"
    ):
        score([("mean_only", lambda completions, **_: torch.tensor(0.5))], batch)


@pytest.mark.parametrize(("answer", "kind"), [(None, "NoneType None"), (3.0, "float 3.0"), (["3"], "list")])
def test_a_gold_answer_that_is_not_text_is_refused_before_the_model_loads(tmp_path, answer, kind):
    rows = addition_rows()
    rows[6]["answer"] = answer
    with pytest.raises(DataError, match=rf"row 6: column 'answer' is {kind}.*compares the completion with the answer"):
        GRPOTrainer(config(NEVER_LOADED, tmp_path / "run"), train_dataset=rows)  # `accuracy`, the default
    # the held-out rows too, where the `accuracy` reward scores them (with a reward of the user's own, a column of
    # theirs is left out of held-out accuracy instead: tests/test_evaluation.py)
    with pytest.raises(DataError, match=rf"eval data.*, row 6: column 'answer' is {kind}"):
        GRPOTrainer(
            config(NEVER_LOADED, tmp_path / "run", num_eval_prompts=8),
            train_dataset=addition_rows(),
            eval_dataset=rows,
            reward_funcs=[graded, "accuracy"],
        )


# ---------------------------------------------------------------- class 7: the Python API with wrong types


@pytest.mark.parametrize(
    ("reward_funcs", "expected"),
    [
        (42, r"`reward_funcs` is an int \(42\); expected a function"),
        ([], r"`reward_funcs` is empty: pass at least one reward function"),
        ({"graded": graded}, r"`reward_funcs` is a dict"),
        ([graded, 3.5], r"`reward_funcs\[1\]` is a float \(3\.5\)"),
        ([("graded", graded, 1.0)], r"`reward_funcs\[0\]` is the tuple .*a pair is \(name, function\)"),
        (("accuracy", graded), r"`reward_funcs` = \('accuracy', graded\) is ambiguous"),
    ],
    ids=["int", "empty", "dict", "float-entry", "triple", "ambiguous-pair"],
)
def test_reward_funcs_of_the_wrong_shape_are_named(tmp_path, reward_funcs, expected):
    with pytest.raises(TypeError, match=expected):
        GRPOTrainer(config(NEVER_LOADED, tmp_path / "run"), reward_funcs=reward_funcs)


def test_a_bare_name_function_pair_is_one_named_reward(tmp_path):
    trainer = in_memory_trainer(tmp_path, reward_funcs=("graded_len", graded))
    assert trainer.rewards.names == ["graded_len"] and trainer.cfg.reward_funcs == ["graded_len"]


def test_reward_names_stay_unique_when_a_suffix_is_itself_a_given_name(tmp_path):
    funcs = [("f", graded), ("f_2", graded), ("f", graded)]
    trainer = in_memory_trainer(tmp_path, reward_funcs=funcs)
    assert trainer.rewards.names == ["f", "f_2", "f_3"]


@pytest.mark.parametrize(
    ("arguments", "error", "expected"),
    [
        ({"sampler": object()}, TypeError, r"`sampler` is an object without generate\(\) or update_weights\(\)"),
        ({"sampler": KVCacheSampler}, TypeError, r"`sampler` is the class KVCacheSampler, not a sampler"),
        ({"train_dataset": []}, DataError, r"`train_dataset` holds no rows"),
        ({"tokenizer": "tiny"}, TypeError, r"`tokenizer` is the text 'tiny', not a tokenizer"),
        ({"tokenizer": 7}, TypeError, r"`tokenizer` is an int; expected a transformers tokenizer"),
        ({"model": 3}, TypeError, r"`model` is an int \(3\); expected a model folder's path"),
        ({"train_dataset": ["1+1=", "2+2="]}, DataError, r"`train_dataset`\[0\] is of type str \('1\+1='\)"),
        ({"train_dataset": {"prompt": ["1+1="]}}, DataError, r"`train_dataset` is a dict \(keys \['prompt'\]\)"),
        ({"train_dataset": addition_rows(), "eval_dataset": [1]}, DataError, r"`eval_dataset`\[0\] is of type int"),
    ],
    ids=[
        "sampler",
        "sampler-class",
        "empty-list",
        "tokenizer-str",
        "tokenizer-int",
        "model-int",
        "list-of-str",
        "dict-of-columns",
        "eval-int",
    ],
)
def test_grpo_trainer_arguments_of_the_wrong_type_are_named(tmp_path, arguments, error, expected):
    with pytest.raises(error, match=expected):
        GRPOTrainer(config(NEVER_LOADED, tmp_path / "run"), **arguments)


def test_a_dataset_dict_is_refused_naming_its_splits(tmp_path):
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(addition_rows()), test=datasets.Dataset.from_list(addition_rows(2))
    )
    with pytest.raises(DataError, match=r"`train_dataset` is a DatasetDict of the splits \['train', 'test'\]: pass "):
        GRPOTrainer(config(NEVER_LOADED, tmp_path / "run"), train_dataset=splits)
    pairs = datasets.DatasetDict(train=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    rm_cfg = RewardModelConfig(model=NEVER_LOADED, output_dir=str(tmp_path / "rm"), task=None)
    with pytest.raises(DataError, match=r"`train_pairs` is a DatasetDict of the splits \['train'\]"):
        train_reward_model(rm_cfg, train_pairs=pairs, eval_pairs=[])


def test_the_config_may_be_a_yaml_path_or_a_dict_and_another_type_is_named(tmp_path):
    cfg = config(NEVER_LOADED, tmp_path / "run", reward_funcs=["format"])
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    tokenizer = build_char_tokenizer()
    for given in (str(tmp_path / "run.yaml"), tmp_path / "run.yaml", values):
        trainer = GRPOTrainer(given, model=tiny_model(tokenizer, "llama", hidden_size=32), tokenizer=tokenizer)
        assert isinstance(trainer.cfg, GRPOConfig) and trainer.rewards.names == ["format"]
    with pytest.raises(TypeError, match=r"GRPOTrainer: `config` is an SFTConfig; expected a GRPOConfig"):
        GRPOTrainer(SFTConfig(model=NEVER_LOADED, task="addition"))
    with pytest.raises(TypeError, match=r"PPOTrainer: `config` is a GRPOConfig; expected a PPOConfig"):
        PPOTrainer(cfg)
    trl_config = TRLGRPOConfig(output_dir=str(tmp_path / "trl"))
    with pytest.raises(TypeError) as refused:
        GRPOTrainer(trl_config)
    assert "`config` is a grpokit.trl.GRPOConfig; expected a grpokit.config.GRPOConfig" in str(refused.value)
    assert "grpokit.trl.GRPOTrainer" in str(refused.value) and "`config.to_grpokit()`" in str(refused.value)
    with pytest.raises(ConfigError, match=r"unknown field `learning_rat` for GRPOConfig; did you mean `learning_rate`"):
        GRPOTrainer({**values, "learning_rat": 1e-3})
    with pytest.raises(ConfigError, match=r"`config` is 'no/such.yaml', which is not a file"):
        GRPOTrainer("no/such.yaml")


def test_a_model_object_loaded_from_another_folder_than_config_model_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    trained = save_tiny(tmp_path / "trained", "llama")
    other = save_tiny(tmp_path / "other", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(trained)
    with pytest.raises(ValueError, match=rf"`model` was loaded from '{trained}' but config field `model` is '{other}'"):
        GRPOTrainer(config(other, tmp_path / "run"), model=model)
    assert GRPOTrainer(config(trained, tmp_path / "run"), model=model).cfg.model == str(trained)


def test_sft_and_reward_model_and_ppo_entry_points_check_the_same_way(tmp_path):
    sft_cfg = SFTConfig(model=NEVER_LOADED, output_dir=str(tmp_path / "sft"), task=None)
    with pytest.raises(TypeError, match=r"`tokenizer` is the text 'tiny'"):
        train_sft(sft_cfg, tokenizer="tiny", rows=[{"prompt": "1+1=", "completion": "2"}])
    with pytest.raises(DataError, match=r"`rows`\[1\] is of type str"):
        train_sft(sft_cfg, rows=[{"prompt": "1+1=", "completion": "2"}, "2+2=4"])
    with pytest.raises(DataError, match=r"row 0, column 'prompt': the prompt is only whitespace"):
        train_sft(sft_cfg, rows=[{"prompt": " ", "completion": "2"}])
    with pytest.raises(ConfigError, match=r"train_sft: `config` is 'sft.yaml', which is not a file: pass an SFTConfig"):
        train_sft("sft.yaml")
    grpo_cfg = config(NEVER_LOADED, tmp_path / "ppo")
    ppo_cfg = PPOConfig(**{f.name: getattr(grpo_cfg, f.name) for f in dataclasses.fields(GRPOConfig)})
    with pytest.raises(TypeError, match=r"`reward_funcs` is empty"):
        PPOTrainer(ppo_cfg, reward_funcs=[])
    with pytest.raises(TypeError, match=r"`sampler` is an object without"):
        PPOTrainer(ppo_cfg, sampler=object())


def test_argument_errors_are_type_errors_and_config_errors_and_builtin_names_match_the_builder():
    from grpokit.rewards import BUILTIN_REWARDS
    from grpokit.stages.arguments import ArgumentError

    assert issubclass(ArgumentError, TypeError) and issubclass(ArgumentError, ConfigError)
    built = build_reward_funcs(list(BUILTIN_REWARDS), format_pattern=".*", max_completion_length=8, overlong_buffer=4)
    assert [name for name, _ in built] == list(BUILTIN_REWARDS)
    with pytest.raises(ValueError):
        build_reward_funcs(["nonexistent_builtin"], format_pattern=".*", max_completion_length=8, overlong_buffer=4)


# ---------------------------------------------------------------- models, tokenizers, critics, reward models handed in


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def _ppo_config(grpo_config):
    from grpokit.config import GRPOConfig, PPOConfig

    return PPOConfig(**{f.name: getattr(grpo_config, f.name) for f in dataclasses.fields(GRPOConfig)})


def test_a_model_object_without_a_tokenizer_says_to_pass_one(tmp_path):
    from grpokit.data.tasks import build_char_tokenizer, tiny_model

    in_memory = tiny_model(build_char_tokenizer(), "llama", hidden_size=32, seed=0)
    with pytest.raises(ValueError, match=r"without `tokenizer=`.*pass tokenizer="):
        GRPOTrainer(config("", tmp_path / "run"), model=in_memory, reward_funcs=module_level_reward)


def test_a_model_on_the_meta_device_is_refused_naming_model(tmp_path):
    from grpokit.data.tasks import build_char_tokenizer, tiny_model
    from grpokit.stages.arguments import ArgumentError

    with torch.device("meta"):  # as accelerate's init_empty_weights makes it: shapes, no values
        model = tiny_model(build_char_tokenizer(), "qwen2", hidden_size=32)
    with pytest.raises(ArgumentError, match=r"`model` has its weights on the meta device \(e\.g\. model\.embed"):
        GRPOTrainer(config("never-loaded", tmp_path / "out"), model=model)
    assert not (tmp_path / "out").exists()


def test_a_classifier_or_a_frozen_model_as_the_policy_is_refused_naming_model(model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from grpokit.stages.arguments import ArgumentError
    from grpokit.stages.grpo import GRPOTrainer

    classifier = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    with pytest.raises(ArgumentError, match=r"`model` is a LlamaForSequenceClassification, which has no language-"):
        GRPOTrainer(config(model, tmp_path / "run"), model=classifier)
    frozen = AutoModelForCausalLM.from_pretrained(model).requires_grad_(False)
    with pytest.raises(ArgumentError, match=r"`model` \(LlamaForCausalLM\) has no parameter that requires grad"):
        GRPOTrainer(config(model, tmp_path / "run"), model=frozen)
    from grpokit.config import LoRAConfig

    lora = GRPOTrainer(config(model, tmp_path / "run", lora=LoRAConfig(r=2, alpha=4.0)), model=frozen)  # adapters
    assert any(p.requires_grad for p in lora.policy.model.parameters())


def test_a_peft_model_with_more_lora_asked_or_a_ppo_config_for_grpo_is_refused(model, tmp_path):
    """A PeftModel plus `lora`: both adapter sets trained and model/ held neither whole; a PPOConfig handed to the
    GRPO trainer trained GRPO while config.yaml recorded the critic's fields."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grpokit.config import LoRAConfig, PPOConfig
    from grpokit.stages.arguments import ArgumentError
    from grpokit.stages.grpo import GRPOTrainer

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model), PeftLoraConfig(r=4, target_modules=["q_proj"])
    )
    with pytest.raises(ArgumentError, match=r"`model` is a PeftModel\w* \(it carries LoRA adapters already\)"):
        GRPOTrainer(config(model, tmp_path / "run", lora=LoRAConfig(r=8, alpha=8.0)), model=peft_model)
    ppo = PPOConfig(model=str(model), task="addition", output_dir=str(tmp_path / "run"), vf_coef=0.5)
    with pytest.raises(ArgumentError, match=r"`config` is a PPOConfig, not a GRPOConfig: .* \(PPOTrainer for a PPO"):
        GRPOTrainer(ppo)
    assert not (tmp_path / "run").exists()


def test_a_peft_model_copying_a_tied_module_is_refused_before_training(model, tmp_path):
    """modules_to_save=["lm_head"] over tied embeddings: both steps trained, then the final save failed."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grpokit.stages.arguments import ArgumentError
    from grpokit.stages.grpo import GRPOTrainer

    base = AutoModelForCausalLM.from_pretrained(model)
    if not base.config.tie_word_embeddings:
        pytest.skip("the tiny model's embeddings are not tied")
    lora = PeftLoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ArgumentError, match=r"modules_to_save \(lm_head\) copy a module of a model with tied"):
        GRPOTrainer(config(model, tmp_path / "run"), model=get_peft_model(base, lora))


def test_a_tokenizer_object_with_another_vocabulary_than_the_models_is_refused(model, tmp_path):
    """Same size, other ids (another model's tokenizer): every shape check passed and each id read as another
    character. A tokenizer with tokens added after (a pad token) still passes."""
    from grpokit.data.tasks.tokenizer import DEFAULT_CHARS, build_char_tokenizer
    from grpokit.model.loading import ModelFolderError, load_tokenizer
    from grpokit.stages.grpo import GRPOTrainer

    permuted = build_char_tokenizer(DEFAULT_CHARS[::-1])
    assert len(permuted) == len(load_tokenizer(model))
    with pytest.raises(ModelFolderError, match=r"config field `model`: the tokenizer saved in .* is not the "
                                               r"`tokenizer` passed in: \d+ tokens have another id"):  # fmt: skip
        GRPOTrainer(config(model, tmp_path / "run", max_steps=1), tokenizer=permuted)
    from transformers import AutoModelForCausalLM

    own = load_tokenizer(model)
    own.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    grown = AutoModelForCausalLM.from_pretrained(model)
    grown.resize_token_embeddings(len(own))
    trainer = GRPOTrainer(config(model, tmp_path / "run2", max_steps=1), model=grown, tokenizer=own)
    assert trainer.tokenizer is own


def test_a_critic_argument_is_checked_before_any_work_naming_critic(tmp_path):
    from transformers import AutoModelForCausalLM

    from grpokit.model.critic import ValueModel
    from grpokit.stages.arguments import ArgumentError
    from grpokit.stages.ppo import PPOTrainer

    lm = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "tiny"))
    cfg = _ppo_config(config(tmp_path / "tiny", tmp_path / "out", max_steps=1))
    hidden = lm.config.hidden_size
    critics = {
        r"`critic` is an object; expected a grpokit\.model\.critic\.ValueModel": object(),
        rf"`critic`'s head reads 7 features but its body \(Qwen2Model\) has hidden size {hidden}": ValueModel(
            lm.model, torch.nn.Linear(7, 1)
        ),
        r"`critic` wraps a whole causal LM \(Qwen2ForCausalLM\).*ValueModel\(model\.get_decoder\(\)\)": ValueModel(lm),
    }
    for message, critic in critics.items():
        with pytest.raises(ArgumentError, match=message):
            PPOTrainer(cfg, critic=critic)
        assert not (tmp_path / "out").exists()


def test_a_critic_sharing_the_policys_weights_is_refused(model, tmp_path):
    from transformers import AutoModelForCausalLM

    from grpokit.config import PPOConfig
    from grpokit.model.critic import ValueModel
    from grpokit.stages.arguments import ArgumentError
    from grpokit.stages.ppo import PPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(model)
    cfg = PPOConfig(model=str(model), task="addition", output_dir=str(tmp_path / "ppo"), max_steps=1, progress=False)
    with pytest.raises(ArgumentError, match=r"`critic` shares \d+ weight tensors with the policy"):
        PPOTrainer(cfg, model=policy, critic=ValueModel(policy.get_decoder()))


def test_a_reward_model_object_in_reward_funcs_is_refused_naming_what_to_pass(model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from grpokit.stages.arguments import ArgumentError
    from grpokit.stages.grpo import GRPOTrainer

    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    with pytest.raises(ArgumentError, match=r"`reward_funcs\[1\]` is a LlamaForSequenceClassification model object: "
                                            r"grpokit loads a reward model from its folder"):  # fmt: skip
        GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=["accuracy", scorer])
    assert not (tmp_path / "run").exists()


def test_eval_data_and_an_eval_dataset_together_are_refused_and_a_task_beside_rows_is_said(model, tmp_path):
    from grpokit.config import ConfigError
    from grpokit.data.rows import InputWarning
    from grpokit.stages.grpo import GRPOTrainer

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(model, tmp_path / "run", eval_data=str(data), num_eval_prompts=4)
    with pytest.raises(ConfigError, match=r"`eval_data` is set \(.*eval\.jsonl'\) but `eval_dataset` was passed in"):
        GRPOTrainer(cfg, eval_dataset=rows)
    with pytest.warns(InputWarning, match=r"`train_dataset` passed in: these are the training rows; the config's "
                                          r"task 'addition' gives only its checker"):  # fmt: skip
        GRPOTrainer(config(model, tmp_path / "run2"), train_dataset=rows)


def test_verification_round_api_cases(model, tmp_path):
    """A reward-model object in a (name, model) pair; TrainResult unpacked as TRL's TrainOutput; the task beside
    train_pairs said; a frozen model with `lora` as a dict names the dict, not the frozen model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from grpokit.config import ConfigError, RewardModelConfig
    from grpokit.core.types import TrainResult
    from grpokit.data.rows import InputWarning
    from grpokit.stages.arguments import ArgumentError
    from grpokit.stages.grpo import GRPOTrainer
    from grpokit.stages.reward_model import train_reward_model

    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    with pytest.raises(ArgumentError, match=r"`reward_funcs\[0\]` = \('rm', a LlamaForSequenceClassification model"):
        GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=[("rm", scorer)])
    result = TrainResult(tmp_path, tmp_path, None, {}, [], [], [], {}, 3, 0.25)
    global_step, training_loss, metrics = result
    assert (global_step, training_loss, metrics) == (3, 0.25, {"train_loss": 0.25, "global_step": 3})
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(4)]
    cfg = RewardModelConfig(model=str(model), output_dir=str(tmp_path / "rm"), task="addition", max_steps=1,
                            num_eval_pairs=4, progress=False)  # fmt: skip
    with pytest.warns(InputWarning, match=r"`train_pairs` passed in: these are the training pairs; the config's task"):
        train_reward_model(cfg, train_pairs=pairs)
    frozen = AutoModelForCausalLM.from_pretrained(model).requires_grad_(False)
    with pytest.raises(ConfigError, match=r"lora"):
        GRPOTrainer(config(model, tmp_path / "run3", lora={"r": 4, "alpha": 8.0}), model=frozen)


def test_final_round_cases(model, tmp_path):
    """A sampler whose generate raises is named (with the step); TrainResult reads as TRL's TrainOutput tuple; a
    reward model's task beside both pair sets is said."""
    import dataclasses

    from helpers import RecordingSampler

    from grpokit.config import RewardModelConfig
    from grpokit.core.types import TrainResult
    from grpokit.data.rows import InputWarning
    from grpokit.rollout.sampler import SamplerError
    from grpokit.stages.grpo import GRPOTrainer
    from grpokit.stages.reward_model import train_reward_model

    class DiesAtStep2(RecordingSampler):
        def generate(self, *args, **kwargs):
            if len(self.rollouts) == 1:
                raise RuntimeError("engine died")
            return super().generate(*args, **kwargs)

    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=3, save_every=1), sampler=DiesAtStep2())
    stop = r"step 2 .*`sampler` \(DiesAtStep2\)\.generate raised RuntimeError: engine died; nothing of this step"
    with pytest.raises(SamplerError, match=stop):
        trainer.train()
    result = TrainResult(tmp_path, tmp_path, None, {}, [], [], [], {}, 3, 0.25)
    assert result[0] == 3 and len(result) == 3 and result._asdict()["training_loss"] == 0.25
    assert dataclasses.is_dataclass(result)
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(4)]
    cfg = RewardModelConfig(model=str(model), output_dir=str(tmp_path / "rm"), task="addition", max_steps=1,
                            progress=False)  # fmt: skip
    with pytest.warns(InputWarning, match=r"gives nothing \(both pair sets were passed in\): leave it out"):
        train_reward_model(cfg, train_pairs=pairs, eval_pairs=pairs)
