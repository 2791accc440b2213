"""Calibration trace sets (method steps 1-2).

A `TraceSet` is a list of (prompt ids, completion ids) with a manifest saying what produced it.
RESP traces are the model's own sampled completions (thinking on); GISP traces are the gold
human-written solutions after the same prompt; generic traces are plain text with no prompt
(full-sequence loss). All three feed the same scorer through `decode_only_batches`, whose
labels are -100 on every prompt, template and padding token.

Files: `<name>.jsonl` (one trace per line) and `<name>.jsonl.json` (manifest with the content
digest of the jsonl bytes), both written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from resp.artifacts import bytes_digest, manifest_path, read_manifest, text_digest, write_with_manifest

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


class TraceError(ValueError):
    pass


@dataclass
class Trace:
    prompt_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    truncated: bool
    answer: str | None = None      # final answer, strict extractor (None: none stated / not a task trace)
    correct: bool | None = None    # strict answer against the gold answer (None: unknown)


@dataclass
class TraceSet:
    traces: list[Trace]
    manifest: dict = field(default_factory=dict)

    def stats(self) -> dict:
        """Size, mean completion tokens, truncation rate, and answer_accuracy: the share of judged
        traces whose `correct` is True. Self-generated traces are judged with the *strict*
        extractor (`resp.tasks`): an answer counts only when stated after `</think>`, so a trace
        cut inside its thinking is wrong, never right by a stray trailing number."""
        n = len(self.traces)
        judged = [t.correct for t in self.traces if t.correct is not None]
        return {
            "n": n,
            "mean_completion_tokens": sum(len(t.completion_ids) for t in self.traces) / max(n, 1),
            "truncation_rate": sum(t.truncated for t in self.traces) / max(n, 1),
            "answer_accuracy": (sum(judged) / len(judged)) if judged else None,
        }

    def prompt_ids_digest(self) -> str:
        return text_digest("\n".join(t.prompt_id for t in self.traces))

    def save(self, path: str | Path) -> str:
        """Write jsonl + manifest, each atomically; returns the content digest."""
        body = "".join(json.dumps(asdict(t), sort_keys=True) + "\n" for t in self.traces).encode()
        digest = bytes_digest(body)
        self.manifest = {**self.manifest, **self.stats(), "digest": digest,
                         "prompt_ids_digest": self.prompt_ids_digest()}
        write_with_manifest(path, lambda tmp: tmp.write_bytes(body), self.manifest)
        return digest

    @classmethod
    def load(cls, path: str | Path) -> "TraceSet":
        path = Path(path)
        meta = manifest_path(path)
        if not path.is_file() or not meta.is_file():
            raise TraceError(f"trace set {path} (or its manifest {meta.name}) not found: generate it with `resp traces`")
        body = path.read_bytes()
        manifest = read_manifest(path)
        if bytes_digest(body) != manifest.get("digest"):
            raise TraceError(f"trace set {path} does not match the digest in its manifest: it was edited after it was written; regenerate it")
        traces = []
        for lineno, line in enumerate(body.decode().splitlines(), 1):
            try:
                traces.append(Trace(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise TraceError(f"{path}:{lineno}: malformed trace ({e}); regenerate the trace set") from None
        return cls(traces, manifest)


def check_usable(traces: TraceSet, what: str, allow_truncated: bool = False) -> None:
    """Refuse trace sets that cannot calibrate anything.

    All-truncated traces of the dense model mean max_new_tokens is too low for the task (an
    error, before any pruning). A pruned model that never finishes its thinking is the damage
    the paper describes, and its cut-off traces are still its own decode-time text (method
    step 1 keeps truncated traces): with `allow_truncated` that is a warning."""
    if not traces.traces:
        raise TraceError(f"{what}: the trace set is empty; generate traces for at least one prompt")
    if all(not t.completion_ids for t in traces.traces):
        raise TraceError(f"{what}: every trace has an empty completion; check generation.max_new_tokens")
    if all(t.truncated for t in traces.traces):
        if not allow_truncated:
            raise TraceError(f"{what}: all {len(traces.traces)} traces are truncated; raise generation.max_new_tokens")
        log.warning("%s: all %d traces are truncated (the pruned model does not finish within "
                    "generation.max_new_tokens); calibrating on them as they are", what, len(traces.traces))


def self_generated_traces(model, tokenizer, items, fmt: str, spec, batch_size: int, seed: int,
                          manifest: dict, desc: str, backend: str = "hf", model_dir: str | None = None,
                          gpu_memory_utilization: float | None = None) -> TraceSet:
    """Sample one completion per item from `model` through the chat template, thinking on.

    With backend "vllm", vLLM generates from `model_dir` (the model, or a masked export of it)."""
    from resp.generation import generate_with_backend
    from resp.tasks import extract_answer, is_correct, render_prompt

    prompts = [render_prompt(tokenizer, item.message, enable_thinking=True) for item in items]
    completions = generate_with_backend(backend, model, tokenizer, prompts, spec, batch_size, seed, desc,
                                        model_dir, gpu_memory_utilization)
    traces = [
        Trace(item.id, c.prompt_ids, c.completion_ids, c.text, c.truncated,
              extract_answer(fmt, c.text, item.options, extractor="strict"),
              is_correct(fmt, c.text, item.gold, item.options, extractor="strict"))
        for item, c in zip(items, completions)
    ]
    sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "top_k": spec.top_k,
                "max_new_tokens": spec.max_new_tokens, "seed": seed, "backend": backend}
    return TraceSet(traces, {**manifest, "kind": "self_generated", "sampling": sampling})


def gold_traces(tokenizer, items, manifest: dict) -> TraceSet:
    """GISP: the human-written solution as the completion of the same chat prompt."""
    from resp.tasks import render_prompt

    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    traces = []
    for item in items:
        prompt = tokenizer(render_prompt(tokenizer, item.message, enable_thinking=True), add_special_tokens=False)["input_ids"]
        completion = tokenizer(item.rationale, add_special_tokens=False)["input_ids"] + end
        traces.append(Trace(item.id, prompt, completion, item.rationale, False, item.gold, True))
    return TraceSet(traces, {**manifest, "kind": "gold"})


def text_traces(tokenizer, items, manifest: dict) -> TraceSet:
    """Generic-text calibration: no prompt, loss on every token."""
    traces = [Trace(item.id, [], tokenizer(item.message, add_special_tokens=False)["input_ids"], item.message, False)
              for item in items]
    return TraceSet(traces, {**manifest, "kind": "text"})


def filter_traces(traces: TraceSet, rule: str, dense_answers: dict[str, str | None] | None = None) -> TraceSet:
    """Reflection option: keep traces whose answer is correct (or agrees with the dense model's).

    Correctness and answers are the strict extractor's (set by `self_generated_traces`): a trace
    without a stated answer is neither correct nor in agreement."""
    if rule == "none":
        return traces
    kept = []
    for t in traces.traces:
        agree = dense_answers is not None and t.answer is not None and dense_answers.get(t.prompt_id) == t.answer
        if t.correct or (rule == "correct_or_agree" and agree):
            kept.append(t)
    if not kept:
        raise TraceError(f"trace filter {rule!r} removed all {len(traces.traces)} traces; declare the method with "
                         "trace_filter: none")
    return TraceSet(kept, {**traces.manifest, "filter": rule, "filtered_from": len(traces.traces)})


def select_challenging(candidates: TraceSet, samples: int, keep: int, length_quantiles: tuple[float, float]) -> TraceSet:
    """Selective self-generated calibration (Xiang et al. 2025: challenging, moderately long traces).

    `candidates` holds `samples` consecutive traces per prompt (as generated from a repeated
    prompt list). A prompt's difficulty is 1 - (share of its samples giving the most common
    answer; no stated answer counts as an answer of its own): the model is unsure of it. Its
    trace is the first sample whose completion length lies within `length_quantiles` of all
    candidate lengths (neither the shortest nor the longest). Prompts with such a trace come
    first, the most difficult first (ties: candidate order); the first `keep` are returned."""
    from collections import Counter

    traces = candidates.traces
    if len(traces) % samples:
        raise TraceError(f"{len(traces)} candidate traces are not {samples} samples per prompt")
    lengths = sorted(len(t.completion_ids) for t in traces)
    lo = lengths[int(length_quantiles[0] * (len(lengths) - 1))]
    hi = lengths[int(length_quantiles[1] * (len(lengths) - 1))]
    ranked = []
    for index in range(0, len(traces), samples):
        group = traces[index:index + samples]
        if len({t.prompt_id for t in group}) != 1:
            raise TraceError(f"candidate traces {index}..{index + samples - 1} mix prompts: expected {samples} samples per prompt")
        counts = Counter(t.answer for t in group)
        difficulty = 1 - max(counts.values()) / samples
        in_range = [t for t in group if lo <= len(t.completion_ids) <= hi]
        ranked.append((not in_range, -difficulty, index, (in_range or group)[0], difficulty))
    ranked.sort(key=lambda r: r[:3])
    chosen = ranked[:keep]
    manifest = {**candidates.manifest, "selection": {
        "rule": "challenging_moderate_length", "candidates": len(traces) // samples, "samples": samples,
        "length_range": [lo, hi], "difficulty": [round(r[4], 6) for r in chosen]}}
    return TraceSet([r[3] for r in chosen], manifest)


def decode_only_batches(traces: list[Trace], batch_size: int, pad_id: int):
    """Yield right-padded batches: input = prompt + completion; labels -100 outside the completion.

    Traces are sorted by length (bucketing) so padding is small; each batch carries
    `n_completion` (completion tokens per sample) for per-sample mean losses.
    """
    order = sorted(range(len(traces)), key=lambda i: len(traces[i].prompt_ids) + len(traces[i].completion_ids))
    for start in range(0, len(order), batch_size):
        chunk = [traces[i] for i in order[start:start + batch_size] if traces[i].completion_ids]
        if not chunk:
            continue
        width = max(len(t.prompt_ids) + len(t.completion_ids) for t in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, t in enumerate(chunk):
            p, c = len(t.prompt_ids), len(t.completion_ids)
            input_ids[row, :p + c] = torch.tensor(t.prompt_ids + t.completion_ids)
            labels[row, p:p + c] = torch.tensor(t.completion_ids)
            attention_mask[row, :p + c] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
