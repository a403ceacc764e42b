"""Rollout decode speed on the real model: grpokit's sampler beside a bare KV-cache loop and HF `generate`.

    python benchmarks/decode.py                       # SmolLM2-135M-Instruct, 4 prompts x 8, 64 new tokens

All three draw exactly `--new-tokens` tokens for every row (no EOS stop, so they do the same work), from the
same chat prompts, float32 on the CPU, under torch.inference_mode. They alternate, `--repeats` rounds; the
figures are medians. The bare loop is the least a KV-cache decoder can do: prefill every row, then one
forward and one multinomial draw per token, nothing else (no shared prefix, no logprobs, no masks kept).
It prints the config, commit, machine and figures, and writes benchmarks/results/decode-smollm2-135m.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import RESULTS, commit, machine, prepare  # noqa: E402

from grpokit.model.loading import load_model, load_tokenizer  # noqa: E402
from grpokit.rollout.sampler import SamplingParams, generate  # noqa: E402


def bare_loop(model, ids, mask, new_tokens, generator):
    """Every row prefilled, then a forward and a draw per token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    next_pos = positions[:, -1:] + 1
    for _ in range(new_tokens):
        token = torch.multinomial(out.logits[:, -1].softmax(-1), 1, generator=generator)  # (N, 1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        out = model(input_ids=token, attention_mask=mask, position_ids=next_pos, past_key_values=cache)
        next_pos = next_pos + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model_dir, data = prepare("smollm2-135m")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, "cpu", torch.float32).eval()
    rows = [json.loads(line) for line in data.read_text().splitlines()][: args.prompts]
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    G, T = args.generations, args.new_tokens
    N = args.prompts * G
    # every row's prompt, left-padded, for the two decoders that know no groups
    width = max(map(len, prompt_ids))
    ids = torch.full((N, width), tokenizer.pad_token_id)
    mask = torch.zeros((N, width), dtype=torch.long)
    for i, p in enumerate(q for q in prompt_ids for _ in range(G)):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    params = SamplingParams(max_new_tokens=T, temperature=1.0)

    def grpokit_sampler(gen):
        generate(model, prompt_ids, num_generations=G, params=params, eos_token_id=-1, pad_token_id=0, generator=gen)

    def hf_generate(gen):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=T,
            min_new_tokens=T,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            pad_token_id=tokenizer.pad_token_id,
        )

    decoders = {
        "bare KV-cache loop": lambda gen: bare_loop(model, ids, mask, T, gen),
        "grpokit sampler": grpokit_sampler,
        "HF generate": hf_generate,
    }
    times: dict[str, list[float]] = {name: [] for name in decoders}
    with torch.inference_mode():
        for fn in decoders.values():  # warm-up
            fn(torch.Generator().manual_seed(0))
        for r in range(args.repeats):
            for name, fn in decoders.items():
                t0 = time.perf_counter()
                fn(torch.Generator().manual_seed(r))
                times[name].append(time.perf_counter() - t0)
    bare = statistics.median(times["bare KV-cache loop"])
    record = {
        "benchmark": "decode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "workload": {
            "model": "SmolLM2-135M-Instruct",
            "prompts": args.prompts,
            "generations": G,
            "new_tokens": T,
            "prompt_tokens": [len(p) for p in prompt_ids],
            "dtype": "float32",
        },
        "results": {
            name: {
                "median_s": statistics.median(t),
                "times_s": t,
                "tokens_per_s": N * T / statistics.median(t),
                "vs_bare_loop": statistics.median(t) / bare,
            }
            for name, t in times.items()
        },
    }
    print(json.dumps({"commit": record["commit"], "machine": record["machine"], "workload": record["workload"]}))
    for name, r in record["results"].items():
        print(
            f"{name:20s} {r['median_s']:6.2f} s  {r['tokens_per_s']:6.0f} tokens/s"
            f"  {r['vs_bare_loop']:.2f}x the bare loop's time"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "decode-smollm2-135m.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
