"""Multi-turn rollouts (`rollout.multiturn.MultiTurnSampler`, `rollout.environments`): token in, token out; the
loss mask 1 exactly on what the model sampled; the limits and what each does; errors of tools (told to the model)
and of environments (named); what the rewards receive; per-turn seeds. Scripted samplers write fixed token ids (no
model), so each test knows every id of the rollout; the logprob, gradient and resume tests run the tiny models."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
from helpers import HIDDEN, read_jsonl

from grpokit.core import packing
from grpokit.core.types import Rollout
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.data.tasks.tokenizer import DEFAULT_CHARS
from grpokit.rollout.environments import EnvironmentFailure, calc, environment_maker
from grpokit.rollout.multiturn import MultiTurnSampler, TurnLimits, episode_figures, rollout_counts
from grpokit.rollout.sampler import KVCacheSampler, SamplingParams

CHARS = DEFAULT_CHARS + "<>"  # the tag syntax's brackets (the default alphabet has none)


def char_tokenizer(pad_equals_eos: bool = False):
    return build_char_tokenizer(CHARS, pad_equals_eos=pad_equals_eos)


TOK = char_tokenizer()


def enc(text: str, tokenizer=TOK) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt(text: str, tokenizer=TOK) -> list[int]:
    return [tokenizer.bos_token_id, *enc(text, tokenizer)]


class Scripted:
    """A sampler that writes `reply(history, g)` (token ids; g: the draw's place among the call's num_generations),
    cut to `max_new_tokens` (then truncated); its k-th token's logprob is -(k + 1) / 100. Keeps every call."""

    def __init__(self, reply, tokenizer=TOK):
        self.reply, self.tokenizer, self.calls = reply, tokenizer, []

    def update_weights(self, weights) -> None:
        pass

    def generate(self, prompt_ids, *, num_generations, params, seeds):
        self.calls.append({"prompts": [list(p) for p in prompt_ids], "G": num_generations, "seeds": seeds})
        G, pad = num_generations, self.tokenizer.pad_token_id
        rows, cut = [], []
        for p in prompt_ids:
            for g in range(G):
                ids = list(self.reply(list(p), g))
                cut.append(len(ids) > params.max_new_tokens)
                rows.append(ids[: params.max_new_tokens])
        prompts = [list(p) for p in prompt_ids for _ in range(G)]
        tp, tc = max(map(len, prompts)), max(map(len, rows))
        return Rollout(
            prompt_ids=torch.tensor([[pad] * (tp - len(p)) + p for p in prompts]),
            prompt_mask=torch.tensor([[0] * (tp - len(p)) + [1] * len(p) for p in prompts]),
            completion_ids=torch.tensor([r + [pad] * (tc - len(r)) for r in rows]),
            completion_mask=torch.tensor([[1] * len(r) + [0] * (tc - len(r)) for r in rows]),
            sampling_logp=torch.tensor([[-(k + 1) / 100 for k in range(len(r))] + [0.0] * (tc - len(r)) for r in rows]),
            truncated=torch.tensor(cut),
            group_size=G,
        )


def turn_of(history: list[int], tokenizer=TOK, marker: str = "<result>") -> int:
    """How many observations the history holds: the scripted model's turn is this + 1."""
    return tokenizer.decode(history).count(marker)


def by_turn(*turns: str, eos_last: bool = True):
    """A reply writing `turns[k]` at turn k + 1 (the last one ended by EOS)."""

    def reply(history, g):
        k = turn_of(history)
        return enc(turns[k]) + ([TOK.eos_token_id] if eos_last and k == len(turns) - 1 else [])

    return reply


def tools_sampler(inner, *tools, timeout=None, **limits) -> MultiTurnSampler:
    make = environment_maker(list(tools), None, tool_format="tags", timeout=timeout)
    return MultiTurnSampler(inner, TOK, make, TurnLimits(**limits))


def real_ids(rollout: Rollout, i: int) -> list[int]:
    return rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()


def unpadded_prompt(rollout: Rollout, i: int) -> list[int]:
    return rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()


PROMPTS = [prompt("12+34="), prompt("7+8=")]
CALC_TURNS = ("<calc>1+2</calc>", "<calc>3*4</calc>", "15")


def three_turns(**limits):
    inner = Scripted(by_turn(*CALC_TURNS))
    sampler = tools_sampler(inner, calc, **limits)
    rollout = sampler.generate(PROMPTS, num_generations=2, params=SamplingParams(max_new_tokens=96), seeds=[5, 6])
    return inner, rollout


# ---------------------------------------------------------------------------------------------- token in, token out
def test_the_loss_mask_is_one_exactly_on_the_sampled_tokens():
    """A 3-turn tool rollout: the completion is turn 1, the tool's answer, turn 2, the answer, turn 3 (its EOS
    kept); loss mask 1 on the model's turns (each turn's last token too), 0 on the answers; every token real; the
    sampler's logprobs kept on sampled tokens, 0 on inserted ones. Fails if inserted tokens were trained, a turn's
    end token dropped from the loss, or the mask inferred from the ids."""
    _, rollout = three_turns()
    t1, t2, t3 = enc(CALC_TURNS[0]), enc(CALC_TURNS[1]), enc(CALC_TURNS[2]) + [TOK.eos_token_id]
    o1, o2 = enc("<result>3</result>"), enc("<result>12</result>")
    want_ids = t1 + o1 + t2 + o2 + t3
    want_mask = [1] * len(t1) + [0] * len(o1) + [1] * len(t2) + [0] * len(o2) + [1] * len(t3)
    want_logp = [-(k + 1) / 100 for k in range(len(t1))] + [0.0] * len(o1)
    want_logp += [-(k + 1) / 100 for k in range(len(t2))] + [0.0] * len(o2) + [-(k + 1) / 100 for k in range(len(t3))]
    assert rollout.completion_ids.shape == (4, len(want_ids))
    for i in range(4):
        assert rollout.completion_ids[i].tolist() == want_ids
        assert rollout.loss_mask[i].tolist() == want_mask
        assert rollout.completion_mask[i].tolist() == [1] * len(want_ids)
        assert rollout.sampling_logp[i].tolist() == pytest.approx(want_logp, abs=1e-7)
        episode = rollout.episodes[i]
        assert (episode.num_turns, episode.ended_by, episode.done) == (3, "done", True)
        assert [kind for kind, _ in episode.pieces] == ["model", "inserted", "model", "inserted", "model"]
    assert not bool(rollout.truncated.any())


