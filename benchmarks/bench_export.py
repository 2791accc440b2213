"""Dense vs compact export on CPU: size, memory and speed as ratios to dense, measured in one run.

For each model (the embedded model at data/models/tiny if it exists, and randomly initialised
models of real shapes: Qwen3-0.6B and TinyLlama-1.1B) and each parameter sparsity, a mask is made with
`resp.masks.prune_step` on weight-magnitude scores (or read with --mask, for the embedded model),
exported with `resp.checkpoints.export_model(..., "compact", ...)`, and compared with the dense model
saved the same way. All variants are read back from disk with `from_pretrained`:

- params: parameters stored; file size: bytes of its *.safetensors files;
- peak memory: in a fresh process per variant, peak resident set size (VmHWM) after loading the
  model, one prefill and a short generation, minus the peak of a process that only imports torch
  and transformers;
- prefill tokens/s: one forward over a fixed random prompt (batch 1, cache on, last logits only);
- decode tokens/s: greedy `generate` of exactly N new tokens (min_new_tokens = N); a logits
  processor stamps the clock at every step, so decode time is the span from the first step to the
  last: (N - 1) tokens, with prefill excluded and generate's own per-step work included;
- decode bound: the speed-up a purely memory-bound decoder would get, i.e. the ratio of weights
  read per decoded token (stored parameters, less the input embedding table when it is not tied to
  the output head, since decoding reads one row of it).
Timings run in one process per model that holds every variant and interleaves them (dense, 0.20,
0.40, then the next repetition in rotated order), so a change in machine load hits all variants
alike; each figure is the median over --reps after one warm-up, with torch.set_num_threads(--threads).

Results: benchmarks/results/export.{json,md} (or --out). Nothing here is asserted; the stated
goal (compact at 40% sparsity decodes >= 1.4x faster than dense) is reported as met or not.

    python benchmarks/bench_export.py                      # full run (minutes; needs idle CPUs)
    python benchmarks/bench_export.py --shapes qwen3-0.6b  # one real shape only
    python benchmarks/bench_export.py --dry-run --out /tmp/bench  # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "models" / "tiny"
DECODE_GOAL = {"sparsity": 0.4, "speedup": 1.4}

# Real shapes, randomly initialised in fp32: Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B; its tied
# 151,936 x 1,024 embedding is a quarter of the weights and is not pruned) and TinyLlama-1.1B
# (config.json of TinyLlama/TinyLlama-1.1B-Chat-v1.0; Llama family, 32,000-token vocabulary).
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6)
TINYLLAMA_11B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5)
SHAPES = {"qwen3-0.6b": ("Qwen3-0.6B", "Qwen3Config", "Qwen3ForCausalLM", QWEN3_06B),
          "tinyllama-1.1b": ("TinyLlama-1.1B", "LlamaConfig", "LlamaForCausalLM", TINYLLAMA_11B)}
DRY_RUN = dict(hidden_size=64, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               intermediate_size=128, vocab_size=512)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--mask", type=Path, action="append", default=[],
                    help="mask file(s) for the embedded model instead of magnitude masks (repeatable)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES),
                    help="real model shapes to build with random weights")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes and lengths, to check the script runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--memory", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timing", type=Path, nargs="+", default=None, help=argparse.SUPPRESS)
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


class StepClock:
    """A logits processor that only stamps the clock: generate() calls it once per decoding step."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def load(directory: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()


def prompt(model, args: argparse.Namespace):
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    return ids, torch.ones_like(ids)


