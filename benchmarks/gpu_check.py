"""One prepared GPU check: the fast paths (static-cache / compiled generation, the chunked scoring
loss) at Qwen3-8B scale against today's paths, with their quality checks and the memory model.

For a single short GPU session (one H200, minutes). Sections run cheapest first and the JSON
report is rewritten after every measurement, so a run cut short keeps what it measured; a
setting that fails (out of memory, a compile error) is recorded under "failed" and the rest go on.

1. quality, on the embedded model (data/models/tiny, trained weights): greedy and sampled
   completions of --quality-prompts arith prompts on the device in float32, per generation
   backend, against the decode loop on the device (share of identical completions; sampling
   draws from the device's random generator, so CPU and CUDA streams differ), and the loop's
   greedy completions on the device against those on CPU; Taylor scores on
   the loop's greedy traces on the device in float32 and bfloat16, full and chunked loss:
   share of units whose kept/pruned decision equals the float32 CPU mask at each target
   (`equal` where the masks are identical). The CPU chunked loss is checked the same way.
2. scoring, on a randomly initialised model with Qwen3-8B's config (hidden 4096, 36 layers,
   32 query / 8 KV heads of 128, intermediate 12288, vocab 151936; nothing downloaded) in
   bfloat16, initialised on the device: `taylor_scores` with gradient checkpointing over
   --traces random traces of about 2k tokens (prompt 512, completion 1536 - 8k for trace k;
   decode-only labels), mean mode, for each --losses (full logits / chunked, --chunk-tokens)
   x --batch-sizes: tokens/s, model FLOPs/s (resp.cost's estimate, the same for both losses)
   as a fraction of the device's bf16 dense peak, peak memory next to the memory model.
3. generation on the same model: `resp.generation.generate_ids` for each --gen-backends (hf:
   the decode loop; hf_static: transformers' generate with a static KV cache; hf_compiled: the
   same, torch.compile'd with CUDA graphs) on --gen-batch random prompts of --gen-prompt
   tokens, exactly --gen-new new tokens (no EOS, greedy), after a full-length warm-up (which
   compiles): new tokens/s, decode tokens/s, the memory-bound rate (every decode step reads the
   weights a token passes through plus the KV cache, at the device's memory bandwidth) and the
   fraction of it reached; greedy rows identical to the decode loop's (share).

"generation" is the fastest backend's row (resp.cost.rates_from_gpu_check reads it and the
fastest scoring row into `<out stem>-rates.json` for `resp cost --rates`). --out defaults to
$OUT/gpu_check.json when $OUT is set, else benchmarks/results/gpu_check.json. --smoke runs
everything on CPU with a small config and short lengths (a few minutes, most of it compiling
hf_compiled) and writes to a temporary file, never over the committed results.

    timeout 540 python benchmarks/gpu_check.py          # on the GPU machine (about 6 minutes)
    python benchmarks/gpu_check.py --smoke               # CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

COMMITTED = ROOT / "benchmarks" / "results" / "gpu_check.json"
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
SMOKE = dict(QWEN3_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# Vendor data sheets (dense bf16 tensor FLOP/s, memory bytes/s), by torch.cuda.get_device_name();
# --peak-tflops / --bandwidth-gbs give them for any other device.
DEVICE_PEAKS = {"NVIDIA H200": (989e12, 4.8e12), "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
                "NVIDIA A100-SXM4-80GB": (312e12, 2.039e12)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=int, default=16, help="traces per scoring run")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--completion-tokens", type=int, default=1536, help="completion of the longest trace")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--losses", nargs="+", choices=["full", "chunked"], default=["full", "chunked"])
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="importance.loss_chunk_tokens of the chunked loss")
    ap.add_argument("--gen-backends", nargs="+", choices=["hf", "hf_static", "hf_compiled"],
                    default=["hf", "hf_static", "hf_compiled"])
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--gen-prompt", type=int, default=128)
    ap.add_argument("--gen-new", type=int, default=128)
    ap.add_argument("--quality-prompts", type=int, default=32)
    ap.add_argument("--quality-new-tokens", type=int, default=96)
    ap.add_argument("--quality-targets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: DEVICE_PEAKS)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth (default: DEVICE_PEAKS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="CPU, small config and lengths, temporary output")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.traces, args.prompt_tokens, args.completion_tokens, args.batch_sizes = 4, 16, 48, [1, 2]
        args.chunk_tokens, args.gen_batch, args.gen_prompt, args.gen_new = 16, 4, 8, 8
        args.quality_prompts, args.quality_new_tokens = 8, 24
        if args.out is None:
            args.out = Path(tempfile.gettempdir()) / "resp-gpu_check-smoke" / "gpu_check.json"
        if args.out.resolve() == COMMITTED.resolve():
            ap.error(f"--smoke would overwrite the committed GPU results {COMMITTED}: give another --out")
    if args.out is None:
        args.out = (Path(os.environ["OUT"]) if os.environ.get("OUT") else COMMITTED.parent) / "gpu_check.json"
    return args


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percent(fraction: float | None) -> str:
    return "n/a (no device peak known)" if fraction is None else f"{fraction:.1%}"


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def attempt(report: dict, what: dict, fn):
    """fn()'s result; on an error (out of memory, a compile failure) None, with `what` and the error
    under report["failed"], so the other settings still run."""
    import torch

    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        report.setdefault("failed", []).append({**what, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"})
        say(f"FAILED {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        traceback.print_exc(limit=3)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


# ---------------------------------------------------------------- 1. quality on the embedded model

def quality(args, device, report: dict) -> None:
    import torch

    from resp.config import load_params
    from resp.generation import SamplingSpec, eos_token_ids, generate_ids
    from resp.importance import taylor_scores
    from resp.masks import Mask, prune_step
    from resp.models import load_model
    from resp.structures import structures_for
    from resp.tasks import calibration_items, render_prompt
    from resp.traces import Trace

    params = load_params(ROOT / "params.yaml")
    model_dir = str(ROOT / params.embedded_model.dir)
    cpu_model, tokenizer = load_model(model_dir, None, "float32", "cpu")
    items = calibration_items(params.tasks["arith"], args.quality_prompts, params.calibration.seed)
    prompt_ids = tokenizer([render_prompt(tokenizer, i.message) for i in items], add_special_tokens=False)["input_ids"]
    eos, pad = eos_token_ids(cpu_model, tokenizer), tokenizer.pad_token_id
    g = params.generation
    specs = {"greedy": SamplingSpec(0.0, 1.0, 0, args.quality_new_tokens),
             "sampled": SamplingSpec(g.temperature, g.top_p, g.top_k, args.quality_new_tokens)}

    def completions(model, spec, backend):
        return generate_ids(model, prompt_ids, spec, g.batch_size, g.seed, eos, pad, f"quality {backend}", backend)

    def cut(rows):
        from resp.generation import _cut

        return [_cut(row, set(eos))[0] for row in rows]

    def share(rows, want):
        return sum(a == b for a, b in zip(rows, want, strict=True)) / len(want)

    cpu_greedy = cut(completions(cpu_model, specs["greedy"], "hf"))
    out = report["quality"] = {"model": params.embedded_model.dir, "prompts": len(items), "generation": {}, "masks": {}}
    device_model = load_model(model_dir, None, "float32", str(device))[0]
    loop = {name: cut(completions(device_model, spec, "hf")) for name, spec in specs.items()}
    out["generation"]["hf/greedy_vs_cpu"] = share(loop["greedy"], cpu_greedy)
    for backend in [b for b in args.gen_backends if b != "hf"]:
        for name, spec in specs.items():
            rows = attempt(report, {"section": "quality", "backend": backend, "sampling": name},
                           lambda: cut(completions(device_model, spec, backend)))
            if rows is not None:
                out["generation"][f"{backend}/{name}"] = share(rows, loop[name])
                write(report, args.out)
    say(f"quality: completions identical to the decode loop's (share): {out['generation']}")

    traces = [Trace(i.id, list(p), c, "", False) for i, p, c in zip(items, prompt_ids, cpu_greedy)]
    s = structures_for(cpu_model, params.prune.attention_unit, params.prune.protected_layers)
    imp = params.importance

    def masks(model, chunk):
        scores = taylor_scores(model, traces, s, imp.batch_size, pad, loss_chunk_tokens=chunk, desc="quality scores")
        normalized = scores.normalized(s, imp.normalize)
        return {t: prune_step(*normalized, Mask.dense(s), s, t) for t in args.quality_targets}

    def agreement(got: dict) -> dict:
        shares = {}
        for t, mask in got.items():
            want = want_masks[t]
            same = int((mask.heads == want.heads).sum()) + int((mask.channels == want.channels).sum())
            shares[f"{t:.2f}"] = same / (want.heads.numel() + want.channels.numel())
        return {"agreement": shares, "equal": all(got[t].digest() == want_masks[t].digest() for t in got)}

    want_masks = masks(cpu_model, None)
    out["masks"]["cpu/float32/chunked"] = agreement(masks(cpu_model, args.chunk_tokens))
    del device_model
    for dtype in ("float32", "bfloat16"):
        model = load_model(model_dir, None, dtype, str(device))[0]
        for loss, chunk in (("full", None), ("chunked", args.chunk_tokens)):
            got = attempt(report, {"section": "quality", "dtype": dtype, "loss": loss}, lambda: masks(model, chunk))
            if got is not None:
                out["masks"][f"{device.type}/{dtype}/{loss}"] = agreement(got)
                write(report, args.out)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    say(f"quality: masks against the float32 CPU masks: {json.dumps(out['masks'])}")


# ---------------------------------------------------------------- 2-3. scoring and generation at scale

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


def score_run(model, traces, s, shape, batch_size: int, chunk: int | None, peak_flops: float | None, device) -> dict:
    import torch

    from resp.cost import matmul_params, score_flops_per_token
    from resp.importance import scored_weights, taylor_scores
    from resp.memory import predict_scoring_memory

    cuda = device.type == "cuda"
    options = dict(grads_only_scored=True, grad_checkpointing=True, loss_chunk_tokens=chunk)
    taylor_scores(model, traces[:batch_size], s, batch_size, 0, **options)  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds, scores = timed(lambda: taylor_scores(model, traces, s, batch_size, 0, **options), device)
    completion = sum(len(t.completion_ids) for t in traces)
    tokens = sum(len(t.prompt_ids) + len(t.completion_ids) for t in traces)
    seq_len = max(len(t.prompt_ids) + len(t.completion_ids) for t in traces)
    predicted = predict_scoring_memory(shape, "bfloat16", seq_len, batch_size, grads_only_scored=True,
                                       grad_checkpointing=True, loss_chunk_tokens=chunk)
    measured = torch.cuda.max_memory_allocated() if cuda else None
    grad = sum(w.numel() for w in scored_weights(model, s).values())
    flops_per_s = tokens * score_flops_per_token(matmul_params(model), grad, True) / seconds
    return {"batch_size": batch_size, "per_sample_abs": False, "grad_checkpointing": True,
            "loss": "full" if chunk is None else "chunked", "loss_chunk_tokens": chunk,
            "traces": len(traces), "seq_len_max": seq_len, "completion_tokens": completion, "seconds": seconds,
            "completion_tok_s": completion / seconds, "all_tok_s": tokens / seconds, "mean_loss": scores.mean_loss,
            "model_flops_per_s": flops_per_s, "bf16_peak_fraction": flops_per_s / peak_flops if peak_flops else None,
            "peak_allocated_bytes": measured, "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            "predicted_peak_bytes": predicted.peak, "predicted_breakdown": predicted.breakdown(),
            "predicted_over_measured": predicted.peak / measured if measured else None,
            "fits_80gb": measured < 80e9 if measured else predicted.peak < 80e9}


def memory_bound_tok_s(model, args, bandwidth: float | None) -> float | None:
    """New tokens/s if every decode step only read, at `bandwidth`, the weights a token passes
    through (resp.cost.matmul_params, bf16) and the batch's KV cache at its mean length."""
    from resp.adapters import head_dim
    from resp.cost import matmul_params

    if not bandwidth:
        return None
    c = model.config
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim(c) * 2
    step_bytes = matmul_params(model) * 2 + args.gen_batch * kv_per_token * (args.gen_prompt + args.gen_new / 2)
    return args.gen_batch * bandwidth / step_bytes