def test_the_ids_the_trainer_forwards_are_what_the_sampler_saw_at_every_turn():
    """Every call of the wrapped sampler continued a prefix of the row the trainer forwards (its prompt + the first
    tokens of its completion), and together the calls cover every turn of every row. Fails on any rewrite of the
    history between turns that changes its ids (a dropped separator, an observation encoded another way, a
    re-rendered template; re-encoding the model's tokens is the next test's, with a tokenizer where it shows)."""
    inner, rollout = three_turns()
    assert [len(call["prompts"]) for call in inner.calls] == [2, 4, 4]  # turn 1: one call, G each; then per row
    assert [call["G"] for call in inner.calls] == [2, 1, 1]
    for turn, call in enumerate(inner.calls[1:], start=2):
        for i, history in enumerate(call["prompts"]):
            forwarded = unpadded_prompt(rollout, i) + real_ids(rollout, i)
            assert history == forwarded[: len(history)], (turn, i)
            assert turn_of(history) == turn - 1
    assert inner.calls[0]["prompts"] == PROMPTS


def test_nothing_the_model_wrote_is_re_encoded():
    """A BPE tokenizer whose merge `a b -> ab` makes decode-then-encode of the ids [a, b] give [ab]: the scripted
    model writes a and b as two tokens, and the rollout (and the next turn's history) keeps the two ids. Fails if a
    turn's text were encoded again."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "a": 3, "b": 4, "ab": 5, "o": 6, "k": 7, "ok": 8}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("o", "k")]))
    backend.decoder = decoders.Fuse()
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    a, b, ab = vocab["a"], vocab["b"], vocab["ab"]
    assert bpe("ab", add_special_tokens=False)["input_ids"] == [ab]  # what re-encoding would give

    class Ok:
        def reset(self, **columns):
            return None

        def step(self, text):
            assert text == "ab"  # the environment reads text; the ids stay the model's
            return "ok", 0.0, False

    inner = Scripted(lambda history, g: [a, b], tokenizer=bpe)
    sampler = MultiTurnSampler(inner, bpe, Ok, TurnLimits(max_turns=2))
    rollout = sampler.generate([[2, a]], num_generations=1, params=SamplingParams(max_new_tokens=8), seeds=[0])
    ok = vocab["ok"]
    assert real_ids(rollout, 0) == [a, b, ok, a, b]
    assert rollout.loss_mask[0].tolist() == [1, 1, 0, 1, 1]
    assert inner.calls[1]["prompts"] == [[2, a, a, b, ok]]


def test_a_tool_tag_the_tokenizer_cannot_write_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """A character tokenizer without `<` (as the default alphabet was): `</calc>` could never be sampled, and every
    rollout would stay one turn without a word. A GRPOTrainer refuses it before its model loads (a load would raise
    here), naming the tool and the config field; a sampler built by hand refuses it at its first rollout. Fails if
    such a run started, or the error named grpokit's own class (ToolUse) instead of the tool."""
    from helpers import config

    import grpokit.stages.grpo
    from grpokit.core.types import ConfigError

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the tool's tags were checked")

    monkeypatch.setattr(grpokit.stages.grpo, "training_model", no_load)
    plain = build_char_tokenizer(DEFAULT_CHARS.replace("<", "").replace(">", ""))
    said = r"config field `tools`: the tool `calc` is called as <calc>...</calc> .*cannot write '</calc>'"
    folder = tmp_path / "tiny"
    tiny_model(plain, "llama", hidden_size=HIDDEN, seed=0).save_pretrained(folder)
    plain.save_pretrained(folder)
    with pytest.raises(ConfigError, match=said):
        grpokit.stages.grpo.GRPOTrainer(config(folder, tmp_path / "out", max_steps=1), tools=[calc])
    make = environment_maker([calc], None, tool_format="tags", timeout=None)
    sampler = MultiTurnSampler(Scripted(lambda history, g: [5], plain), plain, make, TurnLimits())
    with pytest.raises(ConfigError, match=said):
        sampler.generate([[2, 5]], num_generations=1, params=SamplingParams(max_new_tokens=4), seeds=[0])


# ---------------------------------------------------------------------------------------------- the loss mask trains
def tiny_folder(path, *, pad_equals_eos: bool = False):
    tokenizer = char_tokenizer(pad_equals_eos)
    tiny_model(tokenizer, "llama", hidden_size=HIDDEN, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Recording(MultiTurnSampler):
    """A multi-turn sampler keeping the last Rollout it returned."""

    def generate(self, *args, **kwargs):
        self.last = super().generate(*args, **kwargs)
        return self.last


class HiddenProbe:
    """A forward hook on a decoder that runs the whole step's rows as one padded micro-batch: it adds `shift` to the
    last hidden states that predict the completion tokens `where` marks (so their logits change, nothing else), and
    keeps the gradient of those states."""

    def __init__(self, decoder, sampler: Recording, where, shift: float = 0.0):
        self.sampler, self.where, self.shift, self.grads = sampler, where, shift, []
        decoder.register_forward_hook(self, with_kwargs=True)

    def positions(self):
        r = self.sampler.last
        lay = packing.build("padded", r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        marked = self.where(r)[lay.valid]  # (M,) in the order of the hidden states that predict real tokens
        return lay, lay.source_row[marked], lay.source_pos[marked]

    def __call__(self, module, args, kwargs, output):
        lay, rows, positions = self.positions()
        assert torch.equal(kwargs["input_ids"], lay.input_ids)  # the rows and layout the positions are for
        hidden = output.last_hidden_state
        if self.shift:
            delta = torch.zeros_like(hidden)
            delta[rows, positions] = self.shift
            hidden = hidden + delta
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: self.grads.append(grad[rows, positions].clone()))
        output.last_hidden_state = hidden
        return output


def inserted(r: Rollout) -> torch.Tensor:
    return r.completion_mask.bool() & ~r.loss_mask.bool()


def ends_in_4(completions, **_):
    return [float(c.endswith("4")) for c in completions]


def calc_reply(history, g):
    """Turn 1: 1+2 or 1+3 (by the draw), turn 2: 3*4, turn 3: the first result's digit and EOS (rewards differ
    inside a group; every row has the same length)."""
    k, text = turn_of(history), TOK.decode(history)
    if k == 0:
        return enc(f"<calc>1+{g + 2}</calc>")
    if k == 1:
        return enc("<calc>3*4</calc>")
    return enc(text.split("<result>")[1][0]) + [TOK.eos_token_id]


ROWS = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "56+11=", "answer": "67"}]  # one prompt length


