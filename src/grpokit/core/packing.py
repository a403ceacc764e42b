"""How the rows of a micro-batch are laid out for one training forward: pure functions of token tensors.

Input rows are [LEFT-padded prompt (n, Tp) | RIGHT-padded completion (n, Tc)], as the sampler returns them.
Each layout says what the decoder runs on and where the hidden state that predicts each real completion
token sits. All three give the same log-probs (up to float rounding); they differ in what they compute:

- `padded` (the reference implementation the tests compare against): one row per completion, padding
  included, each row with its own copy of the prompt.
- `packed` (padding-free): the rows' real tokens end to end in one sequence, position ids restarting at
  every row. No pad token is computed, nor a completion's last token (it is scored, but predicts nothing).
- `shared_prefix`: one sequence of [prompt 1 | its completions | prompt 2 | ...], no padding either. The
  prompt is computed once per group instead of G times, and the gradients of all G completions flow into
  that one prompt pass.

The two packed layouts come with `Segments`: which keys each query may see. Their attention runs as one
batched call over short padded runs (model.attention.segment_attention), so it costs what each row needs, a
completion's own tokens and its prompt, never the (L, L) square of the whole sequence: on CPU the square
with a mask was ~20% of the training forward.

Shapes: n rows, Tp / Tc their padded prompt / completion widths, M the real completion tokens of the n rows,
B the decoder's batch, L its sequence length, R the attention runs, Qm / Km a run's most queries / keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("padded", "packed", "shared_prefix")


@dataclass(frozen=True)
class Segments:
    """The attention of a packed (1, L) sequence as R runs: run r's queries are the contiguous positions
    own_start[r] ..+ own_len[r]; they see the run's prefix (pre_start[r] ..+ pre_len[r], all of it: the
    prompt a completion shares) and their own earlier positions (causal). Every position is one run's query.
    """

    q_index: torch.Tensor  # (R, Qm) the packed position of each query slot (padding slots repeat a real one)
    k_index: torch.Tensor  # (R, Km) the packed position of each key slot: the prefix, then the run itself
    allowed: torch.Tensor  # (R, 1, Qm, Km) bool, True = attend
    order: torch.Tensor  # (L,) where each packed position's query sits in the flattened (R * Qm) slots


def segments(pre_start, pre_len, own_start, own_len) -> Segments:
    """Segments from the runs' (R,) long tensors, listed in packed order (own runs tile 0 .. L-1)."""
    R = own_len.shape[0]
    qm, km = int(own_len.max()), int((pre_len + own_len).max())
    i = torch.arange(qm)[None]  # (1, Qm) query slot
    j = torch.arange(km)[None]  # (1, Km) key slot
    q_real = i < own_len[:, None]  # (R, Qm)
    q_index = own_start[:, None] + torch.minimum(i, (own_len - 1)[:, None])  # (R, Qm)
    in_prefix = j < pre_len[:, None]  # (R, Km)
    own_j = (j - pre_len[:, None]).clamp(min=0)  # (R, Km) the key's place in the run itself
    own_key = own_start[:, None] + own_j.clamp(max=(own_len - 1)[:, None])  # (R, Km) padding repeats the last
    k_index = torch.where(in_prefix, pre_start[:, None] + j, own_key)  # (R, Km)
    k_real = in_prefix | (own_j < own_len[:, None])  # (R, Km)
    allowed = (in_prefix[:, None, :] | (own_j[:, None, :] <= i[:, :, None])) & k_real[:, None, :]  # (R, Qm, Km)
    # a padding query slot sees its run's first key only: no row of the softmax is empty (NaN-free backward)
    allowed = torch.where(q_real[:, :, None], allowed, j[:, None, :] == 0)
    order = torch.arange(R * qm).view(R, qm)[q_real]  # (L,) row-major = packed order
    return Segments(q_index, k_index, allowed[:, None], order)


