"""The packed and shared-prefix training forwards against the padded one (the reference implementation):
the same logprobs and gradients in float32 on Llama and Qwen2 shapes, with left and right padding, junk in
the padded slots, pad == eos, eager and sdpa attention, and LoRA; and the token budget of a micro-batch.
Every loss_type end to end is in test_trainer.py (test_training_forwards_give_the_same_update)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_lm

from grpokit.config import LoRAConfig
from grpokit.core import packing
from grpokit.model.logprobs import completion_logprobs
from grpokit.model.lora import apply_lora

PAD, EOS, BOS = 0, 1, 2
TEMPERATURE = 0.7
ATOL = 1e-5
G = 3
# three prompts of different lengths, three completions each: different lengths, some ending in EOS
PROMPTS = [[BOS, 5, 6], [BOS, 7, 8, 9, 10, 11], [BOS, 12]]
COMPLETIONS = [
    [[14, 15, 16, EOS], [17, EOS], [18, 19, 20, 21, 22]],
    [[23, EOS], [24, 25, 26], [27, 28, 29, 30, EOS]],
    [[31, 30, 29, 28, 27, 26], [25, EOS], [EOS]],
]


def tiny(arch: str, attn: str, pad_token_id: int = PAD):
    return tiny_lm(arch, attn, pad_token_id=pad_token_id, eos_token_id=EOS, bos_token_id=BOS)


def batch(*, extra_left=0, extra_right=0, fill=PAD, seed=0):
    """Rows g*G .. g*G+G-1 share prompt g: LEFT-padded prompts, RIGHT-padded completions, as the sampler makes
    them. fill="junk" writes random ids into every padded slot, so only the masks may decide what counts."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [p for p in PROMPTS for _ in range(G)]
    completions = [c for group in COMPLETIONS for c in group]
    tp = max(map(len, prompts)) + extra_left
    tc = max(map(len, completions)) + extra_right

    def pad(n):
        return torch.randint(3, 32, (n,), generator=gen) if fill == "junk" else torch.full((n,), fill)

    rows = []
    for p, c in zip(prompts, completions):
        rows.append(
            (
                torch.cat([pad(tp - len(p)), torch.tensor(p)]),
                torch.cat([torch.zeros(tp - len(p)), torch.ones(len(p))]).long(),
                torch.cat([torch.tensor(c), pad(tc - len(c))]),
                (torch.arange(tc) < len(c)).long(),
            )
        )
    group_ids = torch.arange(len(rows)) // G
    return (*(torch.stack(x) for x in zip(*rows)), group_ids)