def grpo_trainer(tmp_path, name, reply=calc_reply, *, folder=None, tools=(calc,), trainer=None, **overrides):
    """A GRPO (or PPO: `trainer`) step's trainer over `reply`'s rollouts, all rows one padded micro-batch."""
    from helpers import config

    from grpokit.stages.grpo import GRPOTrainer

    folder = folder or tiny_folder(tmp_path / "tiny")
    tokenizer = char_tokenizer(overrides.pop("pad_equals_eos", False))
    limits = TurnLimits(mask_inserted_tokens=overrides.pop("mask_inserted_tokens", True))
    sampler = Recording(Scripted(reply, tokenizer), tokenizer, environment_maker(list(tools), None,
                        tool_format="tags", timeout=None), limits)  # fmt: skip
    values = {"max_completion_length": 96, "training_forward": "padded", "max_tokens_per_micro_batch": None,
              "prompts_per_step": 2, "num_generations": 2, **overrides}  # fmt: skip
    cfg = config(folder, tmp_path / name, **values)
    make = trainer or GRPOTrainer
    return make(cfg, sampler=sampler, reward_funcs=[("ends_in_4", ends_in_4)], tokenizer=tokenizer), sampler


def test_inserted_tokens_get_no_gradient_and_their_logits_do_not_move_the_loss(tmp_path):
    """Through GRPOTrainer.step (its real update) on a 3-turn tool rollout: the gradient reaching the hidden states
    that predict inserted tokens is exactly 0 (and not at sampled ones), and shifting those states (their logits)
    leaves the loss (beta > 0: its KL term reads the logits; the surrogate's value is 0 at ratio 1 whatever they
    are) and the updated weights as they were; with `mask_inserted_tokens: false` the same shift moves the loss and
    the inserted states get gradient (the probe sees what it should). Fails if the update trained any inserted
    token."""
    folder = tiny_folder(tmp_path / "tiny")
    runs = {}
    for name, shift, masked in (("plain", 0.0, True), ("shifted", 3.0, True), ("unmasked", 3.0, False)):
        trainer, sampler = grpo_trainer(tmp_path, name, folder=folder, mask_inserted_tokens=masked, beta=0.1)
        where = inserted if masked else inserted_by_text
        probe = HiddenProbe(trainer.policy.model.get_decoder(), sampler, where, shift=shift)
        trained = HiddenProbe(trainer.policy.model.get_decoder(), sampler, lambda r: r.loss_mask.bool())
        metrics, _ = trainer.step(ROWS)
        weights = {k: v.detach().clone() for k, v in trainer.policy.model.named_parameters()}
        runs[name] = (metrics, weights, probe.grads)
        if name == "plain":
            assert int(inserted(sampler.last).sum()) == 4 * len(enc("<result>3</result><result>12</result>"))
            assert probe.grads and all(bool((g == 0).all()) for g in probe.grads)
            assert bool((trained.grads[0].abs().sum(-1) > 0).all())  # every sampled token's state gets gradient
    plain, shifted, unmasked = runs["plain"], runs["shifted"], runs["unmasked"]
    assert shifted[0]["loss"] == plain[0]["loss"]
    assert all(torch.equal(shifted[1][k], plain[1][k]) for k in plain[1])
    assert abs(unmasked[0]["loss"] - plain[0]["loss"]) > 1e-4 and bool((unmasked[2][0] != 0).any())


def inserted_by_text(r: Rollout) -> torch.Tensor:
    """The inserted tokens of the unmasked control (its loss mask is all 1): from the episodes' pieces."""
    out = torch.zeros_like(r.completion_mask, dtype=torch.bool)
    for i, episode in enumerate(r.episodes):
        at = 0
        for kind, text in episode.pieces:
            n = len(enc(text))
            out[i, at : at + n] = kind == "inserted"
            at += n
    return out


def test_pad_equals_eos_a_mid_sequence_end_token_stays_attended_and_trained(tmp_path):
    """pad == eos: a turn ended by EOS, then an observation, then a last turn. Through a real GRPO step the mid EOS
    is real (completion_mask 1), in the loss (mask 1) and its state gets gradient. Fails if a mask were inferred
    from `ids != pad` anywhere from the wrapped sampler's output to the update."""
    eos = 1  # (the char tokenizer's; pad is it too here)

    class Continue:
        def reset(self, **columns):
            return None

        def step(self, text):
            return ("<result>go</result>", 0.0, False)

    def reply(history, g):  # turn 1: 12 or 14 (by the draw); turn 2: its last digit (rewards differ in a group)
        if turn_of(history) == 0:
            return enc(f"1{2 + 2 * g}") + [eos]
        return enc(TOK.decode(history, skip_special_tokens=True).split("<result>")[0][-1]) + [eos]

    folder = tiny_folder(tmp_path / "tiny", pad_equals_eos=True)
    from helpers import config

    from grpokit.stages.grpo import GRPOTrainer

    tokenizer = char_tokenizer(pad_equals_eos=True)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == eos
    sampler = Recording(Scripted(reply, tokenizer), tokenizer, Continue, TurnLimits(max_turns=2))
    cfg = config(folder, tmp_path / "out", max_completion_length=32, training_forward="padded",
                 max_tokens_per_micro_batch=None, prompts_per_step=2, num_generations=2)  # fmt: skip
    trainer = GRPOTrainer(cfg, sampler=sampler, reward_funcs=[("ends_in_4", ends_in_4)], tokenizer=tokenizer)

    def mid_eos(r: Rollout) -> torch.Tensor:
        out = torch.zeros_like(r.completion_mask, dtype=torch.bool)
        out[:, 2] = True  # "1", "2", EOS
        return out

    probe = HiddenProbe(trainer.policy.model.get_decoder(), sampler, mid_eos)
    batch = trainer.sample(ROWS)
    r = sampler.last
    assert r.completion_ids[:, 2].tolist() == [eos] * 4
    assert r.completion_mask[:, 2].tolist() == [1] * 4 and batch.mask[:, 2].tolist() == [1.0] * 4
    assert r.completion_ids[0, 3:].tolist() == enc("<result>go</result>2") + [eos]
    trainer.step(ROWS)
    assert probe.grads and bool((probe.grads[-1].abs().sum(-1) > 0).all())


# ---------------------------------------------------------------------------------------------- the limits
class Always:
    """An environment that answers every turn with `observation` (None: ends the episode) and counts its steps."""

    observation = "<result>more</result>"

    def __init__(self):
        self.steps = 0

    def reset(self, **columns):
        return None

    def step(self, text):
        self.steps += 1
        return self.observation, float(self.steps), False


