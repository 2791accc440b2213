"""The chunked scoring loss (importance.loss_chunk_tokens) vs the full-logits loss on CPU, in one run.

(a) throughput: completion tokens/s of `resp.importance.taylor_scores` on the embedded model
    (data/models/tiny, vocabulary 512) and arith traces, as benchmarks/bench_scoring.py (a) makes
    them, --batch-size sequences per backward, full vs chunked loss (--chunk-tokens), alternating,
    median over --reps after a warm-up; the unit scores of both are compared (max relative difference).
(b) peak memory: bench_scoring.py's fresh-process measurement (64 KiB mmap threshold, so the
    resident set follows live tensors) on its check model (vocabulary 4096) with a batch of
    --check-batch traces of up to --seq-len tokens, full vs chunked, next to
    `resp.memory.predict_scoring_memory` (peak minus weights).

The logits are what the chunked loss saves, so the saving grows with vocabulary x tokens: on
Qwen3's 151,936-token vocabulary they dominate scoring memory (benchmarks/gpu_check.py measures
that on a GPU). Results: benchmarks/results/loss.{json,md} (or --out). Nothing is asserted here.

    python benchmarks/bench_loss.py --threads 1          # a few minutes
    python benchmarks/bench_loss.py --dry-run --out /tmp/loss
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_scoring  # noqa: E402  (its models, traces and peak-memory worker)

ALLOCATOR = "mmap threshold 64 KiB"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--check-batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="small sizes, to check the script runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.traces, args.batch_size, args.chunk_tokens, args.seq_len, args.check_batch, args.reps = 16, 8, 32, 64, 2, 1
    return args


def throughput(args) -> dict:
    from resp.importance import taylor_scores
    from resp.structures import structures_for

    model, tokenizer, description = bench_scoring.embedded_or_random(args.threads)
    traces = bench_scoring.arith_traces(tokenizer, args.traces)
    s = structures_for(model, "query_head", [])
    tokens = sum(len(t.completion_ids) for t in traces)
    chunks = {"full": None, "chunked": args.chunk_tokens}
    times, scores = {way: [] for way in chunks}, {}
    for way, chunk in chunks.items():  # warm-up
        taylor_scores(model, traces[:args.batch_size], s, args.batch_size, tokenizer.pad_token_id, loss_chunk_tokens=chunk)
    for rep in range(args.reps):
        for way in (list(chunks) if rep % 2 == 0 else list(chunks)[::-1]):
            start = time.perf_counter()
            scores[way] = taylor_scores(model, traces, s, args.batch_size, tokenizer.pad_token_id,
                                        loss_chunk_tokens=chunks[way])
            times[way].append(time.perf_counter() - start)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{w} {times[w][-1]:.2f} s" for w in chunks), file=sys.stderr,
              flush=True)
    full, chunked = scores["full"], scores["chunked"]
    difference = max(float(((a - b).abs().max() / a.abs().max())) for a, b in
                     ((full.attention, chunked.attention), (full.channels, chunked.channels)))
    seconds = {way: statistics.median(t) for way, t in times.items()}
    return {"model": description, "traces": len(traces), "completion_tokens": tokens, "batch_size": args.batch_size,
            "chunk_tokens": args.chunk_tokens, "seconds": seconds, "seconds_all": times,
            "tok_s": {way: tokens / t for way, t in seconds.items()},
            "chunked_over_full_tok_s": seconds["full"] / seconds["chunked"],
            "max_relative_score_difference": difference}


def peak_memory(args) -> dict:
    from resp.memory import predict_scoring_memory

    rows = {}
    for way, chunk in {"full": None, "chunked": args.chunk_tokens}.items():
        spec = {"model": "check", "n_traces": args.check_batch, "seq_len": args.seq_len, "batch_size": args.check_batch,
                "threads": args.threads, "grads_only_scored": True, "grad_checkpointing": False, "per_sample_abs": False,
                "loss_chunk_tokens": chunk}
        measured = bench_scoring.run_worker(spec, ALLOCATOR)["peak_bytes"]
        predicted = predict_scoring_memory(bench_scoring.CHECK_MODEL, "float32", args.seq_len, args.check_batch,
                                           loss_chunk_tokens=chunk)
        rows[way] = {"measured_bytes": measured, "predicted_bytes": predicted.peak - predicted.weights,
                     "predicted_over_measured": (predicted.peak - predicted.weights) / measured}
    return {"model": bench_scoring.CHECK_MODEL, "allocator": ALLOCATOR, "batch": args.check_batch,
            "seq_len": args.seq_len, "chunk_tokens": args.chunk_tokens, **rows,
            "chunked_over_full_bytes": rows["chunked"]["measured_bytes"] / rows["full"]["measured_bytes"]}


def markdown(report: dict) -> str:
    t, m = report["throughput"], report["peak_memory"]
    return "\n".join([
        "# Scoring loss: full logits vs chunked (CPU)", "",
        f"Machine: {report['machine']}; load average at start {report['loadavg_at_start'][0]:.1f}, "
        f"at end {report['loadavg_at_end'][0]:.1f}. `python benchmarks/bench_loss.py "
        f"--threads {report['settings']['threads']}`.", "",
        f"(a) {t['model']}: {t['traces']} arith traces, batch {t['batch_size']}, chunk {t['chunk_tokens']} tokens: "
        f"full {t['tok_s']['full']:.0f} vs chunked {t['tok_s']['chunked']:.0f} completion tokens/s "
        f"(chunked {t['chunked_over_full_tok_s']:.2f}x; medians of {report['settings']['reps']}); unit scores differ by "
        f"at most {t['max_relative_score_difference']:.1e} of the largest.", "",
        f"(b) check model (vocabulary {m['model']['vocab_size']}), batch {m['batch']} x up to {m['seq_len']} tokens, "
        f"peak memory above the weights ({m['allocator']}):", "",
        "| loss | measured | predicted | predicted / measured |", "|---|---|---|---|",
        *[f"| {way} | {m[way]['measured_bytes'] / 2**20:.1f} MiB | {m[way]['predicted_bytes'] / 2**20:.1f} MiB | "
          f"{m[way]['predicted_over_measured']:.2f} |" for way in ("full", "chunked")], "",
        f"Chunked / full measured peak: {m['chunked_over_full_bytes']:.2f}.", ""])


def main(argv=None) -> None:
    args = parse_args(argv)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "loadavg_at_start": os.getloadavg(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"}
    print("(a) throughput ...", file=sys.stderr, flush=True)
    report["throughput"] = throughput(args)
    print("(b) peak memory ...", file=sys.stderr, flush=True)
    report["peak_memory"] = peak_memory(args)
    report["loadavg_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    from resp.artifacts import write_json, write_text

    write_json(args.out / "loss.json", report)
    write_text(args.out / "loss.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
