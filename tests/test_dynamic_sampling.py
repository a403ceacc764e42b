"""Dynamic sampling (DAPO, `dynamic_sampling: true`): a step whose groups have no reward spread replaces them with
the groups of further prompts of the seeded order, and then IS a normal step on the groups it kept: the same gradient
as those groups handed to a step without it (under `loss_type: dapo`, whose normalizer counts the batch's tokens,
and a batch-level advantage scale); micro-batched or not, the same; at its cap it trains what it has and says so; a
resumed run is the straight run. The 2-rank run against one process is in test_distributed.py.

The rewards are flat for chosen prompts (keyed on a data column), so which groups are flat is decided by the test,
not by what a tiny model happens to write."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import RecordingSampler, config, digit_share, read_jsonl

from grpokit.config import ConfigError, PPOConfig
from grpokit.core import algo
from grpokit.core.types import Rollout
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.stages.dynamic_sampling import join_rollouts
from grpokit.stages.grpo import GRPOTrainer

P, G = 4, 4  # prompts per step, completions per prompt


def data_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "key": i} for i in range(n)]


class FlatFor:
    """A reward that gives every completion of a prompt whose `key` is in `keys` the same 0.5 (a flat group) and
    grades the others (`digit_share`: a spread in every group); `crash_in_step`: raise in that step (1-based)."""

    def __init__(self, keys=(), crash_in_step: int | None = None):
        self.keys, self.crash_in_step = set(keys), crash_in_step

    def __call__(self, prompts, completions, key, trainer_state, **_):
        if self.crash_in_step is not None and trainer_state.global_step == self.crash_in_step - 1:
            raise ConnectionError("reward backend unreachable")
        return [0.5 if k in self.keys else r for k, r in zip(key, digit_share(prompts, completions))]


def trainer(out, reward, *, sampler=None, **overrides) -> GRPOTrainer:
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
    values = {"train_data": None, "prompts_per_step": P, "num_generations": G, "max_steps": 1, **overrides}
    return GRPOTrainer(
        config("in-memory", out, **values), model=model, tokenizer=tokenizer, reward_funcs=[("graded", reward)],
        train_dataset=data_rows(), sampler=sampler,
    )  # fmt: skip


class GradTap:
    """Each trainable parameter's gradient after the last backward of an update (before the optimizer step clips
    and applies it), and how many backwards added to it, through torch's post-accumulate-grad hooks."""

    def __init__(self, t: GRPOTrainer):
        self.grads: dict[str, torch.Tensor] = {}
        self.backwards: dict[str, int] = {}
        for name, p in t.policy.model.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, name=name: self._keep(name, p))

    def _keep(self, name: str, p: torch.Tensor) -> None:
        self.grads[name] = p.grad.detach().clone()
        self.backwards[name] = self.backwards.get(name, 0) + 1


class Replay:
    """A sampler that hands back, for each prompt it is asked for, the completions a recorded run drew for it (the
    rows of the recorded rollouts), padded here as one batch: prompts to the left, completions to the right, to the
    longest real row."""

    def __init__(self, rollouts: list[Rollout], pad_token_id: int):
        self.pad, self.groups = pad_token_id, {}
        for r in rollouts:
            for start in range(0, r.num_sequences, r.group_size):
                prompt = r.prompt_ids[start][r.prompt_mask[start].bool()]
                self.groups[tuple(prompt.tolist())] = [
                    (prompt, r.completion_ids[i][r.completion_mask[i].bool()],
                     r.sampling_logp[i][r.completion_mask[i].bool()], bool(r.truncated[i]))
                    for i in range(start, start + r.group_size)
                ]  # fmt: skip

    def update_weights(self, weights) -> None:
        pass

    def generate(self, prompt_ids, *, num_generations, params, seeds) -> Rollout:
        rows = [row for ids in prompt_ids for row in self.groups[tuple(ids)]]
        tp, tc = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)

        def padded(t: torch.Tensor, width: int, fill, left: bool) -> torch.Tensor:
            pad = torch.full((width - len(t),), fill, dtype=t.dtype)
            return torch.cat([pad, t] if left else [t, pad])

        return Rollout(
            prompt_ids=torch.stack([padded(p, tp, self.pad, True) for p, *_ in rows]),
            prompt_mask=torch.stack([padded(torch.ones_like(p), tp, 0, True) for p, *_ in rows]),
            completion_ids=torch.stack([padded(c, tc, self.pad, False) for _, c, *_ in rows]),
            completion_mask=torch.stack([padded(torch.ones_like(c), tc, 0, False) for _, c, *_ in rows]),
            sampling_logp=torch.stack([padded(lp, tc, 0.0, False) for _, _, lp, _ in rows]),
            truncated=torch.tensor([cut for *_, cut in rows]),
            group_size=num_generations,
        )