def test_max_turns_ends_the_row_after_its_last_turn_which_is_still_stepped():
    """max_turns 2: two model turns, one observation between them; the environment's step ran on the last turn too
    (its reward is kept), and its observation is not inserted. Fails if the last turn went unscored or the loop ran
    one turn more or less."""
    inner = Scripted(by_turn("a", "b", "c", eos_last=False))
    sampler = MultiTurnSampler(inner, TOK, Always, TurnLimits(max_turns=2))
    r = sampler.generate(PROMPTS[:1], num_generations=2, params=SamplingParams(max_new_tokens=64), seeds=[0])
    for i, episode in enumerate(r.episodes):
        assert (episode.num_turns, episode.ended_by, episode.done) == (2, "max_turns", False)
        assert episode.environment.steps == 2 and episode.step_rewards == [1.0, 2.0]
        assert real_ids(r, i) == enc("a<result>more</result>b")
    assert episode_figures(rollout_counts(r.episodes, 0))["turns/ended_max_turns"] == 2.0
    assert len(inner.calls) == 2


@pytest.mark.parametrize("room_after", [1, 0], ids=["fits-with-one-token-left", "would-leave-none"])
def test_an_observation_that_would_leave_no_room_is_rolled_back(room_after):
    """max_completion_length counts the model's and the inserted tokens: an observation after which one token is
    left is inserted (the next turn gets that one token, then the row is cut); one that would leave none is not
    inserted (rolled back), and the row ends truncated by `overflow`. Fails on an off-by-one in the budget."""
    turn = enc("abc")
    observation = enc(Always.observation)
    budget = len(turn) + len(observation) + room_after
    inner = Scripted(lambda history, g: turn)
    sampler = MultiTurnSampler(inner, TOK, Always, TurnLimits(max_turns=4))
    r = sampler.generate(PROMPTS[:1], num_generations=1, params=SamplingParams(max_new_tokens=budget), seeds=[0])
    episode = r.episodes[0]
    assert bool(r.truncated[0])
    if room_after:
        assert real_ids(r, 0) == turn + observation + turn[:1] and episode.ended_by == "length"
    else:
        assert real_ids(r, 0) == turn and r.loss_mask[0].tolist() == [1] * len(turn)
        assert episode.ended_by == "overflow" and episode.environment.steps == 1
        assert episode_figures(rollout_counts(r.episodes, 0))["turns/ended_overflow"] == 1.0
    assert len(r.completion_ids[0]) <= budget


def test_an_observation_is_cut_to_max_tool_output_tokens():
    """Fails if a long tool output were inserted whole or the cut went uncounted."""
    inner = Scripted(lambda history, g: enc("a") if history == PROMPTS[0] else enc("b") + [TOK.eos_token_id])
    sampler = MultiTurnSampler(inner, TOK, Always, TurnLimits(max_turns=2, max_tool_output_tokens=4))
    r = sampler.generate(PROMPTS[:1], num_generations=1, params=SamplingParams(max_new_tokens=64), seeds=[0])
    assert real_ids(r, 0) == enc("a") + enc(Always.observation)[:4] + enc("b") + [TOK.eos_token_id]
    assert r.episodes[0].observations_cut == 1
    assert episode_figures(rollout_counts(r.episodes, 0))["turns/observations_cut"] == 1.0


def words(text: str) -> str:
    """A tool whose answer is long: 200 words."""
    return " ".join(["word"] * 200)


def test_a_cut_tool_answer_keeps_its_result_tags():
    """Tag syntax, max_tool_output_tokens 24 (the char tokenizer: `<result>` 8 tokens, `</result>` 9): the answer is
    `<result>`, the output's first 7 tokens, `</result>`, and counted as cut; a limit the two tags fill is refused
    before any rollout. Fails if the cut went through the closing tag (the model would read an unclosed `<result>`
    and write on inside it)."""
    from grpokit.core.types import ConfigError
    from grpokit.rollout.multiturn import check_tool_syntax

    inner = Scripted(by_turn("<words>x</words>", "ok"))
    r = tools_sampler(inner, words, max_tool_output_tokens=24).generate(
        PROMPTS[:1], num_generations=1, params=SamplingParams(max_new_tokens=96), seeds=[0]
    )
    episode = r.episodes[0]
    assert episode.pieces[1] == ("inserted", "<result>word wo</result>")
    assert real_ids(r, 0)[len(enc("<words>x</words>")) :][:24] == enc("<result>") + enc("word wo") + enc("</result>")
    assert episode.observations_cut == 1 and episode.num_turns == 2
    make = environment_maker([words], None, tool_format="tags", timeout=None)
    with pytest.raises(ConfigError, match=r"`max_tool_output_tokens` is 17, and an answer's tags <result> and "
                       r"</result> take 17 tokens"):  # fmt: skip
        check_tool_syntax(TOK, make(), 17)
    check_tool_syntax(TOK, make(), 18)


class CountingTokenizer:
    """TOK, keeping the length of every text it is asked to tokenize."""

    def __init__(self):
        self.lengths = []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return TOK(text, **kwargs)

    def __getattr__(self, name):
        return getattr(TOK, name)


def test_a_huge_tool_output_is_bounded_before_it_is_tokenized():
    """A tool that returns a million characters, max_tool_output_tokens 32: no text longer than (32 + 1) x the
    vocabulary's longest entry (the bound on characters per token) is tokenized, and the answer is the whole output's
    first tokens inside its tags, counted as cut; one whose whole text is an environment's own observation (no tags)
    keeps its first 32 tokens. Fails if the whole output were tokenized to keep 32 of its tokens."""
    huge_text = "0123456789" * 100_000

    def huge(text: str) -> str:
        return huge_text

    class Loud(Always):
        observation = huge_text

    counting = CountingTokenizer()
    bound = (32 + 1) * max(map(len, TOK.get_vocab()))
    make = environment_maker([huge], None, tool_format="tags", timeout=None)
    for factory, want in [(make, "<result>" + huge_text[:15] + "</result>"), (Loud, huge_text[:32])]:
        inner = Scripted(lambda history, g: enc("<huge>x</huge>") if history == PROMPTS[0] else enc("ok"))
        sampler = MultiTurnSampler(inner, counting, factory, TurnLimits(max_turns=2, max_tool_output_tokens=32))
        r = sampler.generate(PROMPTS[:1], num_generations=1, params=SamplingParams(max_new_tokens=96), seeds=[0])
        assert r.episodes[0].pieces[1] == ("inserted", want) and r.episodes[0].observations_cut == 1
    assert max(counting.lengths) <= bound < 10_000


