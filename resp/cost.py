"""What a pruning run spends, counted as it runs and predicted before it starts.

Counted: every scoring step writes what it processed into its scores manifest (`spent`), every
regeneration is a trace file; `run_cost` adds them up by step kind for the run summary:

- score: passes, traces, tokens (prompt + completion: each goes through forward and backward),
  completion_tokens (the decode-only labels), backward_passes, flops;
- regenerate: passes, prompts, prompt_tokens, tokens_generated, flops.

These counts are deterministic (same params, same numbers). Wall seconds are not: the recipe
writes them next to the run directory (`<run>.wall.json`), never into it.

FLOPs are the usual dense-matmul estimate with P = the parameters a token passes through as
matrix products (every parameter but a separate input-embedding table, which is a lookup):
forward 2P per token, backward 2P for the activation gradients plus 2 x the parameters that
get a gradient (only the scored projections with grads_only_scored), plus one more forward
under gradient checkpointing; generation 2P per prompt and generated token (KV cache). Attention's
sequence-quadratic term and padding are left out, so these are lower bounds for long traces.

Predicted: `predict_run` walks the schedule (`resp.schedule.schedule_points`, the milestones,
prune.score_*) for `prompts` traces of `prompt_tokens` + `completion_tokens`, counts scoring
tokens and generated tokens (the dense calibration traces plus one set per regeneration), and
divides by measured rates (`Rates`: scoring tokens/s forward+backward, generated tokens/s) for
that device and model shape. `resp cost` prints it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")


class CostError(ValueError):
    pass


# ---------------------------------------------------------------- counted

def matmul_params(model) -> int:
    """P: parameters a token passes through as matrix products (module docstring)."""
    total = sum(p.numel() for p in model.parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    return total if tied else total - model.get_input_embeddings().weight.numel()


def score_flops_per_token(params: int, grad_params: int, grad_checkpointing: bool) -> int:
    return 2 * params * (2 if grad_checkpointing else 1) + 2 * params + 2 * grad_params


def scoring_spent(traces, batch_size: int, per_sample_abs: bool, grad_checkpointing: bool, grads_only_scored: bool,
                  model, s) -> dict:
    """What one Taylor scoring pass over `traces` processes (as `resp.importance.taylor_scores` batches them)."""
    from resp.importance import scored_weights

    with_labels = [t for t in traces if t.completion_ids]
    tokens = sum(len(t.prompt_ids) + len(t.completion_ids) for t in with_labels)
    per_step = 1 if per_sample_abs else batch_size
    p = matmul_params(model)
    grad = sum(w.numel() for w in scored_weights(model, s).values()) if grads_only_scored else p
    return {"traces": len(with_labels), "tokens": tokens,
            "completion_tokens": sum(len(t.completion_ids) for t in with_labels),
            "backward_passes": math.ceil(len(with_labels) / per_step),
            "flops": tokens * score_flops_per_token(p, grad, grad_checkpointing)}


def generation_spent(trace_file: str | Path, params: int) -> dict:
    """What generating the trace set in `trace_file` processed."""
    from resp.traces import TraceSet

    traces = TraceSet.load(trace_file).traces
    prompt = sum(len(t.prompt_ids) for t in traces)
    generated = sum(len(t.completion_ids) for t in traces)
    return {"prompts": len(traces), "prompt_tokens": prompt, "tokens_generated": generated,
            "flops": 2 * params * (prompt + generated)}


def run_cost(spent: list[dict], params: int) -> dict:
    """Totals by step kind of the files a run's score and regenerate steps wrote (`PruneState.spent`)."""
    from resp.artifacts import read_manifest

    totals = {"score": {"passes": 0, "traces": 0, "tokens": 0, "completion_tokens": 0, "backward_passes": 0, "flops": 0},
              "regenerate": {"passes": 0, "prompts": 0, "prompt_tokens": 0, "tokens_generated": 0, "flops": 0}}
    for entry in spent:
        counts = read_manifest(entry["path"])["spent"] if entry["kind"] == "score" else generation_spent(entry["path"], params)
        kind = totals[entry["kind"]]
        kind["passes"] += 1
        for key, value in counts.items():
            kind[key] += value
    return totals


# ---------------------------------------------------------------- rates

@dataclass(frozen=True)
class Rates:
    """Measured throughput of one device on one model shape."""
    device: str
    model: dict                  # SHAPE_KEYS and "parameters"
    dtype: str
    score_tokens_per_s: float    # prompt + completion tokens through forward + backward
    generate_tokens_per_s: float # new tokens, at the batch size below
    score_batch_size: int
    generate_batch_size: int
    source: str                  # what measured them

    def save(self, path: str | Path) -> Path:
        from resp.artifacts import write_json

        return write_json(path, asdict(self), newline=True)


def model_shape(config) -> dict:
    return {k: getattr(config, k) for k in SHAPE_KEYS}