def trained_prompts(samples: list[dict]) -> list[str]:
    """The step's prompts in batch order, from its logged completions (every prompt has some)."""
    return list(dict.fromkeys(s["prompt"] for s in samples))


# ---------------------------------------------------------------- the choice, by hand


def test_kept_groups_are_the_first_with_spread_then_the_earliest_flat():
    F, T = False, True
    assert algo.kept_groups(torch.tensor([T, F, T, F, F, F]), 3).tolist() == [1, 3, 4]  # 5: a surplus
    assert algo.kept_groups(torch.tensor([T, T, F, T]), 3).tolist() == [0, 1, 2]  # the cap: flat 0, 1 fill in
    assert algo.kept_groups(torch.tensor([F, F]), 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="at least 3 groups"):
        algo.kept_groups(torch.tensor([F, F]), 3)


def test_a_group_is_dropped_only_when_its_advantages_are_all_zero_under_either_aggregation():
    """Rewards (2, 0) and (0, 1) weighted 1 and 2 total 2 on both rows: flat summed, yet under normalize_then_sum each
    column has spread and the advantages are not 0, so the group is kept; a column of weight 0 does not count; a None
    row is left out of its column, as the advantages leave it."""
    nan = float("nan")
    rewards = torch.tensor(
        [
            [2.0, 0.0],
            [0.0, 1.0],  # group 0: totals equal, columns not
            [1.0, 1.0],
            [1.0, 1.0],  # group 1: flat everywhere
            [1.0, 0.0],
            [1.0, 5.0],  # group 2: only column 2 has spread
            [1.0, nan],
            [0.0, 3.0],
        ]
    )  # group 3: column 2 has one row: flat; column 1 has spread
    for weights, aggregation, expected in [
        ([1.0, 2.0], "sum_then_normalize", [True, True, False, False]),
        ([1.0, 2.0], "normalize_then_sum", [False, True, False, False]),
        ([1.0, 0.0], "normalize_then_sum", [False, True, True, False]),
    ]:
        w = torch.tensor(weights)
        flat = algo.signal_free_groups(rewards, w, group_size=2, aggregation=aggregation)
        assert flat.tolist() == expected, (weights, aggregation)
        advantages = algo.multi_reward_advantages(rewards, w, group_size=2, scale="group", aggregation=aggregation)
        assert ((advantages.reshape(4, 2) == 0).all(-1)).tolist() == expected  # the one definition: advantages 0


def test_joined_rollouts_pad_each_side_and_keep_only_used_columns():
    a = Rollout(
        prompt_ids=torch.tensor([[5, 6]]), prompt_mask=torch.tensor([[1, 1]]),
        completion_ids=torch.tensor([[7, 1, 0]]), completion_mask=torch.tensor([[1, 1, 0]]),
        sampling_logp=torch.tensor([[-0.5, -0.25, 0.0]]), truncated=torch.tensor([False]), group_size=1,
    )  # fmt: skip
    b = Rollout(
        prompt_ids=torch.tensor([[0, 8, 9, 4]]), prompt_mask=torch.tensor([[0, 1, 1, 1]]),
        completion_ids=torch.tensor([[3]]), completion_mask=torch.tensor([[1]]),
        sampling_logp=torch.tensor([[-2.0]]), truncated=torch.tensor([True]), group_size=1,
        loss_mask=torch.tensor([[0]]),
    )  # fmt: skip
    joined = join_rollouts([a, b], pad_token_id=0)
    assert joined.prompt_ids.tolist() == [[0, 5, 6], [8, 9, 4]]  # 3 = the longest real prompt
    assert joined.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert joined.completion_ids.tolist() == [[7, 1], [3, 0]]  # a's unused third column is gone
    assert joined.completion_mask.tolist() == [[1, 1], [1, 0]]
    assert joined.sampling_logp.tolist() == [[-0.5, -0.25], [-2.0, 0.0]]
    assert joined.loss_mask.tolist() == [[1, 1], [0, 0]]  # a had none: every real token of a trains
    assert joined.truncated.tolist() == [False, True]


