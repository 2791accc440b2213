"""One prepared GPU check: Taylor scoring and generation at Qwen3-8B scale, against the memory model.

For a single short GPU session (one H200, minutes): a randomly initialised model with
Qwen3-8B's config (hidden 4096, 36 layers, 32 query / 8 KV heads of 128, intermediate 12288,
vocab 151936; built from a Qwen3Config, nothing downloaded) in bfloat16, initialised directly
on the GPU. Measured:

- scoring: `resp.importance.taylor_scores` with gradient checkpointing over traces of about
  2k tokens (random ids; a 512-token prompt and a completion of 1536 - 8k tokens for trace k,
  so batches are padded; decode-only labels), for batch sizes --batch-sizes (mean mode) and
  once in per-sample-abs mode: completion tokens/s after a warm-up, and peak memory
  (torch.cuda.max_memory_allocated, reset before each run) next to
  `resp.memory.predict_scoring_memory` for the same settings;
- generation: HF `generate` on a batch of --gen-batch random prompts of --gen-prompt tokens,
  exactly --gen-new new tokens each (greedy, min_new_tokens = max_new_tokens): new tokens/s.

The JSON report is rewritten after every measurement, so a run cut short keeps what it
measured. --out defaults to $OUT/gpu_check.json when $OUT is set, else
benchmarks/results/gpu_check.json. --dry-run runs the same code on CPU with a small config in
seconds (peak memory is then not measured).

    python benchmarks/gpu_check.py                 # on the GPU machine (about 2-3 minutes)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
DRY_RUN = dict(QWEN3_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=int, default=8, help="traces per scoring run")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--completion-tokens", type=int, default=1536, help="completion of the longest trace")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--gen-prompt", type=int, default=128)
    ap.add_argument("--gen-new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="CPU, small config and lengths: checks the script in seconds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.traces, args.prompt_tokens, args.completion_tokens = 4, 16, 48
        args.batch_sizes, args.gen_batch, args.gen_prompt, args.gen_new = [1, 2], 4, 8, 8
    if args.out is None:
        args.out = (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results") / "gpu_check.json"
    return args


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def build_model(shape: dict, device, seed: int):
    """The model in bfloat16, initialised in place on `device` (no CPU copy of the weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(shape["model_type"], **{k: v for k, v in shape.items() if k != "model_type"})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def make_traces(args, vocab: int):
    import torch

    from resp.traces import Trace

    g = torch.Generator().manual_seed(args.seed)
    traces = []
    for k in range(args.traces):
        ids = torch.randint(1, vocab, (args.prompt_tokens + args.completion_tokens - 8 * k,), generator=g).tolist()
        traces.append(Trace(f"r{k}", ids[:args.prompt_tokens], ids[args.prompt_tokens:], "", False))
    return traces


def timed(fn, cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def score_run(model, traces, s, shape, batch_size: int, per_sample_abs: bool, cuda: bool) -> dict:
    import torch

    from resp.importance import taylor_scores
    from resp.memory import predict_scoring_memory

    options = dict(per_sample_abs=per_sample_abs, grads_only_scored=True, grad_checkpointing=True)
    taylor_scores(model, traces[:batch_size], s, batch_size, 0, **options)  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = {}
    seconds = timed(lambda: result.setdefault("scores", taylor_scores(model, traces, s, batch_size, 0, **options)), cuda)
    tokens = sum(len(t.completion_ids) for t in traces)
    seq_len = max(len(t.prompt_ids) + len(t.completion_ids) for t in traces)
    predicted = predict_scoring_memory(shape, "bfloat16", seq_len, batch_size, **options)
    measured = torch.cuda.max_memory_allocated() if cuda else None
    return {"batch_size": batch_size, "per_sample_abs": per_sample_abs, "grad_checkpointing": True,
            "traces": len(traces), "seq_len_max": seq_len, "completion_tokens": tokens, "seconds": seconds,
            "completion_tok_s": tokens / seconds, "all_tok_s": sum(len(t.prompt_ids) + len(t.completion_ids) for t in traces) / seconds,
            "mean_loss": result["scores"].mean_loss,
            "peak_allocated_bytes": measured, "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            "predicted_peak_bytes": predicted.peak, "predicted_breakdown": predicted.breakdown(),
            "predicted_over_measured": predicted.peak / measured if measured else None,
            "fits_80gb": measured < 80e9 if measured else predicted.peak < 80e9}


def generation_run(model, args, vocab: int, device, cuda: bool) -> dict:
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, vocab, (args.gen_batch, args.gen_prompt), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(n: int):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)

    run(2)  # warm-up
    one = timed(lambda: run(1), cuda)
    full = timed(lambda: run(args.gen_new), cuda)
    return {"batch": args.gen_batch, "prompt_tokens": args.gen_prompt, "new_tokens": args.gen_new,
            "seconds": full, "new_tok_s": args.gen_batch * args.gen_new / full,
            "decode_tok_s": args.gen_batch * (args.gen_new - 1) / max(full - one, 1e-9)}


def main(argv=None) -> None:
    import torch
    import transformers

    from resp.structures import structures_for

    args = parse_args(argv)
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --dry-run on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    shape = DRY_RUN if args.dry_run else QWEN3_8B
    started = time.perf_counter()
    report = {"dry_run": args.dry_run, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model_shape": shape, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "device": torch.cuda.get_device_name() if cuda else platform.machine()}
    model = build_model(shape, device, args.seed)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["dtype"] = str(next(model.parameters()).dtype)
    report["attn_implementation"] = model.config._attn_implementation
    report["build_seconds"] = time.perf_counter() - started
    write(report, args.out)
    print(f"built {report['parameters']:,} parameters in {report['build_seconds']:.1f} s", file=sys.stderr, flush=True)

    s = structures_for(model, "query_head", [])
    traces = make_traces(args, shape["vocab_size"])
    report["scoring"] = []
    for batch_size, per_sample_abs in [(b, False) for b in args.batch_sizes] + [(1, True)]:
        row = score_run(model, traces, s, shape, batch_size, per_sample_abs, cuda)
        report["scoring"].append(row)
        write(report, args.out)
        print(f"scoring batch {batch_size} per_sample_abs={per_sample_abs}: {row['completion_tok_s']:.1f} completion tok/s, "
              f"peak {row['peak_allocated_bytes']} B, predicted {row['predicted_peak_bytes']} B", file=sys.stderr, flush=True)

    report["generation"] = generation_run(model, args, shape["vocab_size"], device, cuda)
    report["total_seconds"] = time.perf_counter() - started
    write(report, args.out)
    from resp.cost import rates_from_gpu_check

    rates = rates_from_gpu_check(report).save(args.out.with_name(args.out.stem + "-rates.json"))  # for `resp cost --rates`
    print(f"rates for resp cost in {rates}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