def load_rates(path: str | Path) -> Rates:
    path = Path(path)
    if not path.is_file():
        raise CostError(f"rates file {path} not found: write one with benchmarks/gpu_check.py (or "
                        "resp.cost.rates_from_gpu_check), or pass --score-tok-s and --generate-tok-s")
    try:
        data = json.loads(path.read_text())
        return Rates(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise CostError(f"{path} is not a rates file ({' '.join(str(e).split())}): write one with "
                        "benchmarks/gpu_check.py or pass --score-tok-s and --generate-tok-s") from None


def rates_from_gpu_check(check: dict) -> Rates:
    """Rates from benchmarks/gpu_check.py's result: the fastest mean-mode scoring setting and the generation."""
    mean_mode = [r for r in check["scoring"] if not r["per_sample_abs"]]
    if not mean_mode or "generation" not in check:
        raise CostError("the GPU check has no mean-mode scoring or no generation measurement: rerun it in full")
    best = max(mean_mode, key=lambda r: r["all_tok_s"])
    shape = {k: check["model_shape"][k] for k in SHAPE_KEYS}
    return Rates(device=check["device"], model={**shape, "parameters": check["parameters"]},
                 dtype=check["dtype"].removeprefix("torch."), score_tokens_per_s=best["all_tok_s"],
                 generate_tokens_per_s=check["generation"]["new_tok_s"], score_batch_size=best["batch_size"],
                 generate_batch_size=check["generation"]["batch"],
                 source=f"benchmarks/gpu_check.py (torch {check['torch']}, transformers {check['transformers']})")


def check_rates(rates: Rates, config, parameters: int, device: str | None) -> None:
    """Refuse rates measured on another device or another model shape."""
    if device is not None and device != rates.device:
        raise CostError(f"the rates were measured on {rates.device!r}, not on {device!r}: measure rates on that "
                        "device (benchmarks/gpu_check.py) or pass --score-tok-s and --generate-tok-s")
    shape = model_shape(config)
    differ = [k for k in SHAPE_KEYS if rates.model.get(k) != shape[k]]
    if differ:
        ours = ", ".join(f"{k} {shape[k]}" for k in differ)
        theirs = ", ".join(f"{k} {rates.model.get(k)}" for k in differ)
        raise CostError(f"the rates were measured on a {rates.model.get('parameters', 0) / 1e9:.2f}B-parameter model "
                        f"({theirs}), not on this config's {parameters / 1e9:.2f}B ({ours}): measure this model's rates "
                        "(benchmarks/gpu_check.py) or pass --score-tok-s and --generate-tok-s")


# ---------------------------------------------------------------- predicted

@dataclass(frozen=True)
class RunPrediction:
    scoring_passes: int
    regenerations: int
    score_tokens: int
    generated_tokens: int
    score_flops: int
    generate_flops: int
    score_seconds: float
    generate_seconds: float

    @property
    def seconds(self) -> float:
        return self.score_seconds + self.generate_seconds

    def table(self) -> str:
        total = self.seconds
        rows = [("scoring", self.scoring_passes, self.score_tokens, self.score_flops, self.score_seconds),
                ("generation", 1 + self.regenerations, self.generated_tokens, self.generate_flops, self.generate_seconds),
                ("total", None, None, self.score_flops + self.generate_flops, total)]
        lines = [f"{'':<11} {'passes':>6} {'tokens':>14} {'FLOPs':>10} {'GPU-hours':>10} {'seconds':>10} {'share':>6}"]
        for name, passes, tokens, flops, seconds in rows:
            lines.append(f"{name:<11} {'' if passes is None else passes:>6} {'' if tokens is None else tokens:>14} "
                         f"{flops:>10.3g} {seconds / 3600:>10.2f} {seconds:>10.1f} {seconds / total if total else 0:>6.1%}")
        return "\n".join(lines)


def schedule_passes(targets: list[float], steps: int, milestones: list[float], score_every: int) -> tuple[int, int]:
    """(scoring passes, regenerations) of the schedule, as `resp.schedule.iterative_prune` runs it
    when each step lands on its point (measured sparsity overshoots a little: milestones may cross one step early)."""
    from resp.schedule import schedule_points

    points = schedule_points(targets, steps)
    passes = regenerations = 0
    sparsity, done, last = 0.0, set(), None
    for k, point in enumerate(points):
        crossed = [m for m in milestones if m not in done and sparsity >= m - 1e-9]
        done.update(crossed)
        regenerations += bool(crossed)
        if last is None or crossed or k - last >= score_every:
            passes, last = passes + 1, k
        sparsity = point
    return passes, regenerations


def predict_run(params, method: str, prompts: int, prompt_tokens: float, completion_tokens: float,
                rates: Rates, parameters: tuple[int, int]) -> RunPrediction:
    """The run of `method` under `params` on `prompts` traces of the given mean lengths (module docstring).
    `parameters`: (P, parameters with a gradient) of the model (`matmul_params`-like counts)."""
    declared, p, imp = params.methods[method], params.prune, params.importance
    if declared.scorer != "taylor":
        raise CostError(f"method {method!r} is a one-shot {declared.scorer} baseline: the cost model covers the "
                        "iterative taylor schedule (resp and its ablations)")
    if declared.regenerate == "drift" or declared.verify_select:
        raise CostError(f"method {method!r} regenerates on drift or branches at milestones: how often is only known "
                        "after the run; predict a regenerate: milestones method (e.g. resp) instead")
    milestones = p.milestones if declared.regenerate == "milestones" else []
    passes, regenerations = schedule_passes(p.targets, p.steps, milestones, p.score_every)
    scored_completion = completion_tokens if p.score_tokens is None else min(completion_tokens, p.score_tokens)
    per_pass = prompts / p.score_subsets * (prompt_tokens + scored_completion)  # rotating subsets: prompts/m on average
    score_tokens = round(passes * per_pass)
    generated = round((1 + regenerations) * prompts * completion_tokens)
    prefill = round((1 + regenerations) * prompts * prompt_tokens)
    P, grad = parameters
    return RunPrediction(
        scoring_passes=passes, regenerations=regenerations, score_tokens=score_tokens, generated_tokens=generated,
        score_flops=score_tokens * score_flops_per_token(P, grad if imp.grads_only_scored else P, imp.grad_checkpointing),
        generate_flops=2 * P * (generated + prefill),
        score_seconds=score_tokens / rates.score_tokens_per_s,
        generate_seconds=generated / rates.generate_tokens_per_s)