# ---------------------------------------------------------------- a step, against a normal step by hand


@pytest.mark.parametrize(("loss_type", "scale"), [("dapo", "batch"), ("grpo", "group")])
def test_flat_groups_are_replaced_and_the_step_is_a_normal_step_on_the_kept_groups(loss_type, scale, tmp_path):
    settings = {"loss_type": loss_type, "scale_rewards": scale}
    reward, recorded = FlatFor(), RecordingSampler()
    a = trainer(tmp_path / "a", reward, sampler=recorded, dynamic_sampling=True, **settings)
    order = copy.deepcopy(a.prompt_order).take(2 * P)  # the seeded order: round 1 takes its first P, round 2 the next
    keys = [a.train_rows[i]["key"] for i in order]
    reward.keys = {keys[0], keys[2]}  # half of round 1's groups are flat
    tap_a = GradTap(a)
    metrics, samples = a.step()

    # round 1's two groups with spread, then round 2's first two; round 2's last two are a surplus
    kept = [keys[1], keys[3], keys[4], keys[5]]
    row = {r["key"]: r for r in a.train_rows}
    assert len(recorded.rollouts) == 2  # two generation rounds
    assert trained_prompts(samples) == a.encode([row[k] for k in kept]).seen  # the flat groups' prompts absent
    assert metrics["dynamic_sampling/rounds"] == 2
    assert metrics["dynamic_sampling/groups_dropped"] == 2
    assert metrics["dynamic_sampling/surplus_dropped"] == 2
    assert metrics["dynamic_sampling/flat_trained"] == 0
    assert metrics["dynamic_sampling/prompts_sampled_per_kept"] == 2.0  # 8 sampled for 4 kept
    assert metrics["frac_reward_zero_std"] == 0.0  # of the trained batch

    # the kept groups by hand: the same completions (replayed), trained by a step without dynamic sampling
    b = trainer(tmp_path / "b", FlatFor(reward.keys), sampler=Replay(recorded.rollouts, 0), **settings)
    tap_b = GradTap(b)
    metrics_b, samples_b = b.step([row[k] for k in kept])
    assert [s["completion"] for s in samples_b] == [s["completion"] for s in samples]
    assert tap_a.grads.keys() == tap_b.grads.keys() and tap_a.grads
    for name, grad in tap_b.grads.items():  # the same rows, padded alike, in the same micro-batches: bit for bit
        assert torch.equal(tap_a.grads[name], grad), name
    assert metrics["loss"] == metrics_b["loss"]
    for (name, p), q in zip(a.policy.model.named_parameters(), b.policy.model.parameters()):
        assert torch.equal(p, q), name

    # and the flat groups mattered: a normal step on round 1 (flat groups in) has another gradient
    plain = trainer(tmp_path / "plain", FlatFor(reward.keys), sampler=Replay(recorded.rollouts, 0), **settings)
    tap_plain = GradTap(plain)
    plain.step([row[k] for k in keys[:P]])
    assert any(not torch.allclose(tap_plain.grads[n], g, rtol=1e-3) for n, g in tap_b.grads.items())


# ---------------------------------------------------------------- micro-batches, the cap, a resume


