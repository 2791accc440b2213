"""Taylor scoring on CPU: throughput and peak memory as ratios, and the memory model checked, in one run.

(a) throughput: completion tokens/s of `resp.importance.taylor_scores` with --batch-size
    sequences per backward vs one sequence per backward (batch_size=1), same traces, median
    over --reps after a warm-up; reported as batched / per-sample.
(b) peak memory: the same scoring with grads_only_scored=True vs False, each in a fresh process;
    reported as False / True.
(c) memory model: a random Qwen3 (hidden 256, 4 layers, 8 query / 4 KV heads of 48, vocab 4096;
    4 traces of 216-256 tokens, so batches are padded) scored in fresh processes under four
    settings; measured peak vs `resp.memory.predict_scoring_memory` (peak minus weights, which
    are resident before scoring starts).

Peak memory of a scoring pass is measured, on Linux, in a fresh process that builds the model
and traces, runs one warm-up pass on a short trace, returns freed heap to the OS (malloc_trim),
resets the resident-set high-water mark (writing 5 to /proc/self/clear_refs), then scores:
peak = VmHWM after scoring - VmRSS before it. Each is measured twice: with glibc's default
malloc, which keeps freed heap blocks resident (so the peak includes allocator caching and
fragmentation), and with MALLOC_MMAP_THRESHOLD_=65536, which maps every large block on its own
and unmaps it when freed, so the resident set follows live tensors: the quantity the memory
model predicts and torch.cuda.max_memory_allocated reports on a GPU.

Model for (a) and (b): the embedded model at data/models/tiny if it holds weights, with traces
made of the world's arith train prompts (chat template, thinking on) followed by the gold
own-style completion and <|im_end|> (what the trained model emits; no generation needed);
otherwise a random model of the same config (params.yaml embedded_model) and tokenizer.

Results: benchmarks/results/scoring.{json,md} (or --out). Nothing is asserted here.

    python benchmarks/bench_scoring.py                          # full run (a few minutes on idle CPUs)
    python benchmarks/bench_scoring.py --dry-run --out /tmp/b   # small sizes, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "models" / "tiny"

# (c): small but not tiny; head_dim * heads (384) != hidden (256) on purpose.
CHECK_MODEL = dict(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=48, max_position_embeddings=512,
                   tie_word_embeddings=False)
# glibc's default malloc keeps freed heap memory (its mmap threshold grows with freed blocks), so
# the resident set overstates live tensors; a fixed 64 KiB threshold returns every large block.
ALLOCATORS = {"glibc default": {}, "mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
CHECK_SETTINGS = [  # (grads_only_scored, grad_checkpointing, per_sample_abs)
    (True, False, False), (False, False, False), (True, True, False), (True, False, True)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=int, default=128, help="number of arith traces for (a) and (b)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per backward of the batched scorer")
    ap.add_argument("--seq-len", type=int, default=256, help="longest trace of the memory-model check (c)")
    ap.add_argument("--check-batch", type=int, default=4, help="traces (= one batch) of the memory-model check (c)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="small sizes, to check the script runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.traces, args.seq_len, args.check_batch, args.reps = 16, 64, 2, 1
        args.batch_size = min(args.batch_size, 8)
    return args


# ---------------------------------------------------------------- models and traces

def params():
    from resp.config import load_params

    return load_params(ROOT / "params.yaml")


def embedded_model_ready() -> bool:
    return (EMBEDDED / "config.json").is_file() and any(EMBEDDED.glob("*.safetensors"))


def embedded_or_random(threads: int):
    """(model, tokenizer, description): the embedded model, or a random one of its config."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from resp.models import load_model
    from resp.world.tokenizer import build_tokenizer
    from resp.world.train import training_texts

    torch.set_num_threads(threads)
    if embedded_model_ready():
        model, tokenizer = load_model(str(EMBEDDED))
        return model, tokenizer, f"embedded model {EMBEDDED.relative_to(ROOT)} ({model.num_parameters():,} parameters)"
    p = params()
    cfg, world = p.embedded_model, p.world
    pairs, prose = training_texts(world.seed, 2000, world.test_items, cfg.prose_fraction)
    tokenizer = build_tokenizer([p + "\n" + c for _, p, c in pairs[::25]] + prose[:200], cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)).eval()
    return model, tokenizer, (f"random model with the embedded model's config ({model.num_parameters():,} parameters; "
                              "data/models/tiny was not trained yet)")


