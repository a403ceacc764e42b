"""How the rows of a micro-batch are laid out for one training forward: pure functions of token tensors.

Input rows are [LEFT-padded prompt (n, Tp) | RIGHT-padded completion (n, Tc)], as the sampler returns them.
Each layout says what the decoder runs on and where the hidden state that predicts each real completion
token sits. All three give the same log-probs (up to float rounding); they differ in what they compute:

- `padded` (the reference implementation the tests compare against): one row per completion, padding
  included, each row with its own copy of the prompt.
- `packed` (padding-free): the rows' real tokens end to end in one sequence, position ids restarting at
  every row; transformers builds the per-row causal mask from the position ids. No pad token is computed,
  nor a completion's last token (it is scored, but predicts nothing).
- `shared_prefix`: one sequence per prompt, [prompt | completion 1 | ... | completion k], with a mask that
  lets every completion see the prompt and itself only. The prompt is computed once per group instead of
  G times, and the gradients of all G completions flow into that one prompt pass.

Shapes: n rows, Tp / Tc their padded prompt / completion widths, M the real completion tokens of the n rows,
B the decoder's batch, L its sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("padded", "packed", "shared_prefix")


@dataclass(frozen=True)
class Layout:
    """The decoder's input for n rows and where to read the hidden states that score their completions."""

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor | None  # (B, L) padding mask, (B, 1, L, L) bool attention, or None (packed)
    source_row: torch.Tensor  # (M,) the decoder row holding the hidden state that predicts each real token
    source_pos: torch.Tensor  # (M,) its position in that row
    targets: torch.Tensor  # (M,) the real completion tokens, row by row, in order
    valid: torch.Tensor  # (n, Tc) bool, where those tokens sit in the padded completion layout

    @property
    def computed_tokens(self) -> int:
        """Positions the decoder runs, padding included."""
        return self.input_ids.numel()


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the same RoPE angles as unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def _real(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens, in order."""
    keep = mask.bool()
    return [row[m] for row, m in zip(ids, keep)]


def padded(prompt_ids, prompt_mask, completion_ids, completion_mask) -> Layout:
    """[prompt | completion] per row as given; positions skip the left padding."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (n, Tp + Tc)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (n, Tp + Tc)
    position_ids = position_ids_from_mask(attention_mask)  # (n, Tp + Tc)
    valid = completion_mask.bool()  # (n, Tc)
    row, t = valid.nonzero(as_tuple=True)  # (M,), (M,)
    tp = prompt_ids.shape[1]
    return Layout(ids, position_ids, attention_mask, row, tp - 1 + t, completion_ids[valid], valid)


def packed(prompt_ids, prompt_mask, completion_ids, completion_mask) -> Layout:
    """Every row's real tokens end to end in one (1, L) sequence, position ids restarting at each row."""
    prompts, completions = _real(prompt_ids, prompt_mask), _real(completion_ids, completion_mask)
    pieces, positions, source = [], [], []
    offset = 0
    for p, c in zip(prompts, completions):
        fed = c[:-1]  # a completion's last token predicts nothing: it is scored, never fed
        pieces += [p, fed]
        positions.append(torch.arange(len(p) + len(fed)))
        # token t of the completion is predicted at the position just before it
        source.append(offset + len(p) - 1 + torch.arange(len(c)))
        offset += len(p) + len(fed)
    device = prompt_ids.device
    ids = torch.cat(pieces)[None]  # (1, L)
    valid = completion_mask.bool()  # (n, Tc)
    source_pos = torch.cat(source).to(device)  # (M,)
    return Layout(
        ids,
        torch.cat(positions)[None].to(device),  # (1, L)
        None,
        torch.zeros_like(source_pos),
        source_pos,
        torch.cat(completions),
        valid,
    )


def shared_prefix(prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids, *, mask_dtype=torch.bool):
    """One decoder row per distinct prompt among the n rows: [prompt | its rows' completions], right-padded to
    the longest. `group_ids` (n,) say which rows share a prompt (rows of a group must have equal prompts).

    `mask_dtype` bool gives True = attend (sdpa); a float dtype gives an additive mask, 0 or its min (eager).
    """
    prompts, completions = _real(prompt_ids, prompt_mask), _real(completion_ids, completion_mask)
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    seqs, segments, positions = [], [], []
    source_row, source_pos = torch.empty(len(prompts), dtype=torch.long), [None] * len(prompts)
    for b, rows in enumerate(groups.values()):
        prompt = prompts[rows[0]]
        for i in rows[1:]:
            if not torch.equal(prompts[i], prompt):
                raise ValueError(f"rows {rows[0]} and {i} share group {group_ids[i].item()} but not their prompt")
        p = len(prompt)
        pieces, seg, pos = [prompt], [torch.zeros(p, dtype=torch.long)], [torch.arange(p)]
        offset = p
        for j, i in enumerate(rows, start=1):
            c = len(completions[i])
            fed = completions[i][:-1]  # the last token predicts nothing: scored, never fed
            pieces.append(fed)
            seg.append(torch.full((len(fed),), j))
            pos.append(p + torch.arange(len(fed)))
            # token 0 is predicted by the prompt's last position, token t by the completion's token t - 1
            source_pos[i] = torch.cat([torch.tensor([p - 1]), offset + torch.arange(c - 1)])[:c]
            source_row[i] = b
            offset += len(fed)
        seqs.append(torch.cat(pieces))
        segments.append(torch.cat(seg))
        positions.append(torch.cat(pos))
    L, B = max(len(s) for s in seqs), len(seqs)
    device = prompt_ids.device
    ids = torch.zeros((B, L), dtype=torch.long, device=device)  # (B, L) pad id 0: masked, never scored
    segment = torch.full((B, L), -1, dtype=torch.long)  # (B, L) 0 prompt, j completion j, -1 padding
    position_ids = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    for b, (s, seg, pos) in enumerate(zip(seqs, segments, positions)):
        ids[b, : len(s)], segment[b, : len(s)], position_ids[b, : len(s)] = s, seg, pos
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L)
    allowed = causal & (k_seg != -1) & ((k_seg == 0) | (k_seg == q_seg))  # (B, L, L)
    allowed |= torch.eye(L, dtype=torch.bool)  # a padding query sees itself: no row without a key
    if mask_dtype == torch.bool:
        attention = allowed
    else:
        attention = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed, torch.finfo(mask_dtype).min)
    rows_of_tokens = [torch.full((len(completions[i]),), int(source_row[i])) for i in range(len(completions))]
    return Layout(
        ids,
        position_ids.to(device),
        attention[:, None].to(device),  # (B, 1, L, L)
        torch.cat(rows_of_tokens).to(device),
        torch.cat(source_pos).to(device),
        torch.cat(completions),
        completion_mask.bool(),
    )