def test_a_tool_past_its_timeout_is_told_to_the_model_and_counted():
    """A tool blocked on an event never set, `tool_timeout` 0.2 s: the model's next turn reads that it timed out,
    the row goes on, and tools/timeouts counts it. Fails if a hung tool hung the rollout, or went uncounted."""
    release = threading.Event()

    def wait(text: str) -> str:
        release.wait()
        return "never"

    inner = Scripted(by_turn("<wait>x</wait>", "ok"))
    try:
        r = tools_sampler(inner, wait, timeout=0.2).generate(
            PROMPTS[:1], num_generations=2, params=SamplingParams(max_new_tokens=96), seeds=[0]
        )
    finally:
        release.set()  # (the daemon threads end)
    told = "<result>error: wait timed out after 0.2 s</result>"
    assert TOK.decode(inner.calls[1]["prompts"][0]).endswith(told)
    for episode in r.episodes:
        assert episode.pieces[1] == ("inserted", told) and episode.ended_by == "done"
        assert episode.tool_timeouts == 1 and episode.tool_errors == 0
        assert episode.tool_calls == [{"name": "wait", "arguments": {"text": "x"}, "error": told[8:-9]}]
    figures = episode_figures(rollout_counts(r.episodes, 0))
    assert figures["tools/timeouts"] == 2.0 and figures["tools/failure_frequency"] == 1.0


def test_a_tool_that_raises_is_told_to_the_model_and_counted():
    """Fails if a tool's exception stopped the rollout, or the model did not read it, or it went uncounted."""

    def boom(text: str) -> str:
        raise ValueError(f"cannot read {text}")

    inner = Scripted(by_turn("<boom>x</boom>", "<calc>1+1</calc>", "ok"))
    r = tools_sampler(inner, boom, calc).generate(
        PROMPTS[:1], num_generations=1, params=SamplingParams(max_new_tokens=160), seeds=[0]
    )
    episode = r.episodes[0]
    assert episode.pieces[1] == ("inserted", "<result>error: ValueError: cannot read x</result>")
    assert episode.tool_errors == 1 and episode.tool_timeouts == 0 and episode.num_turns == 3
    assert [call.get("error") for call in episode.tool_calls] == ["error: ValueError: cannot read x", None]
    assert episode_figures(rollout_counts(r.episodes, 0))["tools/errors"] == 1.0


def test_the_last_turns_tool_calls_are_not_made():
    """max_turns 2 and a model that calls a tool every turn: the tool runs once (turn 1), not for the last turn, whose
    output the model would never read; the row ends at max_turns, not done. Fails if the last turn's call ran (a
    python tool would spend its sandbox time for nothing)."""
    calls = []

    def count(text: str) -> str:
        calls.append(text)
        return "seen"

    inner = Scripted(by_turn("<count>a</count>", "<count>b</count>", eos_last=False))
    r = tools_sampler(inner, count, max_turns=2).generate(
        PROMPTS[:1], num_generations=1, params=SamplingParams(max_new_tokens=160), seeds=[0]
    )
    episode = r.episodes[0]
    assert calls == ["a"] and episode.num_turns == 2
    assert (episode.ended_by, episode.done, len(episode.tool_calls)) == ("max_turns", False, 1)


class Failing:
    """An environment whose step at `turn` of the instance numbered `which` (made in row order) does `what`."""

    made = 0

    def __init__(self, which: int, turn: int, what):
        self.number, self.which, self.turn, self.what, self.steps = Failing.made, which, turn, what, 0
        Failing.made += 1

    def reset(self, **columns):
        return None

    def step(self, text):
        self.steps += 1
        if self.number == self.which and self.steps == self.turn:
            return self.what()
        return "<result>go</result>", 0.0, False


def failing(which: int, turn: int, what):
    Failing.made = 0
    return lambda: Failing(which, turn, what)


def run_failing(which, turn, what):
    inner = Scripted(by_turn("a", "b", "c"))
    sampler = MultiTurnSampler(inner, TOK, failing(which, turn, what), TurnLimits(max_turns=3))
    return sampler.generate(PROMPTS, num_generations=2, params=SamplingParams(max_new_tokens=64), seeds=[0, 1])


def test_an_environment_whose_step_raises_is_named_with_its_row_and_turn():
    """Row 3 (prompt 1, generation 1) raises at turn 2. Fails if the error lost the row, or went to the model."""

    def raise_it():
        raise KeyError("board")

    with pytest.raises(EnvironmentFailure, match=r"\(Failing\)\.step raised KeyError: 'board' \(prompt 1, "
                       r"generation 1, turn 2\)"):  # fmt: skip
        run_failing(3, 2, raise_it)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (lambda: ("x", 1.0), r"returned \('x', 1\.0\); expected \(observation or None, reward, done\)"),
        (lambda: ("x", math.nan, False), r"returned the reward nan: a reward is a finite number"),
        (lambda: ("x", "high", False), r"returned the reward 'high' \(str\), which is not a number"),
        (lambda: ("x", "1.0", False), r"returned the reward '1.0' \(str\), which is not a number"),
        (lambda: ("x", 0.0, "no"), r"returned done = 'no' \(str\): done is a bool"),
        (lambda: (7, 0.0, False), r"returned an observation grpokit cannot insert"),
    ],
    ids=["not-a-triple", "nan-reward", "text-reward", "numeric-text-reward", "text-done", "not-text"],
)
def test_a_step_answer_outside_the_contract_is_named(answer, said):
    """Fails if a malformed answer were taken (a NaN reward reaching the advantages) or named without its row."""
    with pytest.raises(EnvironmentFailure, match=said) as caught:
        run_failing(2, 1, answer)
    assert "(Failing)" in str(caught.value) and "prompt 1, generation 0, turn 1" in str(caught.value)


def test_numpy_numbers_and_bools_are_a_step_answer():
    """A numpy float reward and a numpy bool `done` (what a numpy game returns) are taken. Fails if the type check
    refused them."""
    import numpy as np

    r = run_failing(2, 1, lambda: ("<result>go</result>", np.float32(0.5), np.bool_(False)))
    assert r.episodes[2].step_rewards[0] == 0.5 and r.episodes[2].num_turns == 3


class Board:
    """An environment of TRL's form (no step: its method is its tool)."""

    def reset(self, **columns):
        return None

    def move(self, where: str) -> str:
        """Move.

        Args:
            where: the square.
        """
        return "moved"