@dataclass(frozen=True)
class Layout:
    """The decoder's input for n rows and where to read the hidden states that score their completions."""

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor | None  # (B, L) padding mask (padded), None (packed layouts)
    source_row: torch.Tensor  # (M,) the decoder row holding the hidden state that predicts each real token
    source_pos: torch.Tensor  # (M,) its position in that row
    targets: torch.Tensor  # (M,) the real completion tokens, row by row, in order
    valid: torch.Tensor  # (n, Tc) bool, where those tokens sit in the padded completion layout
    segments: Segments | None = None  # the attention of the packed layouts

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
    pieces, positions, source, runs = [], [], [], []
    offset = 0
    for p, c in zip(prompts, completions):
        fed = c[:-1]  # a completion's last token predicts nothing: it is scored, never fed
        pieces += [p, fed]
        positions.append(torch.arange(len(p) + len(fed)))
        # token t of the completion is predicted at the position just before it
        source.append(offset + len(p) - 1 + torch.arange(len(c)))
        runs.append((0, 0, offset, len(p) + len(fed)))  # a row sees itself only
        offset += len(p) + len(fed)
    return _packed_layout(prompt_ids.device, pieces, positions, source, runs, completions, completion_mask)


def shared_prefix(prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids) -> Layout:
    """One (1, L) sequence of [prompt | its rows' completions] per distinct prompt among the n rows, end to
    end. `group_ids` (n,) say which rows share a prompt (rows of a group must have equal prompts)."""
    prompts, completions = _real(prompt_ids, prompt_mask), _real(completion_ids, completion_mask)
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    pieces, positions, runs = [], [], []
    source: list[torch.Tensor | None] = [None] * len(prompts)
    offset = 0
    for rows in groups.values():
        prompt = prompts[rows[0]]
        for i in rows[1:]:
            if not torch.equal(prompts[i], prompt):
                raise ValueError(f"rows {rows[0]} and {i} share group {group_ids[i].item()} but not their prompt")
        p, prompt_start = len(prompt), offset
        pieces.append(prompt)
        positions.append(torch.arange(p))
        runs.append((0, 0, prompt_start, p))  # the prompt sees itself, causally
        offset += p
        for i in rows:
            fed = completions[i][:-1]  # the last token predicts nothing: scored, never fed
            pieces.append(fed)
            positions.append(p + torch.arange(len(fed)))
            # token 0 is predicted by the prompt's last position, token t by the completion's token t - 1
            c = len(completions[i])  # 0 for a row with no completion: it predicts nothing
            source[i] = torch.cat([torch.tensor([prompt_start + p - 1]), offset + torch.arange(len(fed))])[:c]
            if len(fed):
                runs.append((prompt_start, p, offset, len(fed)))  # a completion sees its prompt and itself
            offset += len(fed)
    return _packed_layout(prompt_ids.device, pieces, positions, source, runs, completions, completion_mask)


def _packed_layout(device, pieces, positions, source, runs, completions, completion_mask) -> Layout:
    source_pos = torch.cat(source).to(device)  # (M,)
    pre_start, pre_len, own_start, own_len = torch.tensor(runs, dtype=torch.long).unbind(-1)  # (R,) each
    seg = segments(pre_start, pre_len, own_start, own_len)
    return Layout(
        torch.cat(pieces)[None].to(device),  # (1, L)
        torch.cat(positions)[None].to(device),  # (1, L)
        None,
        torch.zeros_like(source_pos),
        source_pos,
        torch.cat(completions),
        completion_mask.bool(),
        Segments(*(t.to(device) for t in (seg.q_index, seg.k_index, seg.allowed, seg.order))),
    )


def build(name: str, prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids=None) -> Layout:
    """The layout `name` (one of LAYOUTS) of the n rows; `group_ids` (n,) for `shared_prefix`."""
    if name == "padded":
        return padded(prompt_ids, prompt_mask, completion_ids, completion_mask)
    if name == "packed":
        return packed(prompt_ids, prompt_mask, completion_ids, completion_mask)
    if name == "shared_prefix":
        return shared_prefix(prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids)
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
    per_group: dict[int, int] = {}  # shared_prefix: each group's prompt once, then its fed completions
    for g, pi, ci in zip(group_ids[rows].tolist(), p.tolist(), fed.tolist()):
        per_group[g] = per_group.get(g, pi) + ci
    return sum(per_group.values())
