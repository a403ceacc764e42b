"""The policy: the trained model and everything that touches it for training, behind one narrow face.

Every stage (GRPO, SFT, the reward model) trains through a `Policy`: it owns the model, the optional KL
reference (a frozen copy, the base with its LoRA adapters off, or none), AdamW and its schedule, the
micro-batched forward, the backward, the one optimizer step and the reference sync; saving it and resuming it
live in `grpokit.model.saving`. Nothing outside it touches the raw model for training, so distributed wrapping lands
here alone.

Precision: trained weights and AdamW state stay float32 (master weights); `compute_dtype` below float32
runs forwards under autocast. A bf16 weight cannot take a small update: its 8-bit mantissa rounds a step
of lr 1e-6 on a weight of 0.02 back to the same number, so pure-bf16 training stalls.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from grpokit.core import packing
from grpokit.model.loading import enable_activation_checkpointing
from grpokit.model.logprobs import completion_logprobs
from grpokit.model.lora import LoRASpec, adapters_disabled, apply_lora, sync_reference, uses_lora
from grpokit.model.optim import OptimizerSettings, build_optimizer
from grpokit.model.sharded import fill_from_folder, lora_on_meta, meta_model, say_sharded_load, weights_folder
from grpokit.model.weights import PolicyWeights
from grpokit.runtime.distributed import Cluster, LogprobForward, full, full_weights, shard, shard_of


class NumericsError(RuntimeError):
    """A loss, gradient or parameter that cannot train (NaN, inf): the run stops before the update lands, and
    a model holding such a value is never saved."""


class TokenBatch(Protocol):
    """Rows of [left-padded prompt | right-padded completion]; a `Rollout` is one."""

    prompt_ids: torch.Tensor  # (N, Tp)
    prompt_mask: torch.Tensor  # (N, Tp)
    completion_ids: torch.Tensor  # (N, Tc)
    completion_mask: torch.Tensor  # (N, Tc)


class Policy:
    """The trained model, its optional reference, its optimizer and schedule."""

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimizerSettings,
        *,
        total_steps: int,
        device: torch.device,
        logprob_chunk_size: int,
        gradient_checkpointing: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        lora: LoRASpec | None = None,
        reference: bool = False,
        temperature: float = 1.0,
        layout: str = "padded",
        max_tokens_per_micro_batch: int | None = None,
        micro_batch_size: int | None = None,
        cluster: Cluster | None = None,
        per_token: Callable[..., Any] = completion_logprobs,
        fill: Callable[[torch.nn.Module], None] | None = None,
    ):
        """`model`: holding its weights, or built on the meta device from a folder (`sharded.training_model` under
        FSDP), whose shards each rank then reads from the folder's files. `optim`: AdamW, its schedule and the
        gradient clip. `logprob_chunk_size`: token positions per chunk of the vocabulary projection;
        `gradient_checkpointing`: recompute each layer's activations in the backward (non-reentrant). `reference`:
        keep a KL reference (with LoRA the base with adapters off, otherwise a frozen copy, or under a sharded start
        the model read again from its folder). `temperature`: logprobs are taken under logits / temperature, as the
        sampler draws. `layout`: how a forward lays out its rows (`grpokit.core.packing`);
        `max_tokens_per_micro_batch` and `micro_batch_size` bound what one forward holds (`micro_batches`); None =
        no bound. `cluster`: the ranks of a torchrun launch (`runtime.distributed`), whose gradients each optimizer
        step sums. `per_token`: what the forwards compute per completion token, `completion_logprobs` (model,
        rows...) -> (logp, entropy), or for a critic `critic.completion_values` -> (values, None). `fill`: for a
        `model` on the meta device that no folder fills (FSDP only), what writes each rank's shards once they are
        allocated (`distributed.shard`'s `fill`: PPO's critic copies the policy's)."""
        if layout not in packing.LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {list(packing.LAYOUTS)}")
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.temperature = temperature
        self.chunk_size = logprob_chunk_size
        self.max_grad_norm = optim.max_grad_norm
        self.layout = layout
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.micro_batch_size = micro_batch_size
        self.cluster = cluster or Cluster()
        self.per_token = per_token
        # a model on the meta device: the folder its shards are read from (or `fill`, which writes them)
        source = weights_folder(model) if fill is None else None
        if (source is not None or fill is not None) and not self.cluster.sharded:
            raise ValueError(f"Policy: a model on the meta device (from {source or fill}) starts under FSDP only")
        if source is None and fill is None:
            model = model.to(self.device)
            if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
                model = model.float()  # master weights: see the module docstring
        if gradient_checkpointing:
            enable_activation_checkpointing(model)
        drawn: dict[str, torch.Tensor] = {}  # a meta model's LoRA adapters as drawn, whole, until they are sharded
        if lora is not None and lora.r > 0:  # before the optimizer, so AdamW holds state for the adapters only
            model, drawn = (apply_lora(model, lora), {}) if source is None else lora_on_meta(model, lora)
        self.model = model
        self.has_reference = reference
        self.reference_synced = False  # a synced copy is no longer the initial model: checkpoints must hold it
        # With LoRA the reference is the policy with its adapters off: no copy (`reference_logprobs`). A sharded
        # start builds it from the files as the policy is, never copied from the policy.
        self.ref_model: torch.nn.Module | None = None
        if reference and not uses_lora(model):
            self.ref_model = copy.deepcopy(model) if source is None else meta_model(source)
            self.ref_model.eval().requires_grad_(False)
            if compute_dtype != torch.float32:
                self.ref_model.to(compute_dtype)  # never trained: its forward runs in compute_dtype anyway
        # FSDP2: the forwards go through a sharded root per model (`distributed.shard`); AdamW then holds shards
        self.fsdp_roots = {}  # id(model) -> its FSDP root; empty unless sharded
        self._weights_whole = False  # inside `full_weights`
        if self.cluster.sharded:
            self.fsdp_roots = self._shard(source, drawn, fill)
        self.optimizer, self.scheduler = build_optimizer(model, optim, total_steps)

    def _shard(self, source: Path | None, drawn: dict[str, torch.Tensor], fill=None) -> dict[int, LogprobForward]:
        """The policy and its reference sharded (`distributed.shard`), each its own root. Models on the meta device
        then have each rank's shards read from `source` (`sharded.fill_from_folder`; the policy's LoRA adapters
        from `drawn`), and rank 0 says what each rank read; or written by `fill` (a critic: no reference)."""
        if fill is not None:
            return {id(self.model): shard(self.model, self.per_token, fill=fill, device=self.device)}
        roots, read = {}, {}
        for what, m in (("policy", self.model), ("reference", self.ref_model)):
            if m is None:
                continue
            if source is None:
                roots[id(m)] = shard(m, self.per_token)
                continue

            def read_shards(lm: torch.nn.Module, what: str = what) -> None:
                read[what] = fill_from_folder(lm, source, values=drawn if what == "policy" else None)

            roots[id(m)] = shard(m, self.per_token, fill=read_shards, device=self.device)
        if source is not None:
            say_sharded_load(self.cluster, source, read)
        return roots

    # ---------------------------------------------------------------- forwards
    def full_weights(self) -> contextlib.AbstractContextManager:
        """Around a rollout or an evaluation: under FSDP the policy's weights gathered once, not per forward. Inside
        it, a nested call gathers nothing (an evaluation's sampler calls, as many as this rank's rows need)."""
        root = self.fsdp_roots.get(id(self.model))
        if root is None or self._weights_whole:
            return contextlib.nullcontext()
        return self._gathered(root)

    @contextlib.contextmanager
    def _gathered(self, root) -> Any:
        with full_weights(root):
            self._weights_whole = True
            try:
                yield
            finally:
                self._weights_whole = False

    def sampler_weights(self) -> PolicyWeights:
        """The policy's weights as a sampler takes them (`sampler.PolicyWeights`): the live module, the context that
        gathers its shards, and under FSDP the gathered state dict its named tensors come from (on rank 0)."""
        gathered = self._gathered_state if self.fsdp_roots else lambda: None
        return PolicyWeights(self.model, self.full_weights, gathered, self.weights_version)

    def weights_version(self) -> tuple[int, int]:
        """(this policy, its optimizer steps so far): the schedule counts them and a checkpoint restores the count."""
        return id(self), int(self.scheduler.last_epoch)

    def _gathered_state(self) -> dict[str, torch.Tensor]:
        """The whole state dict from every rank's shards (every rank calls; rank 0 gets it), on the CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def micro_batches(self, batch: TokenBatch, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`rows` (default: all) split into the micro-batches of one forward each: at most
        `max_tokens_per_micro_batch` computed positions and `micro_batch_size` rows (`packing.micro_batches`).
        Under FSDP every rank runs as many forwards (each gathers the weights with the others): a rank with fewer
        gets empty micro-batches, whose forward runs one row for nothing (`_logprobs`)."""
        rows = torch.arange(batch.completion_ids.shape[0]) if rows is None else rows
        groups, lengths = self._group_ids(batch), batch.completion_mask.sum(-1)
        limits = {"max_tokens": self.max_tokens_per_micro_batch, "max_rows": self.micro_batch_size}
        out = packing.micro_batches(rows, batch.prompt_mask.sum(-1), lengths, groups, layout=self.layout, **limits)
        if self.fsdp_roots:
            most = int(self.cluster.max({"n": len(out)})["n"])
            out += [rows[:0]] * (most - len(out))
        return out

    def forward(self, batch: TokenBatch, idx: torch.Tensor, *, with_entropy: bool = False, entropy_grad: bool = False):
        """Completion logprobs (n, w) of rows `idx` with a graph, in train mode; w = their longest completion.
        -> (logp, entropy or None); the entropy (`with_entropy`) is a metric, or with `entropy_grad` a loss term with
        its gradient."""
        self.model.train()
        return self._logprobs(self.model, batch, idx, with_entropy=with_entropy, entropy_grad=entropy_grad)

    @torch.no_grad()
    def entropies(self, batch: TokenBatch, rows: torch.Tensor) -> torch.Tensor:
        """(N, Tc) the entropy of the policy's next-token distribution (under the temperature) at each completion
        token of rows `rows` (0 elsewhere), in train mode as `forward` computes it, without a graph: what the
        high-entropy token selection ranks before an optimizer step's passes."""
        self.model.train()
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=self.device)  # (N, Tc)
        for idx in self.micro_batches(batch, rows):
            _, entropy = self._logprobs(self.model, batch, idx, with_entropy=True)  # (n, w)
            out[idx.to(self.device), : entropy.shape[1]] = entropy
        return out

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """(N, Tc) logprobs of the current policy, without a graph (the old-policy logprobs)."""
        return self._all_rows(self.model, batch)

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch) -> torch.Tensor | None:
        """(N, Tc) logprobs under the KL reference, in eval mode as a frozen model is; None without one."""
        if not self.has_reference:
            return None
        if self.ref_model is not None:
            return self._all_rows(self.ref_model, batch)
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return self._all_rows(self.model, batch)
        finally:
            self.model.train(was_training)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(model, *args, **kwargs) in train mode under the compute dtype: the training forward of a stage
        whose model is not a causal LM (the reward model's pair scores)."""
        self.model.train()
        with self.autocast():
            return fn(self.model, *args, **kwargs)

    def _all_rows(self, model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=self.device)  # (N, Tc)
        for idx in self.micro_batches(batch):
            logp, _ = self._logprobs(model, batch, idx)  # (n, w)
            out[idx.to(self.device), : logp.shape[1]] = logp
        return out

    @staticmethod
    def _group_ids(batch: TokenBatch) -> torch.Tensor:
        """(N,) the prompt each row belongs to: rows g*G .. g*G+G-1 share one (a batch without groups: its own)."""
        return torch.arange(batch.completion_ids.shape[0]) // getattr(batch, "group_size", 1)

    def _logprobs(self, model, batch: TokenBatch, idx: torch.Tensor, *, with_entropy=False, entropy_grad=False):
        """Rows `idx` trimmed to the columns they use, so padding elsewhere in the batch costs nothing. No rows
        (an FSDP rank with fewer micro-batches): row 0 runs so the weights are gathered with the other ranks, and
        (0, 1) results come back, tied to the graph so that the backward reduces the gradients with them too."""
        if len(idx) == 0:
            one = torch.zeros(1, dtype=torch.long)
            logp, entropy = self._logprobs(model, batch, one, with_entropy=with_entropy, entropy_grad=entropy_grad)
            return logp[:0], None if entropy is None else entropy[:0]
        prompt_mask = batch.prompt_mask[idx]  # (n, Tp)
        completion_mask = batch.completion_mask[idx]  # (n, Tc)
        first = int((prompt_mask.sum(0) > 0).nonzero()[0])  # left padding shared by all n rows
        width = int(completion_mask.sum(-1).max().clamp(min=1))
        forward = self.fsdp_roots.get(id(model)) or functools.partial(self.per_token, model)
        with self.autocast():
            return forward(
                batch.prompt_ids[idx, first:].to(self.device),
                prompt_mask[:, first:].to(self.device),
                batch.completion_ids[idx, :width].to(self.device),
                completion_mask[:, :width].to(self.device),
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                with_entropy=with_entropy,
                entropy_grad=entropy_grad,
                layout=self.layout,
                group_ids=self._group_ids(batch)[idx],
            )

    # ---------------------------------------------------------------- the update
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        """Clip the trainable parameters' gradients, step AdamW and the schedule, zero the gradients.
        Returns the gradient norm before clipping. Across ranks the gradients are summed first: each rank's
        backwards added its rows' share of the step loss."""
        params = self.trainable_parameters()
        if not self.fsdp_roots:  # FSDP summed them into each rank's shards in the backward
            self.cluster.sum_gradients(params)
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NumericsError(f"the gradient norm is {grad_norm}; the optimizer step was not applied")
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.check_finite(f"after the optimizer step (learning rate {lr:g}, gradient norm {grad_norm:.3g})")
        return grad_norm

    @torch.no_grad()
    def check_finite(self, when: str) -> None:
        """NumericsError naming the first parameter holding NaN or inf (one norm over the weights when all is well)."""
        params = self.trainable_parameters()
        # the L2 norm (the fused kernel clip_grad_norm_ uses, ~5x faster than the max here) is finite when every
        # weight is; only when it is not does the slow search run, which also tells an overflow of the norm alone
        if math.isfinite(float(full(torch.nn.utils.get_total_norm(params, norm_type=2.0)))):
            return
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        bad = [n for n, p in named if not bool(shard_of(p).isfinite().all())]
        if not self.cluster.sum({"bad": float(len(bad))})["bad"]:  # FSDP: each rank searched its own shards
            return  # only the norm overflowed
        name = bad[0] if bad else "a parameter (in another rank's shard)"
        raise NumericsError(f"parameter {name} holds NaN or inf {when}")

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.scheduler.get_last_lr()[0]

    def memory_mb(self) -> dict[str, float]:
        """What this policy's training state holds in this process (its shards under FSDP), counted from the
        tensors' storage, in MiB: weights (frozen ones too), the reference's weights, AdamW's two moments, and
        the gradients (one per trained weight, alive from a step's first backward to its optimizer step). Before
        the first optimizer step AdamW has no moments yet: counted as what it will allocate."""

        def mb(tensors) -> float:
            return sum(shard_of(t).numel() * shard_of(t).element_size() for t in tensors) / 2**20

        trained = self.trainable_parameters()
        moments = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        return {
            "weights": mb(self.model.parameters()),
            "reference": mb(self.ref_model.parameters()) if self.ref_model is not None else 0.0,
            "optimizer": mb(moments) if moments else 2 * mb(trained),
            "gradients": mb(trained),
        }

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def sync_reference(self, alpha: float) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref (TR-DPO); only a frozen copy can be synced."""
        if self.ref_model is None:
            raise ValueError("sync_reference needs a frozen reference copy (beta > 0, no LoRA)")
        sync_reference(self.ref_model, self.model, alpha)
        self.reference_synced = True