@pytest.mark.parametrize("form", ["plain", "trl"])
def test_a_factory_that_returns_one_instance_for_every_row_is_refused(form):
    """`environment_factory=lambda: SHARED`: the rows would step one object concurrently (a guessing game's tries
    counted over every row). Refused at the start of the rollout, naming the class and the rows, for an environment
    with its own step and for TRL's form (the user's instance under grpokit's ToolUse). Fails if it ran."""
    from grpokit.rollout.environments import TRLEnvironment

    shared = Always() if form == "plain" else Board()
    make = (lambda: shared) if form == "plain" else environment_maker([], TRLEnvironment(lambda: shared),
                                                                      tool_format="tags", timeout=None)  # fmt: skip
    sampler = MultiTurnSampler(Scripted(by_turn("a", "b")), TOK, make, TurnLimits(max_turns=2))
    name = type(shared).__name__
    with pytest.raises(EnvironmentFailure, match=rf"returned the same {name} object for rows 0 and 1 \(prompt 0, "
                       r"generation 0 and prompt 0, generation 1\): make an environment per row"):  # fmt: skip
        sampler.generate(PROMPTS[:1], num_generations=2, params=SamplingParams(max_new_tokens=32), seeds=[0])
    assert form == "trl" or shared.steps == 0  # refused before any row stepped it


def test_an_environment_without_a_module_is_refused_by_its_form():
    """`environment: mygame` (no `:factory`): the error says what the field takes, not "a built-in name" (there are
    no built-in environments). Fails on the reward functions' message."""
    from grpokit.config import GRPOConfig
    from grpokit.core.types import ConfigError
    from grpokit.stages.setup import environments

    with pytest.raises(ConfigError, match=r"`environment` is 'mygame': expected `package.module:factory` .*no "
                       r"built-in ones"):  # fmt: skip
        environments(GRPOConfig(environment="mygame"))


def test_a_tool_named_like_the_answer_tag_is_refused():
    """A tool `result` in the tag syntax: its calls and every answer would share `<result>`. Fails if accepted."""
    from grpokit.core.types import ConfigError

    def result(text: str) -> str:
        return text

    with pytest.raises(ConfigError, match=r"tool 'result' has the name of the tag every tool's answer comes in"):
        environment_maker([result], None, tool_format="tags", timeout=None)


def test_a_two_argument_tool_in_the_tag_syntax_is_refused_with_the_way_out():
    """Fails if the refusal did not say which format takes such a tool."""
    from grpokit.core.types import ConfigError

    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ConfigError, match=r"tool 'add' takes 2 arguments \(a, b\); in the tag syntax a tool takes one"
                       r".*with tool_format: chat a tool takes its arguments by name"):  # fmt: skip
        environment_maker([add], None, tool_format="tags", timeout=None)


def test_the_docs_example_environment_plays_as_documented():
    """docs/environments.md's `Guess`, run as written: 5 (higher), 9 (lower), 7 (done); its step rewards and its
    reward(). Fails if the page's example no longer fits the contract."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    (code,) = re.findall(r"<!-- example: run by tests/test_multiturn.py -->\n```python\n(.*?)```", page, flags=re.S)
    namespace: dict = {}
    exec(code, namespace)
    guesses = iter(["5", "9", "7"])
    inner = Scripted(lambda history, g: enc(next(guesses)) + [TOK.eos_token_id])
    sampler = MultiTurnSampler(inner, TOK, namespace["Guess"], TurnLimits(max_turns=8))
    r = sampler.generate(PROMPTS[:1], num_generations=1, params=SamplingParams(max_new_tokens=48), seeds=[0],
                         rows=[{"prompt": "guess", "answer": "7"}])  # fmt: skip
    episode = r.episodes[0]
    assert [text for _, text in episode.pieces] == ["5", "higher", "9", "lower", "7"]
    assert episode.step_rewards == [0.0, 0.0, 1.0] and episode.ended_by == "done"
    assert episode.environment.reward() == pytest.approx(1 / 3)


def test_the_docs_example_pays_nothing_to_an_episode_a_length_cut_ended():
    """The page's `Guess` with max_completion_length 12: row 0's first turn reaches it (step() is never called), row
    1 guesses 5 (higher) and its second turn reaches it. reward() is 0 for both, unsolved. Fails if the example
    divided by zero tries (the run stopped) or paid an unsolved episode."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    (code,) = re.findall(r"<!-- example: run by tests/test_multiturn.py -->\n```python\n(.*?)```", page, flags=re.S)
    namespace: dict = {}
    exec(code, namespace)

    def reply(history, g):
        long = enc("1" * 20)
        return long if "higher" in TOK.decode(history) or g == 0 else enc("5") + [TOK.eos_token_id]

    sampler = MultiTurnSampler(Scripted(reply), TOK, namespace["Guess"], TurnLimits(max_turns=8))
    r = sampler.generate(PROMPTS[:1], num_generations=2, params=SamplingParams(max_new_tokens=12), seeds=[0],
                         rows=[{"prompt": "guess", "answer": "7"}])  # fmt: skip
    assert [e.ended_by for e in r.episodes] == ["length", "length"] and [e.num_turns for e in r.episodes] == [1, 2]
    assert [e.step_rewards for e in r.episodes] == [[], [0.0]]
    assert [e.environment.reward() for e in r.episodes] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------- rewards
class Keyed:
    """An environment with its own step: two turns, step rewards 0.5 then 1.0, reward() 1 for key "b"."""

    def __init__(self):
        self.columns, self.steps = None, 0

    def reset(self, **columns):
        self.columns = columns
        return None

    def step(self, text):
        self.steps += 1
        return ("<result>seen</result>" if self.steps < 2 else None), 0.5 * self.steps, self.steps >= 2

    def reward(self):
        return float(self.columns["key"] == "b")


