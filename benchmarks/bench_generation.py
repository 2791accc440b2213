"""HF-backend generation: transformers' `generate` (the old way) vs resp's decode loop vs the
static-cache backend (generation.backend hf_static), in one run.

The workload is the evaluation's: the embedded model (data/models/tiny), the first --prompts
items of the arith eval split (params.yaml tasks.arith) rendered by the task's chat template with
thinking on, as `resp.evaluation.evaluate_task` does, --batch-size prompts per batch and
--max-new-tokens new tokens at most, once greedy and once sampled with params.yaml's evaluation
temperature / top_p / top_k.

- old: `model.generate` on the batches `resp.generation.generate` makes (longest prompt first,
  left-padded), seeded with `torch.manual_seed(seed + batch_index)` before each batch, as
  resp.generation did before the decode loop; every row decodes until the batch's longest
  completion ends.
- new: `resp.generation.generate` (rows leave the batch when they end; each prompt samples from
  its own generator).
- static_cache: `resp.generation.generate` with backend hf_static (transformers' `generate` with a
  static KV cache drawing the loop's tokens; rows stay in the batch until its longest ends).

Each (mode, way) is timed --reps times after a warm-up on a few prompts, old and new alternating
so that load on a shared machine hits both alike; figures are medians: wall seconds, CPU seconds
of this process (less sensitive to other processes on a shared machine), and new tokens/s
(completion tokens up to and including the first EOS, per wall second). "row_steps" counts the
rows each way pushes through the model after the prefill: old = rows x the batch's longest
completion, new = the completion tokens. Greedy outputs of both ways are compared token for
token; sampled ones differ by design (other random streams) and are summarised by mean length
and truncation rate. The static-cache backend's completions are compared with the loop's in both
modes (they draw the same tokens).

Results: benchmarks/results/bench_generation.json (or --out). Nothing is asserted here.

    python benchmarks/bench_generation.py                         # full run (a few minutes on 2 idle cores)
    python benchmarks/bench_generation.py --device cuda --out /tmp/gpu.json
    python benchmarks/bench_generation.py --dry-run --out /tmp/bench_generation.json   # seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "models" / "tiny"
WARM_UP_PROMPTS = 4


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=100, help="first N items of the arith eval split")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dry-run", action="store_true", help="small sizes, to check the script runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_generation.json")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.prompts, args.batch_size, args.max_new_tokens, args.reps = 8, 4, 32, 1
    return args


def workload(args):
    """(model, tokenizer, prompts, {mode: SamplingSpec}) as the evaluation would generate them."""
    import torch

    from resp.config import load_params
    from resp.generation import SamplingSpec
    from resp.models import load_model
    from resp.tasks import load_items, render_prompt

    if not any(EMBEDDED.glob("*.safetensors")):
        sys.exit(f"error: {EMBEDDED.relative_to(ROOT)} holds no weights: run `dvc repro embedded_model` first")
    torch.set_num_threads(args.threads)
    p = load_params(ROOT / "params.yaml")
    task, ev = p.tasks["arith"], p.evaluation
    model, tokenizer = load_model(str(EMBEDDED), device=args.device)
    items = load_items(task, task.eval_split)[: args.prompts]
    prompts = [render_prompt(tokenizer, item.message, enable_thinking=True) for item in items]
    specs = {"greedy": SamplingSpec(0.0, 1.0, 0, args.max_new_tokens),
             "sampled": SamplingSpec(ev.temperature, ev.top_p, ev.top_k, args.max_new_tokens)}
    return model, tokenizer, prompts, specs


def hf_generate(model, tokenizer, prompts: list[str], spec, batch_size: int, seed: int):
    """(completions in input order, row steps): resp.generation's batching around transformers' `generate`."""
    import torch

    from resp.generation import Completion, _cut, eos_token_ids

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompt_ids[i]), i))
    results, row_steps = [None] * len(prompts), 0
    sampling = ({"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50} if spec.temperature == 0 else
                {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": spec.top_k})
    with torch.no_grad():
        for batch_index, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start:start + batch_size]
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.tensor([[pad] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in batch])
            attention_mask = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in batch])
            torch.manual_seed(seed + batch_index)
            output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                    max_new_tokens=spec.max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
            row_steps += len(batch) * (output.shape[1] - width)
            for row, i in enumerate(batch):
                ids, truncated = _cut(output[row, width:].tolist(), set(eos))
                results[i] = Completion(prompt_ids[i], ids, "", truncated)
    return results, row_steps


def loop_generate(model, tokenizer, prompts: list[str], spec, batch_size: int, seed: int):
    from resp.generation import generate

    completions = generate(model, tokenizer, prompts, spec, batch_size=batch_size, seed=seed, desc="decode loop")
    return completions, sum(len(c.completion_ids) for c in completions)


def static_generate(model, tokenizer, prompts: list[str], spec, batch_size: int, seed: int):
    from resp.generation import generate

    completions = generate(model, tokenizer, prompts, spec, batch_size=batch_size, seed=seed, desc="static cache",
                           backend="hf_static")
    order = sorted(range(len(prompts)), key=lambda i: (-len(completions[i].prompt_ids), i))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return completions, sum(len(b) * max(len(completions[i].completion_ids) for i in b) for b in batches)


WAYS = {"hf_generate": hf_generate, "decode_loop": loop_generate, "static_cache": static_generate}


def measure(args) -> dict:
    import torch

    model, tokenizer, prompts, specs = workload(args)
    report = {"model": f"embedded model {EMBEDDED.relative_to(ROOT)} ({model.num_parameters():,} parameters)",
              "prompts": len(prompts), "device": str(model.device)}
    for mode, spec in specs.items():
        runs = {way: [] for way in WAYS}
        outputs = {}
        for way, run in WAYS.items():  # warm-up: first-call costs (allocator, kernels) out of the timings
            run(model, tokenizer, prompts[:WARM_UP_PROMPTS], spec, args.batch_size, args.seed)
        for rep in range(args.reps):
            for way in (list(WAYS) if rep % 2 == 0 else list(WAYS)[::-1]):
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter(), time.process_time()
                outputs[way] = WAYS[way](model, tokenizer, prompts, spec, args.batch_size, args.seed)
                runs[way].append((time.perf_counter() - wall, time.process_time() - cpu))
            print(f"{mode} rep {rep + 1}/{args.reps}: " + ", ".join(f"{w} {runs[w][-1][0]:.2f} s" for w in WAYS),
                  file=sys.stderr, flush=True)
        result = {}
        for way, (completions, row_steps) in outputs.items():
            tokens = sum(len(c.completion_ids) for c in completions)
            wall = statistics.median(t for t, _ in runs[way])
            result[way] = {"wall_s": wall, "cpu_s": statistics.median(c for _, c in runs[way]),
                           "wall_s_all": [t for t, _ in runs[way]], "completion_tokens": tokens,
                           "new_tokens_per_s": tokens / wall, "row_steps": row_steps,
                           "mean_completion_tokens": tokens / len(completions),
                           "max_completion_tokens": max(len(c.completion_ids) for c in completions),
                           "truncation_rate": sum(c.truncated for c in completions) / len(completions)}
        old, new = result["hf_generate"], result["decode_loop"]
        result["speedup_wall"] = old["wall_s"] / new["wall_s"]
        result["speedup_cpu"] = old["cpu_s"] / new["cpu_s"]
        result["static_over_loop_wall"] = result["static_cache"]["wall_s"] / new["wall_s"]
        same = [a == b for a, b in zip(outputs["static_cache"][0], outputs["decode_loop"][0])]
        result["static_identical_to_loop"] = {"equal": sum(same), "of": len(same)}
        if spec.temperature == 0:
            same = [a.completion_ids == b.completion_ids
                    for a, b in zip(outputs["hf_generate"][0], outputs["decode_loop"][0])]
            result["greedy_identical"] = {"equal": sum(same), "of": len(same)}
        report[mode] = result
    return report


def main(argv=None) -> None:
    from resp.artifacts import write_json

    args = parse_args(argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    started = {"loadavg_at_start": os.getloadavg(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"}
    report = {"settings": settings, **started, **measure(args), "loadavg_at_end": os.getloadavg()}
    write_json(args.out, report)
    for mode in ("greedy", "sampled"):
        r = report[mode]
        print(f"{mode}: hf_generate {r['hf_generate']['wall_s']:.2f} s ({r['hf_generate']['new_tokens_per_s']:.0f} tok/s), "
              f"decode_loop {r['decode_loop']['wall_s']:.2f} s ({r['decode_loop']['new_tokens_per_s']:.0f} tok/s): "
              f"{r['speedup_wall']:.2f}x wall, {r['speedup_cpu']:.2f}x CPU"
              + (f"; greedy identical {r['greedy_identical']['equal']}/{r['greedy_identical']['of']}"
                 if "greedy_identical" in r else "")
              + f"; static_cache {r['static_cache']['wall_s']:.2f} s = {r['static_over_loop_wall']:.2f}x the loop's wall, "
                f"identical to the loop {r['static_identical_to_loop']['equal']}/{r['static_identical_to_loop']['of']}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