def prefill_seconds(model, ids, attention) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model(ids, attention_mask=attention, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def decode_seconds(model, ids, attention, new_tokens: int) -> float:
    """Seconds from the first decoding step to the last of a greedy generation of exactly `new_tokens`."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    model.generate(ids, attention_mask=attention, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    return clock.stamps[-1] - clock.stamps[0]


def memory_worker(args: argparse.Namespace) -> dict:
    """Peak RSS of a fresh process that loads one variant, prefills and decodes a little."""
    import torch

    torch.set_num_threads(args.threads)
    if args.baseline:
        return {"peak_rss_bytes": peak_rss_bytes()}
    model = load(args.memory)
    ids, attention = prompt(model, args)
    prefill_seconds(model, ids, attention)
    decode_seconds(model, ids, attention, 4)
    return {"peak_rss_bytes": peak_rss_bytes()}


def timing_worker(args: argparse.Namespace) -> dict:
    """Prefill and decode tokens/s of every variant in args.timing, interleaved repetition by repetition."""
    import torch

    torch.set_num_threads(args.threads)
    models = [load(d) for d in args.timing]
    ids, attention = prompt(models[0], args)
    for model in models:  # warm-up
        prefill_seconds(model, ids, attention)
        decode_seconds(model, ids, attention, 4)
    prefill = [[] for _ in models]
    decode = [[] for _ in models]
    for rep in range(args.reps):
        order = [(rep + k) % len(models) for k in range(len(models))]  # rotate who goes first
        for k in order:
            prefill[k].append(prefill_seconds(models[k], ids, attention))
            decode[k].append(decode_seconds(models[k], ids, attention, args.new_tokens))
    return {"prefill_tok_s": [args.prompt_tokens / statistics.median(p) for p in prefill],
            "decode_tok_s": [(args.new_tokens - 1) / statistics.median(d) for d in decode],
            "decode_spread": [(min(d) / statistics.median(d), max(d) / statistics.median(d)) for d in decode]}


def run_worker(args: argparse.Namespace, role: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps), "--threads", str(args.threads), "--seed", str(args.seed), *role]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main: build variants, measure, report

def magnitude_masks(model, s, sparsities: list[float]) -> dict[float, object]:
    """Nested masks from per-parameter weight magnitude (sum of squares / unit size)."""
    from resp.checkpoints.uniform import magnitudes
    from resp.masks import Mask, prune_step

    heads, _, channels = magnitudes(model, s)
    attention_norm, channel_norm = s.normalizer("params")
    mask, masks = Mask.dense(s), {}
    for target in sorted(sparsities):
        mask = prune_step(heads / attention_norm, channels / channel_norm, mask, s, target)
        masks[target] = mask
    return masks


def random_model(key: str, args: argparse.Namespace):
    """A randomly initialised model of shape SHAPES[key] (tiny layers with --dry-run) and its config dict."""
    import torch
    import transformers

    _, config_class, model_class, shape = SHAPES[key]
    shape = {**shape, **(DRY_RUN if args.dry_run else {})}
    torch.manual_seed(args.seed)
    config = getattr(transformers, config_class)(**shape)
    return getattr(transformers, model_class)(config).eval(), shape


def files_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def decode_read_params(directory: Path, stored: int) -> int:
    """Weights a decoding step reads: all stored ones, less an input embedding table not tied to the head."""
    config = json.loads((directory / "config.json").read_text())
    return stored - (0 if config.get("tie_word_embeddings") else config["vocab_size"] * config["hidden_size"])


def export_variants(name: str, model, masks: dict, channel_multiple: int, workdir: Path) -> list[dict]:
    from resp.checkpoints import MANIFEST, export_model

    dense_dir = workdir / f"{name}-dense"
    model.save_pretrained(dense_dir)
    variants = [{"variant": "dense", "sparsity": 0.0, "dir": dense_dir, "params": model.num_parameters()}]
    for target, (mask, s) in sorted(masks.items()):
        out = export_model(model, None, mask, s, "compact", workdir / f"{name}-compact-{target:.2f}", channel_multiple)
        manifest = json.loads((out / MANIFEST).read_text())
        variants.append({"variant": "compact", "sparsity": round(mask.sparsity(s), 4), "dir": out,
                         "params": manifest["params"]["stored"]})
    return variants


def measure_variants(name: str, variants: list[dict], args, baseline_rss: int) -> list[dict]:
    print(f"  timing {name}: {len(variants)} variants interleaved, {args.reps} repetitions ...", file=sys.stderr, flush=True)
    timed = run_worker(args, ["--timing", *[str(v["dir"]) for v in variants]])
    rows = []
    for k, v in enumerate(variants):
        print(f"  peak memory of {name} {v['variant']} @ {v['sparsity']:.2f} ...", file=sys.stderr, flush=True)
        peak = run_worker(args, ["--memory", str(v["dir"])])["peak_rss_bytes"]
        rows.append({**{key: x for key, x in v.items() if key != "dir"}, "file_bytes": files_bytes(v["dir"]),
                     "decode_read_params": decode_read_params(v["dir"], v["params"]),
                     "peak_mem_bytes": peak - baseline_rss, "prefill_tok_s": timed["prefill_tok_s"][k],
                     "decode_tok_s": timed["decode_tok_s"][k], "decode_spread": timed["decode_spread"][k]})
    dense = rows[0]
    for row in rows:
        for key in ("params", "file_bytes", "peak_mem_bytes", "prefill_tok_s", "decode_tok_s"):
            row[f"{key}_ratio"] = row[key] / dense[key]
        row["decode_bound"] = dense["decode_read_params"] / row["decode_read_params"]
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
                  "| prefill tok/s (x dense) | decode tok/s (x dense) | decode bound | decode time min/max (x median) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            lines.append(f"| {r['variant']} | {r['sparsity']:.2f} | {r['params']:,} ({r['params_ratio']:.2f}) "
                         f"| {r['file_bytes'] / 1e6:.1f} MB ({r['file_bytes_ratio']:.2f}) "
                         f"| {r['peak_mem_bytes'] / 1e6:.1f} MB ({r['peak_mem_bytes_ratio']:.2f}) "
                         f"| {r['prefill_tok_s']:.1f} ({r['prefill_tok_s_ratio']:.2f}) "
                         f"| {r['decode_tok_s']:.1f} ({r['decode_tok_s_ratio']:.2f}) | {r['decode_bound']:.2f}x "
                         f"| {r['decode_spread'][0]:.2f} / {r['decode_spread'][1]:.2f} |")
        if model.get("decode_goal") is not None:
            goal = model["decode_goal"]
            lines += ["", f"Decode speed-up at {goal['sparsity']:.2f}: {goal['speedup']:.2f}x, memory-bound limit "
                          f"{goal['bound']:.2f}x (goal {DECODE_GOAL['speedup']}x: {'met' if goal['met'] else 'not met'})"]
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
    baseline_rss = run_worker(args, ["--baseline"])["peak_rss_bytes"]

    # (name, description, build) with build() -> (model, mask files); models are built one at a
    # time and dropped before their variants are timed, so only the workers hold weights then
    candidates = []
    if EMBEDDED.is_dir() and not args.dry_run:
        candidates.append(("embedded", f"the embedded model at {EMBEDDED.relative_to(ROOT)}",
                           lambda: (load_model(str(EMBEDDED), None, "float32", "cpu")[0], args.mask)))
    else:
        note = f"{EMBEDDED.relative_to(ROOT)} not measured: " + ("dry run" if args.dry_run else "it does not exist yet")
        report["notes"].append(note)
        print(note, file=sys.stderr)
    for key in args.shapes:
        label, _, _, shape = SHAPES[key]
        shape = {**shape, **(DRY_RUN if args.dry_run else {})}
        label = f"tiny {label} layout (dry run)" if args.dry_run else f"{label} shape"
        candidates.append((f"{key}-shape", f"{label}, random init, fp32: {json.dumps(shape, sort_keys=True)}",
                           lambda key=key: (random_model(key, args)[0], [])))

    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for name, description, build in candidates:
            model, mask_files = build()
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
            variants = export_variants(name, model, masks, channel_multiple, Path(tmp))
            del model, masks, s
            rows = measure_variants(name, variants, args, baseline_rss)
            entry = {"name": name, "description": description, "rows": rows, "decode_goal": None}
            at_goal = [r for r in rows if r["variant"] == "compact" and abs(r["sparsity"] - DECODE_GOAL["sparsity"]) < 0.02]
            if at_goal and not args.dry_run:  # tiny shapes say nothing about the goal
                speedup = at_goal[0]["decode_tok_s_ratio"]
                entry["decode_goal"] = {"sparsity": at_goal[0]["sparsity"], "speedup": speedup,
                                        "bound": at_goal[0]["decode_bound"], "met": speedup >= DECODE_GOAL["speedup"]}
            report["models"].append(entry)
            for v in variants:  # free the disk before the next model
                shutil.rmtree(v["dir"])

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
    if arguments.timing:
        print(json.dumps(timing_worker(arguments)))
    elif arguments.memory is not None or arguments.baseline:
        print(json.dumps(memory_worker(arguments)))
    else:
        main(arguments)
