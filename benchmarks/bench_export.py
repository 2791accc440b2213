"""Dense vs compact export on CPU: size, memory and speed as ratios to dense, measured in one run.

For each model (the embedded model at data/models/tiny if it exists, and a randomly initialised
model with Qwen3-0.6B's shape) and each parameter sparsity, a mask is made with
`resp.masks.prune_step` on weight-magnitude scores (or read with --mask, for the embedded model),
exported with `resp.export.export_model(..., "compact", ...)`, and compared with the dense model
saved the same way. Each variant is measured in its own fresh process that loads it from disk:

- params: parameters stored; file size: bytes of its *.safetensors files;
- peak memory: peak resident set size (VmHWM) of the process after loading the model and
  running the timed work, minus the peak of a process that only imports torch and transformers;
- prefill tokens/s: one forward over a fixed random prompt (batch 1, cache on, last logits only);
- decode tokens/s: (N - 1) / (t(generate N tokens) - t(generate 1 token)), greedy, exactly N new
  tokens (min_new_tokens = N), so prefill and first-token costs cancel;
timings are medians over --reps after one warm-up, with torch.set_num_threads(--threads).

Results: benchmarks/results/export.{json,md} (or --out). Nothing here is asserted; the stated
goal (compact at 40% sparsity decodes >= 1.4x faster than dense) is reported as met or not.

    python benchmarks/bench_export.py                      # full run (minutes; needs idle CPUs)
    python benchmarks/bench_export.py --vocab 32768        # smaller embedding/head, stated in the results
    python benchmarks/bench_export.py --dry-run --out /tmp/bench  # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "models" / "tiny"
DECODE_GOAL = {"sparsity": 0.4, "speedup": 1.4}

# Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B), randomly initialised in fp32.
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6)
DRY_RUN = dict(hidden_size=64, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               intermediate_size=128, vocab_size=512)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--mask", type=Path, action="append", default=[],
                    help="mask file(s) for the embedded model instead of magnitude masks (repeatable)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary of the Qwen3-0.6B-shape model (default: 151936)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes and lengths, to check the script runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- worker: one variant in a fresh process

def peak_rss_bytes() -> int:
    """This process's own high-water RSS (VmHWM). Not ru_maxrss: Linux carries that over fork and
    exec from the parent, which holds the dense model, so every worker would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # non-Linux fallback (KiB)


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    if args.baseline:
        return {"peak_rss_bytes": peak_rss_bytes()}
    model = AutoModelForCausalLM.from_pretrained(args.worker, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    attention = torch.ones_like(ids)

    @torch.no_grad()
    def prefill():
        model(ids, attention_mask=attention, use_cache=True, logits_to_keep=1)

    def generate(n: int):
        model.generate(ids, attention_mask=attention, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    prefill()
    generate(2)  # warm-up
    prefill_s = _median_seconds(prefill, args.reps)
    one_s = _median_seconds(lambda: generate(1), args.reps)
    full_s = _median_seconds(lambda: generate(args.new_tokens), args.reps)
    return {"prefill_tok_s": args.prompt_tokens / prefill_s,
            "decode_tok_s": (args.new_tokens - 1) / max(full_s - one_s, 1e-9),
            "peak_rss_bytes": peak_rss_bytes()}


def run_worker(args: argparse.Namespace, directory: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps), "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--worker", str(directory)] if directory else ["--baseline"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main: build variants, measure, report

def magnitude_masks(model, s, sparsities: list[float]) -> dict[float, object]:
    """Nested masks from per-parameter weight magnitude (sum of squares / unit size)."""
    from resp.export.uniform import magnitudes
    from resp.masks import Mask, prune_step

    heads, _, channels = magnitudes(model, s)
    attention_norm, channel_norm = s.normalizer("params")
    mask, masks = Mask.dense(s), {}
    for target in sorted(sparsities):
        mask = prune_step(heads / attention_norm, channels / channel_norm, mask, s, target)
        masks[target] = mask
    return masks


def random_qwen3(args: argparse.Namespace):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = {**QWEN3_06B, **(DRY_RUN if args.dry_run else {})}
    if args.vocab:
        shape["vocab_size"] = args.vocab
    torch.manual_seed(args.seed)
    return Qwen3ForCausalLM(Qwen3Config(**shape)).eval(), shape


def files_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def measure_model(name: str, model, masks: dict, args, channel_multiple: int, baseline_rss: int, workdir: Path) -> list[dict]:
    from resp.export import MANIFEST, export_model

    dense_dir = workdir / f"{name}-dense"
    model.save_pretrained(dense_dir)
    variants = [{"variant": "dense", "sparsity": 0.0, "dir": dense_dir, "params": model.num_parameters()}]
    for target, (mask, s) in masks.items():
        out = export_model(model, None, mask, s, "compact", workdir / f"{name}-compact-{target:.2f}", channel_multiple)
        manifest = json.loads((out / MANIFEST).read_text())
        variants.append({"variant": "compact", "sparsity": round(mask.sparsity(s), 4), "dir": out,
                         "params": manifest["params"]["stored"], "padding_heads": manifest["padding_heads"]})
    rows = []
    for v in variants:
        print(f"  measuring {name} {v['variant']} @ {v['sparsity']:.2f} ...", file=sys.stderr, flush=True)
        measured = run_worker(args, v["dir"])
        rows.append({**{k: x for k, x in v.items() if k != "dir"}, "file_bytes": files_bytes(v["dir"]),
                     "peak_mem_bytes": measured["peak_rss_bytes"] - baseline_rss,
                     "prefill_tok_s": measured["prefill_tok_s"], "decode_tok_s": measured["decode_tok_s"]})
    dense = rows[0]
    for row in rows:
        for key in ("params", "file_bytes", "peak_mem_bytes", "prefill_tok_s", "decode_tok_s"):
            row[f"{key}_ratio"] = row[key] / dense[key]
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Export benchmark: dense vs compact ({'dry run, tiny shapes' if report['settings']['dry_run'] else 'full run'})",
             "", f"Settings: {json.dumps(report['settings'], sort_keys=True)}", "",
             f"Load average at start: {report['loadavg_at_start']}", ""]
    for note in report["notes"]:
        lines += [f"- {note}"]
    for model in report["models"]:
        lines += ["", f"## {model['name']}", "", model["description"], "",
                  "| variant | sparsity | params (x dense) | file size (x dense) | peak memory (x dense) "
                  "| prefill tok/s (x dense) | decode tok/s (x dense) |",
                  "|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            lines.append(f"| {r['variant']} | {r['sparsity']:.2f} | {r['params']:,} ({r['params_ratio']:.2f}) "
                         f"| {r['file_bytes'] / 1e6:.1f} MB ({r['file_bytes_ratio']:.2f}) "
                         f"| {r['peak_mem_bytes'] / 1e6:.1f} MB ({r['peak_mem_bytes_ratio']:.2f}) "
                         f"| {r['prefill_tok_s']:.1f} ({r['prefill_tok_s_ratio']:.2f}) "
                         f"| {r['decode_tok_s']:.1f} ({r['decode_tok_s_ratio']:.2f}) |")
        if model.get("decode_goal") is not None:
            goal = model["decode_goal"]
            lines += ["", f"Decode speed-up at {goal['sparsity']:.2f}: {goal['speedup']:.2f}x "
                          f"(goal {DECODE_GOAL['speedup']}x: {'met' if goal['met'] else 'not met'})"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    import torch

    from resp.config import load_params
    from resp.masks import Mask, check_mask_fits
    from resp.models import load_model, model_identity
    from resp.structures import structures_for

    torch.set_num_threads(args.threads)
    if args.dry_run:
        args.prompt_tokens, args.new_tokens, args.reps = min(args.prompt_tokens, 8), min(args.new_tokens, 4), 1
    channel_multiple = load_params(ROOT / "params.yaml").export.channel_multiple
    report = {"settings": {**{k: v for k, v in vars(args).items() if k in (
                  "sparsities", "prompt_tokens", "new_tokens", "reps", "threads", "seed", "dry_run")},
                  "masks": [str(m) for m in args.mask], "torch": torch.__version__, "python": platform.python_version()},
              "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "notes": [], "models": []}
    if report["loadavg_at_start"][0] > 0.5:
        report["notes"].append(f"CPUs were busy at start (1-minute load average {report['loadavg_at_start'][0]}): "
                               "timings are distorted; rerun on an idle machine")
    baseline_rss = run_worker(args, None)["peak_rss_bytes"]

    candidates = []
    if EMBEDDED.is_dir() and not args.dry_run:
        model, _ = load_model(str(EMBEDDED), None, "float32", "cpu")
        candidates.append(("embedded", model, f"the embedded model at {EMBEDDED.relative_to(ROOT)}", args.mask))
    else:
        note = f"{EMBEDDED.relative_to(ROOT)} not measured: " + ("dry run" if args.dry_run else "it does not exist yet")
        report["notes"].append(note)
        print(note, file=sys.stderr)
    model, shape = random_qwen3(args)
    label = "tiny Qwen3 shape (dry run)" if args.dry_run else "Qwen3-0.6B shape"
    candidates.append(("qwen3-0.6b-shape", model,
                       f"{label}, random init, fp32: {json.dumps(shape, sort_keys=True)}", []))

    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for name, model, description, mask_files in candidates:
            s = structures_for(model, "query_head", None)
            if mask_files:
                masks = {}
                for path in mask_files:
                    mask, meta = Mask.load(path)
                    check_mask_fits(mask, s, meta, model_identity(str(EMBEDDED)).key)
                    masks[mask.sparsity(s)] = (mask, s)
            else:
                masks = {t: (m, s) for t, m in magnitude_masks(model, s, args.sparsities).items()}
            print(f"{name}: {model.num_parameters():,} parameters, {len(masks)} masks", file=sys.stderr, flush=True)
            rows = measure_model(name, model, masks, args, channel_multiple, baseline_rss, Path(tmp))
            entry = {"name": name, "description": description, "rows": rows, "decode_goal": None}
            at_goal = [r for r in rows if r["variant"] == "compact" and abs(r["sparsity"] - DECODE_GOAL["sparsity"]) < 0.02]
            if at_goal and not args.dry_run:  # tiny shapes say nothing about the goal
                speedup = at_goal[0]["decode_tok_s_ratio"]
                entry["decode_goal"] = {"sparsity": at_goal[0]["sparsity"], "speedup": speedup,
                                        "met": speedup >= DECODE_GOAL["speedup"]}
            report["models"].append(entry)
            del model

    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(report, indent=2, sort_keys=True)), ("md", markdown(report))):
        path = args.out / f"export.{suffix}"
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(text)
        os.replace(tmp_path, path)
    print(markdown(report))
    return report


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker is not None or arguments.baseline:
        print(json.dumps(worker(arguments)))
    else:
        main(arguments)