def test_rewards_get_each_rows_environment_turns_and_transcript(tmp_path):
    """Through GRPOTrainer(environment_factory=) and a 1-step run: rewards get `environments` (G distinct live
    instances per prompt, each reset with its own row's columns), `num_turns`, `tool_calls`, `step_rewards` and the
    transcript as `completions` (chat prompts: assistant and tool messages in order); the environment's reward()
    and step rewards are reward columns in metrics.jsonl. Fails if rows and environments were misaligned, shared,
    copied, or the transcript lost a turn."""
    from helpers import config

    from grpokit.stages.grpo import GRPOTrainer

    seen = []

    def records(environments, num_turns, tool_calls, step_rewards, completions, key, **_):
        seen.append({"environments": environments, "num_turns": num_turns, "tool_calls": tool_calls,
                     "step_rewards": step_rewards, "completions": completions, "key": key})  # fmt: skip
        return [0.0] * len(key)

    rows = [{"prompt": [{"role": "user", "content": "1+2="}], "key": "a"},
            {"prompt": [{"role": "user", "content": "3+4="}], "key": "b"}]  # fmt: skip
    made = []

    def factory():
        made.append(Keyed())
        return made[-1]

    G = 3
    inner = Scripted(lambda history, g: enc(f"t{turn_of(history)}g{g}"))
    cfg = config(tiny_folder(tmp_path / "tiny"), tmp_path / "out", task=None, max_steps=1, num_generations=G,
                 max_completion_length=48)  # fmt: skip
    trainer = GRPOTrainer(cfg, sampler=inner, tokenizer=TOK, train_dataset=rows, reward_funcs=[("records", records)],
                          environment_factory=factory)  # fmt: skip
    trainer.train()
    (got,) = seen
    envs = got["environments"]
    assert len(envs) == 2 * G and len({id(e) for e in envs}) == 2 * G
    assert all(any(e is m for m in made) for e in envs)  # the live instances, not copies
    order = [row["key"] for row in trainer.train_rows for _ in range(G)]  # (one step: the seeded order's first 2)
    step_keys = got["key"]
    assert sorted(step_keys) == ["a"] * G + ["b"] * G and order  # both prompts, G rows each
    for i, env in enumerate(envs):
        row = next(r for r in rows if r["key"] == step_keys[i])
        assert env.columns == row  # its own row's columns (the prompt included)
    assert got["num_turns"] == [2] * (2 * G) and got["step_rewards"] == [[0.5, 1.0]] * (2 * G)
    assert got["tool_calls"] == [[]] * (2 * G)
    for i, messages in enumerate(got["completions"]):
        g = i % G
        assert messages == [{"role": "assistant", "content": f"t0g{g}"}, {"role": "tool", "content": "<result>seen"
                            "</result>"}, {"role": "assistant", "content": "t1g0"}]  # fmt: skip
    (row,) = [r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "reward" in r]
    assert row["rewards/Keyed/mean"] == 0.5 and row["rewards/Keyed_steps/mean"] == 1.5
    assert row["turns/mean"] == 2.0 and row["tools/call_frequency"] == 0.0
    # config.yaml records the functions passed in, not the environment's columns (its `environment` brings them back:
    # a replay of the config would otherwise look for reward functions named Keyed and Keyed_steps)
    import yaml

    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["reward_funcs"] == ["records"]


# ---------------------------------------------------------------------------------------------- seeds
class Echo:
    """Answers every turn; a turn ends at any of a few common characters (a random tiny model's turns are short)."""

    stop_strings = tuple("aeio0123")

    def __init__(self):
        self.steps = 0

    def reset(self, **columns):
        return columns.get("opening")

    def step(self, text):
        self.steps += 1
        return "<result>x</result>", 0.0, False


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(TOK, "llama", hidden_size=HIDDEN, seed=0).eval()


def echo_rollout(model, prompt_ids, seeds, rows=None, *, max_new_tokens=64):
    inner = KVCacheSampler(TOK)
    inner.update_weights(model)
    sampler = MultiTurnSampler(inner, TOK, Echo, TurnLimits(max_turns=3))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
    return sampler.generate(prompt_ids, num_generations=2, params=params, seeds=seeds, rows=rows)


def test_sampler_and_trainer_logprobs_agree_across_turns(tiny):
    """The in-process sampler's logprobs of every sampled token, in every turn, equal the trainer's forward of the
    whole row (its observations attended) to 1e-5. Fails if a later turn sampled from another history than the one
    forwarded (re-encoded, or positions restarted)."""
    from grpokit.model.logprobs import completion_logprobs

    r = echo_rollout(tiny, [prompt("12+34="), prompt("7+8="), prompt("250+17=")], [3, 4, 5])
    later = r.loss_mask.bool() & (r.loss_mask.cumsum(-1) < torch.arange(1, r.loss_mask.shape[1] + 1))  # after a hole
    assert int(later.sum()) > 20 and max(e.num_turns for e in r.episodes) == 3
    with torch.no_grad():
        logp, _ = completion_logprobs(tiny, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                      temperature=1.0)  # fmt: skip
    trained = r.loss_mask.bool()
    assert float((logp - r.sampling_logp)[trained].abs().max()) < 1e-5
    assert bool((r.sampling_logp[inserted(r)] == 0).all())


def test_a_seeded_multi_turn_rollout_reproduces_and_a_prompts_rows_do_not_depend_on_the_batch(tiny):
    """The same seeds give the same rollout; prompt 1's rows are the same alone as beside others, also when another
    prompt's environment opens with an observation and its own does not. Fails if a turn's draws depended on the
    other rows of the call (turn 1 per row for every prompt once one prompt is not at its bare prompt)."""
    ids = [prompt("12+34="), prompt("7+8="), prompt("250+17=")]
    rows = [{"opening": "<result>hi</result>"}, {}, {}]
    together = echo_rollout(tiny, ids, [3, 4, 5], rows)
    again = echo_rollout(tiny, ids, [3, 4, 5], rows)
    alone = echo_rollout(tiny, ids[1:2], [4], rows[1:2])
    assert torch.equal(together.completion_ids, again.completion_ids)
    assert torch.equal(together.loss_mask, again.loss_mask)
    for g in range(2):
        assert real_ids(together, 2 + g) == real_ids(alone, g)
        assert (
            together.loss_mask[2 + g][: len(real_ids(alone, g))].tolist()
            == alone.loss_mask[g][: len(real_ids(alone, g))].tolist()
        )
    assert real_ids(together, 0)[: len(enc("<result>hi</result>"))] == enc("<result>hi</result>")
    other = echo_rollout(tiny, ids[1:2], [9], rows[1:2])
    assert real_ids(other, 0) != real_ids(alone, 0)  # the seed matters