def logp_and_grads(model, layout, prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids):
    """Logprobs (N, Tc) and the gradient of a weighted sum of them with respect to every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logp, entropy = completion_logprobs(
        model,
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        temperature=TEMPERATURE,
        chunk_size=5,  # several chunks
        with_entropy=True,
        layout=layout,
        group_ids=group_ids,
    )
    n, width = logp.shape
    weights = torch.linspace(-1.0, 2.0, n * 16).reshape(n, 16)[:, :width]  # (N, Tc) each token its own weight
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), entropy, grads


def assert_same(reference, other):
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = reference, other
    torch.testing.assert_close(logp_b, logp_a, rtol=0, atol=ATOL)
    torch.testing.assert_close(ent_b, ent_a, rtol=0, atol=ATOL)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layout_gives_the_padded_logprobs_and_gradients(layout, arch, attn):
    model = tiny(arch, attn)
    rows = batch()
    reference = logp_and_grads(model, "padded", *rows)
    assert reference[0].abs().sum() > 0 and all(g.abs().sum() > 0 for g in reference[2].values())
    assert_same(reference, logp_and_grads(model, layout, *rows))


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
@pytest.mark.parametrize(
    "padding", [{"extra_left": 3}, {"extra_right": 4}, {"extra_left": 2, "extra_right": 2, "fill": "junk"}]
)
def test_extra_padding_changes_nothing(layout, padding):
    model = tiny("llama", "sdpa")
    reference = logp_and_grads(model, "padded", *batch())
    logp, entropy, grads = logp_and_grads(model, layout, *batch(**padding))
    width = reference[0].shape[1]
    assert logp[:, width:].abs().sum() == 0  # extra right padding scores nothing
    assert_same(reference, (logp[:, :width], entropy[:, :width], grads))


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_a_row_without_completion_tokens_scores_nothing_and_changes_nothing(layout):
    prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids = batch()
    completion_mask, completion_ids = completion_mask.clone(), completion_ids.clone()
    completion_mask[4], completion_ids[4] = 0, PAD  # group 1's second row: nothing was generated
    rows = (prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids)
    reference = logp_and_grads(tiny("llama", "sdpa"), "padded", *rows)
    assert (reference[0][4] == 0).all()
    assert_same(reference, logp_and_grads(tiny("llama", "sdpa"), layout, *rows))


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_pad_equal_to_eos_scores_the_eos_and_masks_what_follows(layout):
    model = tiny("qwen2", "sdpa", pad_token_id=EOS)
    rows = batch(fill=EOS)
    reference = logp_and_grads(model, "padded", *rows)
    logp = reference[0]
    completion_ids, completion_mask = rows[2], rows[3]
    ends = (completion_ids == EOS) & completion_mask.bool()  # (N, Tc) the EOS tokens that belong to a completion
    assert ends.sum() >= 5 and (logp[ends] != 0).all()  # each is scored
    assert (logp[~completion_mask.bool()] == 0).all()  # the pads after it (also EOS ids) are not
    assert_same(reference, logp_and_grads(model, layout, *rows))


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_lora_adapters_get_the_padded_gradients(layout):
    model = apply_lora(tiny("llama", "sdpa"), LoRAConfig(r=4, alpha=8.0))
    with torch.no_grad():  # B starts at 0, which would leave A's gradient 0 in every layout
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    rows = batch()
    reference = logp_and_grads(model, "padded", *rows)
    assert set(reference[2]) == {n for n, p in model.named_parameters() if ".lora_" in n}
    assert all(g.abs().sum() > 0 for g in reference[2].values())
    assert_same(reference, logp_and_grads(model, layout, *rows))


@pytest.mark.parametrize("layout", ["padded", "shared_prefix"])
def test_gradient_checkpointing_gives_the_same_gradients(layout):
    model = tiny("qwen2", "sdpa")
    rows = batch()
    model.train()  # checkpointing acts in train mode only
    reference = logp_and_grads(model, layout, *rows)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers[0].gradient_checkpointing
    assert_same(reference, logp_and_grads(model, layout, *rows))


def visible_keys(layout, position):
    """The packed positions the query at `position` attends to, read from the layout's Segments."""
    seg = layout.segments
    run, slot = divmod(int(seg.order[position]), seg.q_index.shape[1])
    assert int(seg.q_index[run, slot]) == position
    return seg.k_index[run][seg.allowed[run, 0, slot]].tolist()


def test_shared_prefix_computes_each_prompt_once():
    prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids = batch()
    padded = packing.padded(prompt_ids, prompt_mask, completion_ids, completion_mask)
    packed = packing.packed(prompt_ids, prompt_mask, completion_ids, completion_mask)
    shared = packing.shared_prefix(prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids)
    real_prompt, real_completion = int(prompt_mask.sum()), int(completion_mask.sum())  # 33, 30
    assert padded.computed_tokens == 9 * (6 + 6)  # every row padded to the widest prompt and completion
    # no padding at all, and no completion's last token (it predicts nothing)
    assert packed.computed_tokens == real_prompt + real_completion - 9
    # each prompt once (3 + 6 + 2 tokens), then its completions less their last tokens, no padding
    assert shared.input_ids.shape == (1, 11 + 30 - 9)
    assert shared.computed_tokens < packed.computed_tokens < padded.computed_tokens
    # each completion sees its prompt and itself, never a sibling: group 1's prompt sits at 11..16, its first
    # completion's fed token at 17, its second's at 18 and 19; the query at 19 sees 11..16, 18 and 19 only
    assert visible_keys(shared, 19) == [11, 12, 13, 14, 15, 16, 18, 19]
    assert visible_keys(shared, 13) == [11, 12, 13]  # a prompt token: its prompt, causally
    assert shared.position_ids[0, 11:20].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 7]
    # packed: a row sees its own prompt copy and itself; row 1 (group 0's second) starts at 3 + 3 = 6
    assert visible_keys(packed, 9) == [6, 7, 8, 9]
    assert packed.position_ids[0, 6:10].tolist() == [0, 1, 2, 3]


def test_shared_prefix_refuses_a_group_with_two_prompts():
    prompt_ids, prompt_mask, completion_ids, completion_mask, _ = batch()
    wrong = torch.zeros(9, dtype=torch.long)  # claims every row has the same prompt
    with pytest.raises(ValueError, match="share group 0 but not their prompt"):
        packing.shared_prefix(prompt_ids, prompt_mask, completion_ids, completion_mask, wrong)


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_the_packed_layouts_leave_the_models_own_attention_as_it_was(layout, tmp_path):
    """They attend through grpokit's segment attention, installed into the model once; without segments
    (padded rows, sampling) the model attends as loaded, and a saved model does not name grpokit's function."""
    model = tiny("qwen2", "sdpa")
    rows = batch()
    reference = logp_and_grads(model, "padded", *rows)
    assert_same(reference, logp_and_grads(model, layout, *rows))
    assert model.config._attn_implementation == "grpokit:sdpa"
    assert_same(reference, logp_and_grads(model, "padded", *rows))  # the fallback: sdpa with its mask
    model.save_pretrained(tmp_path)
    assert "grpokit" not in (tmp_path / "config.json").read_text()


