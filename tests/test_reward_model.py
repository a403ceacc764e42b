"""Reward models: the Bradley-Terry loss on hand-computed values, last-token pooling under any padding, the
synthetic labelers (clean and verbosity-biased), the scorer behind the reward contract (its own tokenizer and
chat template), bad pairs data and pairs handed in, a reward model trained from a classifier with other labels, a
causal LM given as a reward model, the CLI, and seeded learning checks (clean RM >= 90% held-out pairwise
accuracy)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import save_tiny

from grpokit.cli import main
from grpokit.cli import main as cli_main
from grpokit.config import RewardModelConfig
from grpokit.data.rows import DataError, pad_batch
from grpokit.data.tasks import AdditionTask, build_char_tokenizer, preference_pairs, tiny_model
from grpokit.data.tasks.preferences import PAIR_MIX, carry_forgotten_answers, label
from grpokit.data.tasks.tokenizer import DEFAULT_CHARS
from grpokit.model.loading import load_reward_model
from grpokit.report.runlog import read_metrics
from grpokit.rewards.functions import build_reward_funcs, score
from grpokit.rewards.scorer import RewardModelScorer, encode_text, sequence_rewards
from grpokit.runtime.checkpoint import save_model
from grpokit.stages.reward_model import bradley_terry_loss, train_reward_model

HIDDEN = 32
# A character tokenizer whose ids differ from the default one's: the alphabet in reverse order.
REVERSED_CHARS = DEFAULT_CHARS[::-1]


def save_causal_lm(path: Path, tokenizer, hidden_size: int = HIDDEN, seed: int = 0) -> Path:
    return save_model(tiny_model(tokenizer, "llama", hidden_size=hidden_size, seed=seed), tokenizer, path)


@pytest.fixture(scope="module")
def causal_lm_path(tmp_path_factory) -> Path:
    return save_causal_lm(tmp_path_factory.mktemp("lm") / "llama", build_char_tokenizer())


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory) -> Path:
    """A reward model folder (random score head) whose tokenizer is the reversed-alphabet one."""
    from helpers import save_tiny_reward_model

    return save_tiny_reward_model(tmp_path_factory.mktemp("rm"), REVERSED_CHARS, name="addition_rm")


def rm_config(tmp_path: Path, model: Path | str, **overrides) -> RewardModelConfig:
    values = {
        "model": str(model),
        "output_dir": str(tmp_path / "rm_run"),
        "task": "addition",
        "max_completion_length": 8,
        "num_eval_pairs": 400,
        "batch_size": 32,
        "max_steps": 150,
        "learning_rate": 1e-3,
        "progress": False,
        **overrides,
    }
    if values.get("task") is not None:  # the task's pair count (with pairs from a file it would be refused)
        values.setdefault("num_train_pairs", 4000)
    return RewardModelConfig(**values)


# --- the Bradley-Terry loss ----------------------------------------------------------------------------


def test_bradley_terry_loss_hand_values():
    r_chosen, r_rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(0) = log 2 = 0.6931472; mean 0.5032044
    assert bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(0.5032044, abs=1e-6)
    # margin [0.5, 0]: log(1 + e^-0.5) = 0.4740770 and log 2; mean 0.5836121
    got = bradley_terry_loss(r_chosen, r_rejected, margin=torch.tensor([0.5, 0.0]))
    assert got.item() == pytest.approx(0.5836121, abs=1e-6)
    # centering 0.1 * mean((r_c + r_r)^2) = 0.1 * mean(1, 0) = 0.05 on top of 0.5032044
    got = bradley_terry_loss(r_chosen, r_rejected, center_coefficient=0.1)
    assert got.item() == pytest.approx(0.5532044, abs=1e-6)
    # a margin equal to the reward gap gives log 2 for every pair
    assert bradley_terry_loss(r_chosen, r_rejected, margin=r_chosen - r_rejected).item() == pytest.approx(math.log(2))


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    r_chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    r_rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry_loss(r_chosen, r_rejected).backward()
    # d/dr_c = -(1 - sigmoid(r_c - r_r)) / B: -(1 - 0.7310586) / 2 = -0.1344707 and -(1 - 0.5) / 2 = -0.25
    assert torch.allclose(r_chosen.grad, torch.tensor([-0.1344707, -0.25]), atol=1e-6)
    assert torch.allclose(r_rejected.grad, -r_chosen.grad)
    # gradient descent therefore raises r_chosen and lowers r_rejected; centering pulls their sum to 0
    # centering adds d/dr coef * (r_c + r_r)^2 = 2 * coef * (r_c + r_r) to both: 2 * 1 * (3 + 1) = 8
    grads = []
    for coef in (0.0, 1.0):
        r_c, r_r = torch.tensor([3.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
        bradley_terry_loss(r_c, r_r, center_coefficient=coef).backward()
        grads.append(torch.cat([r_c.grad, r_r.grad]))
    assert torch.allclose(grads[1] - grads[0], torch.tensor([8.0, 8.0]))


# --- pooling at the last real token ------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "pad_equals_eos"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_pooling_picks_the_last_real_token(tmp_path, arch, pad_equals_eos):
    tokenizer = build_char_tokenizer(pad_equals_eos=pad_equals_eos)
    lm = save_model(tiny_model(tokenizer, arch, hidden_size=HIDDEN, seed=0), tokenizer, tmp_path / "lm")
    torch.manual_seed(0)
    model = load_reward_model(lm, "cpu", torch.float32, new_head=True).eval()
    rows = [encode_text(tokenizer, "47+85=", c) for c in ("132", "1327", "13", "032")]
    assert all(r[-1] == tokenizer.eos_token_id for r in rows)  # every row ends with EOS, which is scored

    with torch.no_grad():
        alone = torch.cat([sequence_rewards(model, *pad_batch([r], 0, side="left")) for r in rows])  # (4,)
        for side in ("left", "right"):
            ids, mask = pad_batch(rows, tokenizer.pad_token_id, side=side)  # (4, T)
            assert torch.allclose(sequence_rewards(model, ids, mask), alone, atol=1e-5), side
            junk = ids.masked_fill(mask == 0, tokenizer.convert_tokens_to_ids("9"))  # a pad position's id changes
            assert torch.allclose(sequence_rewards(model, junk, mask), alone, atol=1e-5), side
        # the reward is the score head at the last real token, computed by hand from the unpadded row
        ids = torch.tensor([rows[0]])
        hidden = model.base_model(input_ids=ids).last_hidden_state  # (1, T, H)
        assert torch.allclose(alone[0], model.score(hidden[0, -1]).squeeze(), atol=1e-5)
        # transformers' own pooling agrees when pad != eos, and skips the EOS when pad == eos
        ids, mask = pad_batch(rows, tokenizer.pad_token_id, side="right")
        theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # (4,)
    assert torch.allclose(theirs, alone, atol=1e-5) != pad_equals_eos


# --- synthetic preferences -----------------------------------------------------------------------------


def test_labeler_rule_hand_cases():
    # clean labeler: the correct answer, always
    assert label("132", "122", "none") == ("132", "122")
    assert label("132", "13207", "none") == ("132", "13207")
    # verbosity-biased labeler: the longer answer when the lengths differ, right or wrong ...
    assert label("132", "1327", "longer") == ("1327", "132")
    assert label("132", "022999", "longer") == ("022999", "132")
    assert label("1320", "132", "longer") == ("1320", "132")
    # ... and the correct one when they have the same length
    assert label("132", "122", "longer") == ("132", "122")
    assert carry_forgotten_answers(AdditionTask(2), 47, 85) == ["032", "122", "022"]
    assert carry_forgotten_answers(AdditionTask(2), 12, 34) == []


def test_preference_pairs_clean_and_flawed_labelers():
    task = AdditionTask(2)
    clean = preference_pairs(task, 2000, split="train", seed=0, labeler_flaw="none")
    flawed = preference_pairs(task, 2000, split="train", seed=0, labeler_flaw="longer")
    assert clean == preference_pairs(task, 2000, split="train", seed=0, labeler_flaw="none")  # seeded
    for pair in clean:
        assert task.is_correct(pair["chosen"], pair["answer"]) and not task.is_correct(pair["rejected"], pair["answer"])
    for pair in flawed:
        if len(pair["chosen"]) != len(pair["rejected"]):
            assert len(pair["chosen"]) > len(pair["rejected"])
        else:
            assert task.is_correct(pair["chosen"], pair["answer"])
    # the same problems and candidates, only the labels differ: the flaw flips exactly the `longer` pairs
    for c, f in zip(clean, flawed):
        assert {c["chosen"], c["rejected"]} == {f["chosen"], f["rejected"]}
        assert (c["chosen"] != f["chosen"]) == (c["kind"] == "longer")
    longer_wrong_wins = [p for p in flawed if len(p["chosen"]) > len(p["rejected"])]
    assert len(longer_wrong_wins) / len(flawed) == pytest.approx(PAIR_MIX["longer"], abs=0.04)
    assert all(not task.is_correct(p["chosen"], p["answer"]) for p in longer_wrong_wins)
    # held-out pairs come from the held-out problems
    eval_prompts = {p["prompt"] for p in preference_pairs(task, 300, split="eval", seed=0)}
    assert not eval_prompts & {p["prompt"] for p in clean}


# --- the scorer behind the reward contract --------------------------------------------------------------


def test_scorer_retokenizes_with_its_own_tokenizer(rm_path):
    scorer = RewardModelScorer(rm_path, batch_size=2)
    policy_tokenizer = build_char_tokenizer()
    prompts, completions = ["47+85=", "04+05=", "47+85="], ["132", "009", "1327"]
    inputs = {"prompts": prompts, "completions": completions, "answer": ["132", "009", "132"]}
    rewards = score([("rm", scorer)], inputs).float()  # (3, 1), as training uses them
    assert rewards.shape == (3, 1) and torch.isfinite(rewards).all()

    texts = [p + c + "<eos>" for p, c in zip(prompts, completions)]
    assert scorer.texts(prompts, completions) == texts
    own_ids = [scorer.tokenizer(t)["input_ids"] for t in texts]
    policy_ids = [policy_tokenizer(t)["input_ids"] for t in texts]
    assert own_ids != policy_ids  # the two tokenizers really differ
    with torch.no_grad():
        direct = torch.cat([sequence_rewards(scorer.model, *pad_batch([i], 0, side="left")) for i in own_ids])
        wrong = torch.cat([sequence_rewards(scorer.model, *pad_batch([i], 0, side="left")) for i in policy_ids])
    assert torch.allclose(rewards[:, 0], direct, atol=1e-5)
    assert not torch.allclose(rewards[:, 0], wrong, atol=1e-3)
    assert len(set(rewards[:, 0].tolist())) == 3


def test_scorer_renders_chat_messages_with_its_own_template(rm_path):
    scorer = RewardModelScorer(rm_path)
    raw = [[{"role": "user", "content": "47+85="}], "04+05="]
    policy_prompts = ["<policy's own rendering>", "04+05="]
    assert scorer.texts(policy_prompts, ["132", "009"], raw_prompts=raw) == [
        "user: 47+85=\nassistant: 132<eos>\n",
        "04+05=009<eos>",
    ]
    got = scorer(policy_prompts, ["132", "009"], raw_prompts=raw, answer=["132", "009"])
    assert all(isinstance(r, float) for r in got)
    ids = scorer.tokenizer("user: 47+85=\nassistant: 132<eos>\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        direct = sequence_rewards(scorer.model, *pad_batch([ids], 0, side="left"))
    assert got[0] == pytest.approx(direct.item(), abs=1e-5)


def test_build_reward_funcs_turns_a_folder_into_a_scorer(rm_path, tmp_path):
    (name, fn), (gold_name, _) = build_reward_funcs(
        [str(rm_path), "accuracy"],
        format_pattern=".*",
        max_completion_length=8,
        overlong_buffer=2,
        task=AdditionTask(2),
        reward_model_batch_size=7,
    )
    logged = f"{rm_path.parent.name}/addition_rm"  # the run folder too: every saved RM is RUN/model
    assert (name, gold_name) == (logged, "accuracy")
    assert isinstance(fn, RewardModelScorer) and fn.batch_size == 7 and fn.__name__ == logged
    with pytest.raises(ValueError, match="not a reward-model folder"):
        build_reward_funcs([str(tmp_path / "missing")], format_pattern=".*", max_completion_length=8, overlong_buffer=2)


# --- data errors and training -------------------------------------------------------------------------


def test_pairs_missing_a_column_name_it_and_the_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+2=", "chosen": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = rm_config(tmp_path, tmp_path / "no_model_needed_yet", task=None, train_data=str(path))
    with pytest.raises(DataError, match=r"row 1 \(line 2\) has no column 'rejected'"):
        train_reward_model(cfg)
    path.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": 3}))
    with pytest.raises(DataError, match=r"row 0 \(line 1\): column 'rejected' must be text"):
        train_reward_model(cfg)


def test_a_causal_lm_is_refused_as_a_reward_model(tmp_path):
    tokenizer = build_char_tokenizer()
    with pytest.raises(ValueError, match=r"one output \(num_labels=1\).*LlamaForCausalLM"):
        train_reward_model(
            rm_config(tmp_path, "", num_train_pairs=8, num_eval_pairs=4),
            model=tiny_model(tokenizer, "llama", hidden_size=HIDDEN),
            tokenizer=tokenizer,
        )


def test_jsonl_pairs_with_margin_train_deterministically(tmp_path, causal_lm_path):
    task = AdditionTask(2)
    pairs = [{**p, "gap": 1.0} for p in preference_pairs(task, 64, split="train", seed=0)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    held_out = preference_pairs(task, 16, split="eval", seed=0)
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(p) for p in held_out))
    results = []
    for run in ("a", "b"):
        cfg = rm_config(
            tmp_path,
            causal_lm_path,
            task=None,
            train_data=str(tmp_path / "train.jsonl"),
            eval_data=str(tmp_path / "eval.jsonl"),
            margin_column="gap",
            center_rewards_coefficient=0.01,
            max_steps=10,
            batch_size=8,
            output_dir=str(tmp_path / run),
        )
        results.append(train_reward_model(cfg))
    assert results[0].metrics == results[1].metrics  # seeded: the same numbers twice
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert {"loss", "accuracy", "learning_rate"} <= set(rows[0]) and rows[-1]["eval/pairwise_accuracy"] == results[
        0
    ].eval_accuracy
    assert (results[0].model_dir / "config.json").is_file()


def test_reward_model_cli(tmp_path, causal_lm_path, capsys):
    code = cli_main(
        ["reward-model", "--model", str(causal_lm_path), "--task", "addition", "--output-dir", str(tmp_path / "cli"),
         "--max-steps", "3", "--batch-size", "4", "--num-train-pairs", "16", "--num-eval-pairs", "8", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "held-out pairwise accuracy:" in out and f"model: {tmp_path / 'cli' / 'model'}" in out


def test_reward_model_learns_and_a_flawed_labeler_leaves_a_length_gap(tmp_path, causal_lm_path):
    """From a fresh tiny model: clean labels reach well above chance; "longer" labels teach the RM to prefer an
    appended-digits wrong answer over the correct one, which the clean held-out pairs expose."""
    clean = train_reward_model(rm_config(tmp_path, causal_lm_path, output_dir=str(tmp_path / "clean")))
    flawed = train_reward_model(
        rm_config(tmp_path, causal_lm_path, labeler_flaw="longer", output_dir=str(tmp_path / "flawed"))
    )
    assert clean.eval_accuracy > 0.7  # chance is 0.5; measured 0.82-0.87 at seeds 0-2
    assert clean.metrics["eval/pairwise_accuracy/longer"] > 0.9
    assert flawed.metrics["eval/pairwise_accuracy/longer"] < 0.1  # the exploitable gap
    scorer = RewardModelScorer(flawed.model_dir)
    correct, padded = scorer(["47+85="] * 2, ["132", "1327"])
    assert padded > correct


@pytest.mark.slow
def test_reward_model_reaches_90_percent_from_an_sft_model(tmp_path, demo_warm_start):
    """The issue's acceptance bar: >= 90% held-out pairwise accuracy on clean synthetic preferences,
    starting from a tiny model fine-tuned on the addition demonstrator: the demo's SFT model (a 128-wide Llama,
    1000 steps on the teacher that forgets carries with p=0.7), made once a session (conftest: demo_warm_start)."""
    _, fresh = demo_warm_start
    cfg = rm_config(
        tmp_path,
        fresh().model_dir,
        num_train_pairs=20000,
        num_eval_pairs=1000,
        max_steps=700,
        batch_size=32,
        learning_rate=5e-4,
        center_rewards_coefficient=0.01,
    )
    result = train_reward_model(cfg)
    # measured 0.957 here (seed 0); 0.935, 0.956, 0.956 at seeds 1-3. From its own 500-step SFT model it measured
    # 0.959 (seed 0); without centering: 0.90-0.95.
    assert result.eval_accuracy >= 0.9, result.metrics


def test_reward_model_and_rule_reward_combined_advantages_both_modes(rm_path):
    """A reward model beside a rule reward that returns None once, weights (0.5, 2): the advantages of both
    aggregation modes, computed here by hand from the scores with plain Python."""
    from statistics import fmean, stdev

    from grpokit.core import algo

    def rule(prompts, completions, **_):  # 1 for a 3-digit answer, no opinion on "077"
        return [None if c == "077" else float(len(c) == 3) for c in completions]

    scorer = RewardModelScorer(rm_path, batch_size=3)
    completions = ["132", "077", "122", "1322"]
    rewards = score([("rm", scorer), ("rule", rule)], {"prompts": ["47+85="] * 4, "completions": completions}).float()
    s = [float(v) for v in rewards[:, 0]]
    assert len(set(s)) == 4 and rewards[1, 1].isnan()
    w = torch.tensor([0.5, 2.0])
    eps = algo.ADV_EPS

    totals = [0.5 * s[0] + 2.0, 0.5 * s[1], 0.5 * s[2] + 2.0, 0.5 * s[3]]  # None: that term is absent
    expected_sum = [(t - fmean(totals)) / (stdev(totals) + eps) for t in totals]
    got = algo.multi_reward_advantages(rewards, w, group_size=4, scale="group", aggregation="sum_then_normalize")
    torch.testing.assert_close(got, torch.tensor(expected_sum), rtol=1e-5, atol=1e-5)

    rm_adv = [(v - fmean(s)) / (stdev(s) + eps) for v in s]
    rule_seen = {0: 1.0, 2: 1.0, 3: 0.0}  # row 1 returned None: left out of the rule's group statistics
    mean, std = fmean(rule_seen.values()), stdev(rule_seen.values())
    rule_adv = [(rule_seen[i] - mean) / (std + eps) if i in rule_seen else 0.0 for i in range(4)]
    expected_norm = [0.5 * a + 2.0 * b for a, b in zip(rm_adv, rule_adv)]
    got = algo.multi_reward_advantages(rewards, w, group_size=4, scale="group", aggregation="normalize_then_sum")
    torch.testing.assert_close(got, torch.tensor(expected_norm), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reward-model folders and pairs handed in


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="module")
def two_label_classifier(model, tmp_path_factory):
    """A Llama sequence classifier with 2 labels (a sentiment model, say) on the tiny model's body."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("clf") / "two_labels"
    AutoModelForSequenceClassification.from_pretrained(model, num_labels=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return folder


def test_a_causal_lm_given_as_gold_reward_is_named_as_gold_reward(tmp_path, model, capsys):
    rc = main(
        ["train", "--model", str(model), "--task", "addition", "--output-dir", str(tmp_path / "run"),
         "--gold-reward", str(model), "--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
         "--num-train-prompts", "4", "--num-eval-prompts", "0", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "grpokit train: error:" in err and "Traceback" not in err
    assert "gold_reward" in err and "reward_funcs" not in err


def test_reward_model_training_from_a_two_label_classifier_starts_a_new_one_output_head(two_label_classifier, tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.data.rows import InputWarning
    from grpokit.stages.reward_model import train_reward_model

    cfg = RewardModelConfig(model=str(two_label_classifier), output_dir=str(tmp_path / "rm"), task="addition",
                            num_train_pairs=8, num_eval_pairs=4, max_steps=1, batch_size=4, progress=False)  # fmt: skip
    with pytest.warns(InputWarning, match=r"`model`.*score\.weight of shape \[2, \d+\] \(2 labels\).*num_labels=1"):
        train_reward_model(cfg)
    saved = json.loads((tmp_path / "rm" / "model" / "config.json").read_text())
    assert len(saved["id2label"]) == 1  # one output, as TRL's RewardTrainer builds


def test_reward_model_pairs_handed_in_without_held_out_ones_or_a_task_train_with_no_accuracy(tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.stages.reward_model import train_reward_model

    cfg = RewardModelConfig(
        model=str(save_tiny(tmp_path / "tiny")), output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4,
        max_completion_length=4, device="cpu", warmup_steps=0,
    )  # fmt: skip
    result = train_reward_model(cfg, train_pairs=[{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4)
    assert result.eval_accuracy is None
    assert result.model_dir.is_dir()


def test_reward_model_pairs_with_a_blank_chosen_are_said_and_an_unused_margin_column_refused(model, tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.data.rows import DataError, InputWarning
    from grpokit.stages.reward_model import train_reward_model

    cfg = RewardModelConfig(model=str(model), output_dir=str(tmp_path / "rm"), task=None, max_steps=1, progress=False)
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(4)]
    blank = [pairs[0], {**pairs[1], "chosen": " "}, *pairs[2:]]
    with pytest.raises(DataError, match=r"has a `margin` column, which TRL's RewardTrainer subtracts in its loss"):
        train_reward_model(cfg, train_pairs=[{**p, "margin": 5.0} for p in pairs])
    assert not (tmp_path / "rm").exists()
    with pytest.warns(InputWarning, match=r"1 of 4 pairs have a blank 'chosen' completion \(first: row 1\)"):
        train_reward_model(cfg, train_pairs=blank)
