"""Hostile use of the Python API (round two): what a caller hands over that grpokit cannot use is refused with an
error naming the argument the caller wrote, before the work it would spoil."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import RecordingSampler, config, save_tiny

from grpokit.sampler import SamplerError
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
    "float mask": (
        lambda r: dataclasses.replace(r, completion_mask=r.completion_mask.float()),
        r"`completion_mask` of dtype torch.float32",
    ),
}


def test_what_a_sampler_returns_is_checked_every_step_naming_the_sampler(tmp_path):
    sampler = MangledSampler(lambda r: r)
    trainer = GRPOTrainer(config(save_tiny(tmp_path / "tiny"), tmp_path / "out", max_steps=1), sampler=sampler)
    assert isinstance(trainer.sample().rollout, Rollout)  # the sampler's own answer passes
    for case, (mangle, message) in MANGLED.items():
        sampler.mangle = mangle
        with pytest.raises(SamplerError, match=r"`sampler` \(MangledSampler\)\.generate returned (a Rollout whose )?.*" + message):
            trainer.sample()
        print(case, "refused")