def arith_traces(tokenizer, n: int):
    """The first n arith train problems: chat prompt (thinking on) + own-style completion + <|im_end|>."""
    from resp.prompts import gsm8k_message
    from resp.tasks import render_prompt
    from resp.traces import Trace
    from resp.world import problems as world
    from resp.world.tokenizer import IM_END

    p = params().world
    train, _ = world.make_splits(p.seed, n, p.test_items)  # the arith train split, as write_world makes it
    end = tokenizer.convert_tokens_to_ids(IM_END)
    traces = []
    for k, problem in enumerate(train):
        prompt = render_prompt(tokenizer, gsm8k_message(world.gsm8k_record(problem)["question"]))
        completion = world.own_style_completion(problem)
        traces.append(Trace(f"train-{k}", tokenizer(prompt, add_special_tokens=False)["input_ids"],
                            tokenizer(completion, add_special_tokens=False)["input_ids"] + [end], completion, False))
    return traces


def random_traces(n: int, seq_len: int, vocab: int, seed: int = 0):
    """n traces of seq_len - 10*k tokens (k = 0..n-1, so batches are padded), prompts of 32 tokens."""
    import torch

    from resp.traces import Trace

    g = torch.Generator().manual_seed(seed)
    traces = []
    for k in range(n):
        ids = torch.randint(1, vocab, (seq_len - 10 * k,), generator=g).tolist()
        traces.append(Trace(f"r{k}", ids[:32], ids[32:], "", False))
    return traces


def check_model(seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in CHECK_MODEL.items() if k != "model_type"}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(CHECK_MODEL["model_type"], **values)).eval()


# ---------------------------------------------------------------- worker: one scoring pass in a fresh process