# ---------------------------------------------------------------------------------------------- PPO
def test_ppo_trains_on_a_multi_turn_rollout_with_values_only_at_trained_tokens(tmp_path):
    """PPO with tools: the step trains the policy and the critic; shifting the critic's values at the inserted
    tokens (a hook on its head) changes no figure and no weight: they are in neither GAE nor the value loss.
    Fails if the value loss or GAE read the real-token mask instead of the loss mask."""
    from grpokit.config import PPOConfig
    from grpokit.stages.ppo import PPOTrainer

    folder = tiny_folder(tmp_path / "tiny")

    def ppo(cfg, **kwargs):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
        return PPOTrainer(PPOConfig(**fields), **kwargs)

    runs = {}
    for name, shift in (("plain", 0.0), ("shifted", 50.0)):
        trainer, sampler = grpo_trainer(tmp_path, name, folder=folder, trainer=ppo)
        before = {k: v.detach().clone() for k, v in trainer.policy.model.named_parameters()}
        critic_before = {k: v.detach().clone() for k, v in trainer.critic.model.named_parameters()}

        def bump(module, args, output, sampler=sampler, shift=shift):
            r = sampler.last
            marked = inserted(r)[r.completion_mask.bool()]  # (M,) the order of the head's rows
            assert output.shape == (len(marked), 1)
            return output + shift * marked.to(output.dtype)[:, None]

        trainer.critic.model.head.register_forward_hook(bump)
        metrics, _ = trainer.step(ROWS)
        after = dict(trainer.policy.model.named_parameters())
        critic_after = dict(trainer.critic.model.named_parameters())
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy trained
        assert any(not torch.equal(critic_before[k], critic_after[k]) for k in critic_before)  # and the critic
        runs[name] = metrics, {k: v.detach().clone() for k, v in [*after.items(), *critic_after.items()]}
    (plain, w_plain), (shifted, w_shifted) = runs["plain"], runs["shifted"]
    for key in ("loss", "value_loss", "values/mean", "returns/mean", "advantages/mean", "critic/grad_norm"):
        assert shifted[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key
    assert all(torch.allclose(w_shifted[k], w_plain[k], rtol=0, atol=1e-7) for k in w_plain)
    assert plain["value_loss"] > 0 and plain["tools/call_frequency"] == 2.0


# ---------------------------------------------------------------------------------------------- resume
def test_a_resumed_multi_turn_run_equals_the_straight_run(tmp_path):
    """Per-turn seeds come from the prompts' seeds (step, place): a run stopped after step 1 and resumed gives the
    straight run's weights, optimizer state and figures at step 2. Fails if a turn drew from a stream a resume does
    not restore."""
    from helpers import config
    from test_resume import assert_same_run

    from grpokit.stages.grpo import GRPOTrainer

    folder = tiny_folder(tmp_path / "tiny")
    calls = []

    def reward(completions, **_):
        calls.append(1)
        if stop_at and len(calls) == stop_at:
            raise ConnectionError("reward backend unreachable")
        return [float(len(c) % 3) for c in completions]

    def run(out, **overrides):
        cfg = config(folder, out, max_steps=2, save_every=1, max_completion_length=24, num_generations=2,
                     max_turns=3, **overrides)  # fmt: skip
        return GRPOTrainer(cfg, reward_funcs=[("graded", reward)], tokenizer=TOK, environment_factory=Echo)

    stop_at = 2
    from grpokit.rewards.functions import RewardError

    with pytest.raises(RewardError, match="ConnectionError"):
        run(tmp_path / "stopped").train()
    stop_at = 0
    run(tmp_path / "stopped", resume_from_checkpoint="latest").train()
    run(tmp_path / "straight").train()
    assert_same_run(tmp_path / "straight", tmp_path / "stopped", 2)
    rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "reward" in r]
    assert all(r["turns/mean"] > 1 for r in rows)  # the runs were multi-turn


# ---------------------------------------------------------------------------------------------- grpokit eval
def bigram_folder(path):
    """A model that writes `<calc>7*8</calc>` after `=` and then ends (greedy or sampled: its logits are a bigram
    table 100 apart): `<calc>` and `</calc>` are tokens of its tokenizer, the attention and MLP outputs are 0, the
    embeddings one-hot. After a tool's `</result>` it writes EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    tokenizer.add_tokens(["<calc>", "</calc>"])
    V = len(tokenizer)
    H = 8 * math.ceil(V / 8)  # (4 heads of an even size)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = tokenizer.convert_tokens_to_ids
    chain = {"=": "<calc>", "<calc>": "7", "7": "*", "*": "8", "8": "</calc>", "</calc>": "<eos>", ">": "<eos>"}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        for before, after in chain.items():
            model.lm_head.weight[ids(after), ids(before)] = 100.0 / math.sqrt(H)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_grpokit_eval_with_tools_runs_multi_turn(tmp_path, capsys):
    """`grpokit eval --tools calc` wraps the eval sampler as training does: the model's `<calc>7*8</calc>` is
    answered and the held-out turns and tool calls are reported; without tools the same model's rollouts are one
    turn and no tool figure is printed. Fails if eval ignored `tools`."""
    from grpokit.cli import main

    folder = bigram_folder(tmp_path / "bigram")
    base = ["eval", "--model", str(folder), "--num-eval-prompts", "3", "--max-completion-length", "40"]
    assert main(base) == 0
    without = capsys.readouterr().out
    assert main([*base, "--tools", "calc"]) == 0
    with_tools = capsys.readouterr().out
    assert "tools/call_frequency" not in without and "turns" not in without
    assert "addition held-out tools/call_frequency, greedy: 1.0000" in with_tools
    assert "addition held-out turns, greedy: 2.0000" in with_tools
    assert "addition held-out turns, sampled (T=1): 2.0000" in with_tools


def test_the_gold_check_reads_a_multi_turn_rows_final_turn(tmp_path):
    """The built-in `accuracy` reward and held-out accuracy compare the model's final turn with `answer`, not the
    transcript, whose tool calls and outputs no answer equals: a model that asks the calculator and then answers
    right scores 1 in training and in evaluation. Fails if either compared the whole transcript (it scored 0)."""
    from helpers import config

    from grpokit.stages.grpo import GRPOTrainer

    rows = [{"prompt": "37+1=", "answer": "38"}, {"prompt": "40+2=", "answer": "42"}]

    def reply(history, g):  # asks the calculator, then writes its result
        text = TOK.decode(history)
        if "<result>" not in text:
            return enc(f"<calc>{text.split('=')[0].split(' ')[-1].strip()}</calc>")
        return enc(text.rsplit("<result>", 1)[1].split("</result>")[0]) + [TOK.eos_token_id]

    cfg = config(tiny_folder(tmp_path / "tiny"), tmp_path / "out", task=None, max_steps=1, num_generations=2,
                 max_completion_length=48, tools=["calc"], eval_every=1, num_eval_prompts=2)  # fmt: skip
    trainer = GRPOTrainer(cfg, sampler=Scripted(reply), tokenizer=TOK, train_dataset=rows, eval_dataset=rows)
    trainer.train()
    logged = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    (step,) = [r for r in logged if "reward" in r]
    assert step["rewards/accuracy/mean"] == 1.0 and step["tools/call_frequency"] == 1.0
    assert [r["eval/accuracy_greedy"] for r in logged if "eval/accuracy_greedy" in r] == [1.0, 1.0]