def build(name: str, prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids=None, **kwargs) -> Layout:
    """The layout `name` (one of LAYOUTS) of the n rows; `group_ids` (n,) for `shared_prefix`."""
    if name == "padded":
        return padded(prompt_ids, prompt_mask, completion_ids, completion_mask)
    if name == "packed":
        return packed(prompt_ids, prompt_mask, completion_ids, completion_mask)
    if name == "shared_prefix":
        return shared_prefix(prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids, **kwargs)
    raise ValueError(f"unknown layout {name!r}; expected one of {list(LAYOUTS)}")


def micro_batches(
    rows: torch.Tensor,
    prompt_lengths: torch.Tensor,
    completion_lengths: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    layout: str,
    max_tokens: int | None,
    max_rows: int | None,
) -> list[torch.Tensor]:
    """Split `rows` (in order, each kept whole) into micro-batches whose forward computes at most `max_tokens`
    positions under `layout` (padding included) and holds at most `max_rows` rows; None = no limit. A row that
    alone exceeds `max_tokens` is a micro-batch of its own. Under `shared_prefix` the rows are first put in
    group order, so rows that share a prompt share a micro-batch and its prompt pass.

    lengths and group_ids are (N,) over the whole batch; rows (n,) index into them.
    """
    if layout == "shared_prefix":
        rows = rows[torch.sort(group_ids[rows], stable=True).indices]

    def cost(candidate: list[int]) -> int:
        return _cost(candidate, prompt_lengths, completion_lengths, group_ids, layout)

    out, current = [], []
    for i in rows.tolist():
        trial = current + [i]
        over_rows = max_rows is not None and len(trial) > max_rows
        over_tokens = max_tokens is not None and cost(trial) > max_tokens
        if current and (over_rows or over_tokens):
            out.append(torch.tensor(current))
            trial = [i]
        current = trial
    if current:
        out.append(torch.tensor(current))
    return out


def _cost(rows, prompt_lengths, completion_lengths, group_ids, layout: str) -> int:
    p, c = prompt_lengths[rows], completion_lengths[rows]  # (k,), (k,)
    if layout == "padded":
        return len(rows) * int(p.max() + c.max())
    fed = (c - 1).clamp(min=0)  # the packed layouts never feed a completion's last token
    if layout == "packed":
        return int((p + fed).sum())
    per_group: dict[int, int] = {}
    for g, pi, ci in zip(group_ids[rows].tolist(), p.tolist(), fed.tolist()):
        per_group[g] = per_group.get(g, pi) + ci
    return len(per_group) * max(per_group.values())