def test_a_micro_batched_run_equals_one_backward_per_step(tmp_path):
    """Three steps (rounds vary by step) with a backward of 2 rows at a time, against one backward of the whole kept
    batch: the same completions every step (so the same choices), the same gradients to float rounding."""
    runs = {}
    for name, micro in (("whole", None), ("micro", 2)):
        reward = FlatFor(keys=range(0, 16, 2))  # the even keys' prompts are flat: half the data
        t = trainer(tmp_path / name, reward, dynamic_sampling=True, loss_type="dapo", micro_batch_size=micro,
                    max_tokens_per_micro_batch=None, max_steps=3)  # fmt: skip
        tap, steps = GradTap(t), []
        for _ in range(3):
            metrics, samples = t.step()
            steps.append((metrics, [s["completion"] for s in samples], dict(tap.grads), dict(tap.backwards)))
            tap.backwards.clear()
        runs[name] = steps
    assert sum(m["dynamic_sampling/rounds"] for m, *_ in runs["whole"]) > 3  # some step sampled again
    for (m_whole, texts_whole, g_whole, n_whole), (m_micro, texts_micro, g_micro, n_micro) in zip(*runs.values()):
        assert texts_micro == texts_whole
        assert set(n_whole.values()) == {1} and set(n_micro.values()) == {P * G // 2}  # 8 backwards of 2 rows
        for key in ("dynamic_sampling/rounds", "dynamic_sampling/groups_dropped", "dynamic_sampling/surplus_dropped"):
            assert m_micro[key] == m_whole[key]
        assert g_micro.keys() == g_whole.keys() and g_whole
        for name, grad in g_whole.items():  # (summed in another order: rounding, relative to the tensor's size)
            assert float((g_micro[name] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()), name


def test_at_the_cap_the_step_trains_what_it_has_and_says_so(tmp_path):
    """max_dynamic_sampling_rounds 2 and one prompt with spread in the 8 sampled: it is trained with the 3 earliest
    flat groups (advantage 0), the figures count them, and the monitor warns once."""
    reward = FlatFor()
    t = trainer(tmp_path / "run", reward, dynamic_sampling=True, max_dynamic_sampling_rounds=2, log_completions_every=1)
    keys = [t.train_rows[i]["key"] for i in copy.deepcopy(t.prompt_order).take(2 * P)]
    reward.keys = set(keys) - {keys[5]}
    result = t.train()
    (row,) = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert row["dynamic_sampling/rounds"] == 2
    assert row["dynamic_sampling/flat_trained"] == 3
    assert row["dynamic_sampling/groups_dropped"] == 4  # 7 flat sampled, 3 of them trained
    assert row["dynamic_sampling/prompts_sampled_per_kept"] == 8.0
    assert row["frac_reward_zero_std"] == 0.75
    prompts = trained_prompts([r for r in read_jsonl(tmp_path / "run" / "completions.jsonl") if r["step"] == 1])
    row_of = {r["key"]: r for r in t.train_rows}
    assert prompts == t.encode([row_of[k] for k in (keys[0], keys[1], keys[2], keys[5])]).seen
    (warning,) = [w for w in result.warnings if "dynamic sampling" in w]
    assert "max_dynamic_sampling_rounds: 2" in warning and "3 of the step's groups" in warning


def test_a_resumed_run_equals_the_straight_run(tmp_path):
    """A run that stops in step 3 and resumes from its checkpoint of step 2 ends where the straight run ends: the
    prompt order's place after the extra rounds is in the checkpoint."""
    from test_resume import assert_same_run

    from grpokit.rewards.functions import RewardError

    flat = range(0, 16, 2)
    settings = {"dynamic_sampling": True, "max_steps": 4, "save_every": 2}
    with pytest.raises(RewardError, match="ConnectionError"):
        trainer(tmp_path / "stopped", FlatFor(flat, crash_in_step=3), **settings).train()
    trainer(tmp_path / "stopped", FlatFor(flat), resume_from_checkpoint="latest", **settings).train()
    trainer(tmp_path / "straight", FlatFor(flat), **settings).train()
    assert_same_run(tmp_path / "straight", tmp_path / "stopped", 4)
    rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert sum(r["dynamic_sampling/rounds"] for r in rows) > 4  # the runs sampled extra rounds


def test_a_multi_turn_run_keeps_only_groups_with_spread(tmp_path):
    """Tools / environments: the in-process sampler's multi-turn rollouts go through dynamic sampling; the prompts
    whose reward is flat are not trained, and the turn figures are of the kept rows."""
    from helpers import flat_when_even
    from test_multiturn import TOK, Echo, tiny_folder

    folder = tiny_folder(tmp_path / "tiny")
    cfg = config(folder, tmp_path / "run", max_steps=2, max_completion_length=24, num_generations=2, max_turns=3,
                 dynamic_sampling=True, log_completions_every=1)  # fmt: skip
    t = GRPOTrainer(cfg, reward_funcs=[("flat_when_even", flat_when_even)], tokenizer=TOK, environment_factory=Echo)
    t.train()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(r["turns/mean"] > 1 for r in rows)  # multi-turn
    assert sum(r["dynamic_sampling/groups_dropped"] for r in rows) > 0
    for r in rows:
        assert r["frac_reward_zero_std"] * P == r["dynamic_sampling/flat_trained"]  # no other flat group trained
    trained = {r["prompt"] for r in read_jsonl(tmp_path / "run" / "completions.jsonl")}
    flat = {p for p in trained if sum(int(ch) for ch in p if ch.isdigit()) % 2 == 0}
    assert len(flat) <= sum(r["dynamic_sampling/flat_trained"] for r in rows)


# ---------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        ({"dynamic_sampling": True, "max_dynamic_sampling_rounds": 1}, "max_dynamic_sampling_rounds", "at least 2"),
        ({"max_dynamic_sampling_rounds": 8}, "max_dynamic_sampling_rounds", "dynamic_sampling is false"),
        ({"dynamic_sampling": True, "top_k": 1}, "dynamic_sampling", "every group is flat"),
        ({"dynamic_sampling": True, "num_generations": 1}, "num_generations", "a group of 1 has advantage 0"),
    ],
)
def test_a_dynamic_sampling_setting_that_cannot_work_is_named(overrides, field, detail, tmp_path):
    with pytest.raises(ConfigError) as err:
        config("m", tmp_path, **overrides).validate()
    assert f"`{field}`" in str(err.value) and detail in str(err.value)