def test_a_sliding_window_is_refused_by_name():
    model = tiny("qwen2", "sdpa")
    model.config.use_sliding_window, model.config.sliding_window = True, 4
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(model.config)  # the layers read their window when built
    with pytest.raises(ValueError, match="cannot attend with this model's sliding_window.*training_forward: padded"):
        completion_logprobs(model, *batch()[:4], temperature=1.0, layout="shared_prefix", group_ids=batch()[4])


class RowCounter(torch.nn.Module):
    """The LM head, recording how many rows each call projects onto the vocabulary."""

    def __init__(self, head):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, hidden):
        self.rows.append(hidden.shape[0])
        return self.head(hidden)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "reference"])
def test_no_forward_holds_logits_for_more_than_one_chunk(grad):
    model = tiny("llama", "sdpa")
    counter = RowCounter(model.lm_head)
    model.lm_head = counter
    with torch.set_grad_enabled(grad):
        logp, _ = completion_logprobs(
            model,
            *batch()[:4],
            temperature=1.0,
            chunk_size=4,
            with_entropy=True,
            layout="shared_prefix",
            group_ids=batch()[4],
        )
    if grad:
        logp.sum().backward()  # the backward recomputes chunk by chunk too
    assert counter.rows and max(counter.rows) <= 4
    assert sum(counter.rows) == int(batch()[3].sum()) * (2 if grad else 1)  # only the completion tokens


# ---------------------------------------------------------------- micro-batches by a token budget


def split(layout, max_tokens, max_rows=None, rows=None, groups=(0, 0, 1, 1, 2, 2)):
    prompt_lengths = torch.tensor([5, 5, 3, 3, 9, 9])
    completion_lengths = torch.tensor([4, 2, 6, 1, 2, 3])
    group_ids = torch.tensor(groups)
    rows = torch.arange(6) if rows is None else torch.tensor(rows)
    out = packing.micro_batches(
        rows, prompt_lengths, completion_lengths, group_ids, layout=layout, max_tokens=max_tokens, max_rows=max_rows
    )
    return [mb.tolist() for mb in out]


def test_micro_batches_follow_the_token_budget_of_each_layout():
    # packed: the sum of the tokens fed (each completion's last one is not), 8 6 8 3 10 11
    assert split("packed", 16) == [[0, 1], [2, 3], [4], [5]]
    # padded: rows x (widest prompt + widest completion): [0,1] 2x9, [0,1,2] 3x11 > 20
    assert split("padded", 20) == [[0, 1], [2, 3], [4], [5]]
    # shared prefix: groups x longest group (prompt once + its completions less their last tokens):
    # [0,1,2,3] 2 x 9, then [0..4] would be 3 x 10; [4,5] 1 x 12
    assert split("shared_prefix", 22) == [[0, 1, 2, 3], [4, 5]]
    assert split("packed", None) == [[0, 1, 2, 3, 4, 5]]
    assert split("packed", None, max_rows=4) == [[0, 1, 2, 3], [4, 5]]
    assert split("packed", 1) == [[0], [1], [2], [3], [4], [5]]  # a row over the budget runs alone


def test_shared_prefix_micro_batches_keep_a_groups_rows_together():
    # a shuffled minibatch (several optimizer steps, mu > 1): rows are put in group order first
    assert split("shared_prefix", None, rows=[4, 0, 5, 1]) == [[0, 1, 4, 5]]
    assert split("shared_prefix", 16, rows=[4, 0, 5, 1]) == [[0, 1], [4, 5]]
    assert split("packed", 21, rows=[4, 0, 5, 1]) == [[4, 0], [5, 1]]  # other layouts keep the order given


def test_the_config_offers_exactly_the_layouts_that_exist():
    import typing

    from grpokit.config import GRPOConfig, TrainingForward

    assert typing.get_args(TrainingForward) == packing.LAYOUTS
    assert GRPOConfig().training_forward in packing.LAYOUTS
    with pytest.raises(ValueError, match="unknown layout 'pad'"):
        packing.build("pad", *batch()[:4])
