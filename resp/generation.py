"""Batched completion sampling with Hugging Face `generate` (method steps 1 and 7, and evaluation).

Prompts are tokenized once, sorted by length (longest first, so a batch that does not fit in
memory fails at once) and left-padded into batches with attention masks. Each batch is
seeded with `seed + batch_index` right before it runs, so results depend only on the inputs,
the batch size and the seed, never on what ran earlier in the process. Results come back in
input order.

A completion is cut after its first end-of-sequence token: the model's
`generation_config.eos_token_id` (an int or a list; Qwen3 lists both `<|im_end|>` and
`<|endoftext|>`) plus the tokenizer's `eos_token_id`. `completion_ids` include that token, so
they are exactly what the decode-only loss is computed on; `text` is the decoded completion
without it, decoded with special tokens kept, because `<think>`/`</think>` are special tokens
in some tokenizers (the embedded one) and answer extraction needs them.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


class GenerationError(ValueError):
    pass


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float     # 0 = greedy
    top_p: float
    top_k: int             # 0 = no top-k filtering
    max_new_tokens: int


@dataclass
class Completion:
    prompt_ids: list[int]       # the prompt's tokens, unpadded
    completion_ids: list[int]   # generated tokens up to and including the first EOS
    text: str                   # decoded completion without the EOS, special tokens kept
    truncated: bool             # no EOS within max_new_tokens


def eos_token_ids(model, tokenizer) -> list[int]:
    """Sorted end-of-sequence ids: the model's generation config plus the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set([configured] if isinstance(configured, int) else configured or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise GenerationError("neither the model's generation_config nor the tokenizer names an EOS token; "
                              "set generation_config.eos_token_id")
    return sorted(ids)


def _sampling_kwargs(spec: SamplingSpec) -> dict:
    if spec.temperature == 0:
        # transformers' own defaults, which greedy decoding ignores: set explicitly so a model's
        # generation_config (Qwen3 ships temperature 0.6 / top_k 20) does not trigger
        # "flags are not valid" warnings on every batch.
        return {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
    return {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": spec.top_k}


def _cut(generated: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(generated):
        if token in eos:
            return generated[: position + 1], False
    return generated, True


def generate(model, tokenizer, prompts: list[str], spec: SamplingSpec, batch_size: int, seed: int,
             desc: str) -> list[Completion]:
    """One completion per prompt (already chat-templated), in input order."""
    if batch_size <= 0:
        raise GenerationError(f"batch_size {batch_size} must be positive")
    if tokenizer.pad_token_id is None:
        raise GenerationError("the tokenizer has no pad token; load models with resp.models.load_model, which sets one")
    eos = eos_token_ids(model, tokenizer)
    eos_set = set(eos)
    pad = tokenizer.pad_token_id
    # The chat template already wrote every special token the prompt needs.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompt_ids[i]), i))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[Completion | None] = [None] * len(prompts)
    device = model.device
    with torch.no_grad():
        for batch_index, batch in enumerate(tqdm(batches, desc=desc, unit="batch")):
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            torch.manual_seed(seed + batch_index)
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=spec.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                **_sampling_kwargs(spec),
            )
            for row, i in enumerate(batch):
                completion_ids, truncated = _cut(output[row, width:].tolist(), eos_set)
                body = completion_ids if truncated else completion_ids[:-1]
                results[i] = Completion(list(prompt_ids[i]), completion_ids,
                                        tokenizer.decode(body, skip_special_tokens=False), truncated)
    return results


BACKENDS = ("hf", "vllm")
VLLM_MISSING = "vllm is not installed: pip install 'resp[vllm]' on a CUDA machine, or set {knob}: hf"


def require_vllm(backend_knob: str):
    """The vllm module, or a one-line error naming the params knob (`backend_knob`) that asked for it."""
    try:
        import vllm
    except ImportError:
        raise GenerationError(VLLM_MISSING.format(knob=backend_knob)) from None
    return vllm


class VllmEngine:
    """One vLLM engine over a saved model directory, for any number of `generate` calls.

    Starting an engine takes long on a real model, so evaluation keeps one per evaluated model
    for all its sampling passes. For a pruned model, load a masked export (pruned units zeroed in
    the stock shapes, so vLLM loads it like the base model). `close()` (or leaving the `with`
    block) gives the GPU memory back to the model being pruned.
    """

    def __init__(self, model_dir: str | Path, gpu_memory_utilization: float, backend_knob: str = "generation.backend",
                 revision: str | None = None):
        self.vllm = require_vllm(backend_knob)
        from transformers import AutoTokenizer, GenerationConfig

        self.model_dir = str(model_dir)  # a directory, or a hub id at `revision`
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, revision=revision)
        try:
            generation_config = GenerationConfig.from_pretrained(self.model_dir, revision=revision)
        except OSError:  # no generation_config.json: the tokenizer's EOS only
            generation_config = GenerationConfig()
        self.eos = eos_token_ids(SimpleNamespace(generation_config=generation_config), self.tokenizer)
        # every request carries its own seed (see generate), so the engine's seed is never used
        self.llm = self.vllm.LLM(model=self.model_dir, tokenizer=self.model_dir, revision=revision,
                                 tokenizer_revision=revision, gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts: list[str], spec: SamplingSpec, seed: int) -> list[Completion]:
        """One completion per prompt (already chat-templated). Prompt i is sampled with seed + i, so
        a completion does not depend on how vLLM batches requests. EOS ids, the cut and the
        decoding are those of `generate`."""
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        sampling = [self.vllm.SamplingParams(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k or -1,
                                             max_tokens=spec.max_new_tokens, seed=seed + i, stop_token_ids=self.eos,
                                             skip_special_tokens=False) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling)
        results = []
        for ids, output in zip(prompt_ids, outputs):
            completion_ids, truncated = _cut(list(output.outputs[0].token_ids), set(self.eos))
            body = completion_ids if truncated else completion_ids[:-1]
            results.append(Completion(list(ids), completion_ids, self.tokenizer.decode(body, skip_special_tokens=False),
                                      truncated))
        log.info("vllm generated %d completions from %s", len(results), self.model_dir)
        return results

    def close(self) -> None:
        self.llm = None
        gc.collect()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_vllm(model_dir: str | Path, prompts: list[str], spec: SamplingSpec, seed: int,
                  gpu_memory_utilization: float, backend_knob: str = "generation.backend") -> list[Completion]:
    """`VllmEngine.generate` with an engine started for this call only."""
    with VllmEngine(model_dir, gpu_memory_utilization, backend_knob) as engine:
        return engine.generate(prompts, spec, seed)


def generate_with_backend(backend: str, model, tokenizer, prompts: list[str], spec: SamplingSpec, batch_size: int,
                          seed: int, desc: str, model_dir: str | Path | None = None,
                          gpu_memory_utilization: float | None = None,
                          backend_knob: str = "generation.backend") -> list[Completion]:
    """`generate` (hf) or `generate_vllm` (vllm, from `model_dir`), per the params knob `backend_knob`
    (generation.backend or evaluation.backend), which the error messages name."""
    if backend == "hf":
        return generate(model, tokenizer, prompts, spec, batch_size=batch_size, seed=seed, desc=desc)
    if backend != "vllm":
        raise GenerationError(f"generation backend {backend!r} is not one of {list(BACKENDS)}")
    if model_dir is None or gpu_memory_utilization is None:
        raise GenerationError(f"{backend_knob} vllm needs a saved model directory (a masked export of the current "
                              "mask) and scale.vllm_gpu_memory_utilization")
    return generate_vllm(model_dir, prompts, spec, seed, gpu_memory_utilization, backend_knob)