def generation_run(model, args, backend: str, vocab: int, device, bound: float | None,
                   reference: list[list[int]] | None) -> dict:
    import torch

    from resp.generation import SamplingSpec, generate_ids

    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(1, vocab, (args.gen_batch, args.gen_prompt), generator=g).tolist()

    def run(n: int):
        spec = SamplingSpec(0.0, 1.0, 0, n)
        return generate_ids(model, prompts, spec, args.gen_batch, 0, [], 0, f"generate {backend}", backend)

    warmup, _ = timed(lambda: run(args.gen_new), device)  # compiles hf_compiled at the measured cache size
    one, _ = timed(lambda: run(1), device)
    full, rows = timed(lambda: run(args.gen_new), device)
    decode = args.gen_batch * (args.gen_new - 1) / max(full - one, 1e-9)
    return {"backend": backend, "batch": args.gen_batch, "prompt_tokens": args.gen_prompt, "new_tokens": args.gen_new,
            "warmup_seconds": warmup, "seconds": full, "new_tok_s": args.gen_batch * args.gen_new / full,
            "decode_tok_s": decode, "memory_bound_tok_s": bound,
            "memory_bound_fraction": decode / bound if bound else None,
            "rows_equal_to_hf": None if reference is None else sum(a == b for a, b in zip(rows, reference)) / len(rows),
            "tokens": rows}