def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure_scoring_peak(spec: dict) -> dict:
    """Peak memory of one `taylor_scores` call (see the module docstring for the method)."""
    import torch

    from resp.importance import taylor_scores
    from resp.structures import structures_for
    from resp.traces import Trace

    torch.set_num_threads(spec["threads"])
    if spec["model"] == "check":
        model = check_model()
        traces, pad = random_traces(spec["n_traces"], spec["seq_len"], CHECK_MODEL["vocab_size"]), 0
    else:
        model, tokenizer, _ = embedded_or_random(spec["threads"])
        traces, pad = arith_traces(tokenizer, spec["n_traces"]), tokenizer.pad_token_id
    s = structures_for(model, "query_head", [])
    options = dict(per_sample_abs=spec["per_sample_abs"], grads_only_scored=spec["grads_only_scored"],
                   grad_checkpointing=spec["grad_checkpointing"], loss_chunk_tokens=spec.get("loss_chunk_tokens"))
    taylor_scores(model, [Trace("warm", [1, 2, 3], [4, 5, 6], "", False)], s, 1, pad, **options)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    taylor_scores(model, traces, s, spec["batch_size"], pad, **options)
    return {"peak_bytes": (_status_kib("VmHWM") - before) * 1024,
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def run_worker(spec: dict, allocator: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", **ALLOCATORS[allocator]}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                          capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main: (a), (b), (c)

def throughput(args) -> dict:
    from resp.importance import taylor_scores
    from resp.structures import structures_for

    model, tokenizer, description = embedded_or_random(args.threads)
    traces = arith_traces(tokenizer, args.traces)
    s = structures_for(model, "query_head", [])
    tokens = sum(len(t.completion_ids) for t in traces)

    def seconds(batch_size: int) -> float:
        taylor_scores(model, traces[:batch_size], s, batch_size, tokenizer.pad_token_id)  # warm-up
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            taylor_scores(model, traces, s, batch_size, tokenizer.pad_token_id)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    batched, single = seconds(args.batch_size), seconds(1)
    return {"model": description, "traces": len(traces), "completion_tokens": tokens,
            "mean_trace_tokens": sum(len(t.prompt_ids) + len(t.completion_ids) for t in traces) / len(traces),
            "batch_size": args.batch_size, "batched_tok_s": tokens / batched, "per_sample_tok_s": tokens / single,
            "speedup": single / batched}


def grads_memory(args) -> list[dict]:
    rows = []
    for allocator in ALLOCATORS:
        peak = {}
        for only in (True, False):
            spec = {"model": "embedded", "n_traces": args.traces, "batch_size": args.batch_size, "threads": args.threads,
                    "grads_only_scored": only, "grad_checkpointing": False, "per_sample_abs": False}
            peak[only] = run_worker(spec, allocator)["peak_bytes"]
        rows.append({"allocator": allocator, "peak_bytes_grads_only_scored": peak[True], "peak_bytes_all_grads": peak[False],
                     "ratio_all_over_scored": peak[False] / peak[True]})
    return rows


def memory_model_check(args) -> list[dict]:
    from resp.memory import predict_scoring_memory

    rows = []
    for only, ckpt, per_sample in CHECK_SETTINGS:
        spec = {"model": "check", "n_traces": args.check_batch, "seq_len": args.seq_len, "batch_size": args.check_batch,
                "threads": args.threads, "grads_only_scored": only, "grad_checkpointing": ckpt, "per_sample_abs": per_sample}
        measured = {allocator: run_worker(spec, allocator) for allocator in ALLOCATORS}
        predicted = predict_scoring_memory(CHECK_MODEL, "float32", args.seq_len, args.check_batch,
                                           per_sample_abs=per_sample, grads_only_scored=only, grad_checkpointing=ckpt)
        predicted_delta = predicted.peak - predicted.weights
        weights = {m["weights_bytes"] for m in measured.values()}
        rows.append({"grads_only_scored": only, "grad_checkpointing": ckpt, "per_sample_abs": per_sample,
                     "predicted_bytes": predicted_delta, "weights_bytes": weights.pop(),
                     "predicted_weights_bytes": predicted.weights, "breakdown": predicted.breakdown(),
                     "measured": {a: {"bytes": m["peak_bytes"], "predicted_over_measured": predicted_delta / m["peak_bytes"]}
                                  for a, m in measured.items()}})
    return rows


def markdown(report: dict) -> str:
    a, b = report["throughput"], report["grads_memory"]
    lines = [f"# Scoring benchmark ({'dry run, small sizes' if report['settings']['dry_run'] else 'full run'})", "",
             f"Settings: {json.dumps(report['settings'], sort_keys=True)}", "",
             f"Load average at start: {report['loadavg_at_start']}; {report['machine']}", "",
             f"Model for (a) and (b): {a['model']}; {a['traces']} arith traces, mean {a['mean_trace_tokens']:.1f} tokens, "
             f"{a['completion_tokens']} completion tokens.", "",
             "## (a) Throughput", "",
             "| scorer | completion tokens/s |", "|---|---|",
             f"| batched (batch_size={a['batch_size']}) | {a['batched_tok_s']:.1f} |",
             f"| per-sample (batch_size=1) | {a['per_sample_tok_s']:.1f} |", "",
             f"Batched / per-sample: **{a['speedup']:.2f}x**", "",
             "## (b) Peak memory of scoring, gradients on all weights vs on the scored projections only", "",
             "| allocator | grads_only_scored=True MB | False MB | False / True |", "|---|---|---|---|",
             *[f"| {r['allocator']} | {r['peak_bytes_grads_only_scored'] / 1e6:.2f} | {r['peak_bytes_all_grads'] / 1e6:.2f} "
               f"| **{r['ratio_all_over_scored']:.2f}x** |" for r in b], "",
             "## (c) Memory model vs measurement", "",
             f"Random Qwen3 {json.dumps({k: v for k, v in CHECK_MODEL.items() if k != 'model_type'})}, float32, "
             f"{report['settings']['check_batch']} traces of up to {report['settings']['seq_len']} tokens "
             "(peak minus weights).", "",
             "| grads_only_scored | grad_checkpointing | per_sample_abs | predicted MB | "
             + " | ".join(f"measured MB ({a}) | predicted / measured" for a in ALLOCATORS) + " |",
             "|---|---|---|---|" + "---|---|" * len(ALLOCATORS)]
    for r in report["memory_model"]:
        lines.append(f"| {r['grads_only_scored']} | {r['grad_checkpointing']} | {r['per_sample_abs']} "
                     f"| {r['predicted_bytes'] / 1e6:.2f} | "
                     + " | ".join(f"{m['bytes'] / 1e6:.2f} | {m['predicted_over_measured']:.2f}" for m in r["measured"].values())
                     + " |")
    lines += ["", "Peak = VmHWM after scoring - VmRSS before it, in a fresh process after a warm-up pass, "
                  "malloc_trim and a high-water-mark reset (/proc/self/clear_refs)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure_scoring_peak(json.loads(args.worker))))
        return
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
              "loadavg_at_start": os.getloadavg(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                            f"python {platform.python_version()}"}
    print("(a) throughput ...", file=sys.stderr, flush=True)
    report["throughput"] = throughput(args)
    print("(b) peak memory, grads_only_scored True vs False ...", file=sys.stderr, flush=True)
    report["grads_memory"] = grads_memory(args)
    print("(c) memory model vs measurement ...", file=sys.stderr, flush=True)
    report["memory_model"] = memory_model_check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    from resp.artifacts import write_json, write_text

    write_json(args.out / "scoring.json", report)
    write_text(args.out / "scoring.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