def test_ppo_refuses_dynamic_sampling(tmp_path):
    with pytest.raises(ConfigError, match="`dynamic_sampling` is true, but PPO's advantages come from its critic"):
        PPOConfig(model="m", task="addition", output_dir=str(tmp_path), dynamic_sampling=True).validate()


def test_the_trl_adapter_names_dynamic_sampling_as_grpokits_own():
    """TRL 1.16's GRPOConfig has no dynamic sampling: set through the adapter, the error says where it lives."""
    from grpokit.trl import GRPOConfig as TRLConfig

    with pytest.raises(ConfigError, match="`dynamic_sampling` is not a field of TRL 1.16's GRPOConfig: it is a field "
                       "of grpokit's own GRPOConfig"):  # fmt: skip
        TRLConfig(dynamic_sampling=True)


def test_the_cost_figures_by_hand():
    """Three rounds of P = 2 (6 groups): flat, spread | spread, spread | flat, flat; kept: groups 1 and 2."""
    from grpokit.core.types import Generation
    from grpokit.stages.dynamic_sampling import cost_figures

    def round_of(total: list[float]) -> Generation:
        t = torch.tensor(total)
        return Generation([], None, None, [], None, t, torch.ones_like(t, dtype=torch.bool), None, None, None, 0, [])

    rounds = [round_of([1.0, 1.0, 0.0, 1.0]), round_of([0.0, 2.0, 1.0, 0.0]), round_of([0.0, 0.0, 3.0, 3.0])]
    flat = torch.tensor([True, False, False, False, True, True])
    figures = cost_figures(rounds, flat, algo.kept_groups(flat, 2))
    assert figures == {
        "dynamic_sampling/rounds": 3.0,
        "dynamic_sampling/prompts_sampled_per_kept": 3.0,  # 6 sampled for 2 kept
        "dynamic_sampling/groups_dropped": 3.0,
        "dynamic_sampling/surplus_dropped": 1.0,  # group 3
        "dynamic_sampling/flat_trained": 0.0,
        "dynamic_sampling/reward_sampled": 1.0,  # 12 / 12
    }
    none_kept = cost_figures(rounds[:1], torch.tensor([True, True]), torch.tensor([0, 1]))
    assert math.isnan(none_kept["dynamic_sampling/prompts_sampled_per_kept"])
    assert none_kept["dynamic_sampling/flat_trained"] == 2.0