def main(argv=None) -> None:
    import torch
    import transformers

    from resp.structures import structures_for

    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --smoke on CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    name = platform.machine() if args.smoke else torch.cuda.get_device_name()
    peak_flops, bandwidth = DEVICE_PEAKS.get(name, (None, None))
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else bandwidth
    shape = SMOKE if args.smoke else QWEN3_8B
    started = time.perf_counter()
    report = {"smoke": args.smoke, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model_shape": shape, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "device": name,
              "device_peaks": {"bf16_flops_per_s": peak_flops, "memory_bytes_per_s": bandwidth}}
    say(f"gpu_check: writing {args.out}")
    write(report, args.out)

    attempt(report, {"section": "quality"}, lambda: quality(args, device, report))
    write(report, args.out)

    model = build_model(shape, device, args.seed)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["dtype"] = str(next(model.parameters()).dtype)
    report["attn_implementation"] = model.config._attn_implementation
    report["build_seconds"] = time.perf_counter() - started
    write(report, args.out)
    say(f"built {report['parameters']:,} parameters")

    s = structures_for(model, "query_head", [])
    traces = make_traces(args, shape["vocab_size"])
    report["scoring"] = []
    for loss in args.losses:
        chunk = args.chunk_tokens if loss == "chunked" else None
        for batch_size in args.batch_sizes:
            row = attempt(report, {"section": "scoring", "loss": loss, "batch_size": batch_size},
                          lambda: score_run(model, traces, s, shape, batch_size, chunk, peak_flops, device))
            if row is not None:
                report["scoring"].append(row)
                say(f"scoring {loss} batch {batch_size}: {row['all_tok_s']:.1f} tok/s, "
                    f"{percent(row['bf16_peak_fraction'])} of bf16 peak, peak {row['peak_allocated_bytes']} B, "
                    f"predicted {row['predicted_peak_bytes']} B")
            write(report, args.out)

    bound = memory_bound_tok_s(model, args, bandwidth)
    report["generation_backends"] = []
    reference = None
    for backend in args.gen_backends:
        row = attempt(report, {"section": "generation", "backend": backend},
                      lambda: generation_run(model, args, backend, shape["vocab_size"], device, bound, reference))
        if row is not None:
            rows = row.pop("tokens")
            reference = rows if backend == "hf" else reference
            report["generation_backends"].append(row)
            report["generation"] = max(report["generation_backends"], key=lambda r: r["new_tok_s"])
            say(f"generation {backend}: {row['new_tok_s']:.1f} new tok/s (decode {row['decode_tok_s']:.1f}, "
                f"{percent(row['memory_bound_fraction'])} of memory-bound), warm-up {row['warmup_seconds']:.1f} s, "
                f"rows equal to hf's: {row['rows_equal_to_hf']}")
        write(report, args.out)
    report["total_seconds"] = time.perf_counter() - started
    write(report, args.out)
    if report["scoring"] and "generation" in report:
        from resp.cost import rates_from_gpu_check

        rates = rates_from_gpu_check(report).save(args.out.with_name(args.out.stem + "-rates.json"))
        say(f"rates for resp cost in {rates}")
    say(f"report in {args.out} ({len(report.get('failed', []))} failed settings)")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
