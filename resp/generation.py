"""Batched completion sampling with an explicit decode loop over a Hugging Face causal LM (method
steps 1 and 7, and evaluation).

Prompts are tokenized once, sorted by length (longest first, so a batch that does not fit in
memory fails at once) and left-padded into batches with attention masks. A batch is prefilled in
one forward pass, then decoded one token per step through the model's KV cache, with the
position ids transformers' `generate` gives left-padded rows. A row that emits an end-of-sequence
token or reaches `max_new_tokens` leaves the batch (its input, mask, positions and cache rows go),
so a finished row costs nothing while the batch's longest completion runs on. Results come back
in input order.

Greedy (temperature 0) takes the argmax. Sampling processes the logits with temperature, then
top-k, then top-p, exactly as transformers' logits warpers do (min_tokens_to_keep=1; top_k 0 and
top_p 1.0 are off); no other processor of the model's generation_config applies, as on the vLLM
backend. Prompt i draws its tokens from its own generator seeded `seed + i` (the seed the vLLM
backend gives request i), so the random numbers a completion uses depend only on its index and
the seed: never on the batch size, the other prompts of its batch, or what ran earlier in the
process (its logits can still differ by floating-point rounding between batch shapes).

A completion is cut after its first end-of-sequence token: the model's
`generation_config.eos_token_id` (an int or a list; Qwen3 lists both `<|im_end|>` and
`<|endoftext|>`) plus the tokenizer's `eos_token_id`. `completion_ids` include that token, so
they are exactly what the decode-only loss is computed on; `text` is the decoded completion
without it, decoded with special tokens kept, because `<think>`/`</think>` are special tokens
in some tokenizers (the embedded one) and answer extraction needs them.

Backends (`generation.backend`): `hf` is the decode loop above (on CPU about 2x faster than
transformers' `generate`, benchmarks/bench_generation.py); `hf_static` runs transformers' own
`generate` with a static KV cache (sized once per call: the longest prompt + max_new_tokens) and
`hf_compiled` the same with its decoding forward compiled by `torch.compile` (CUDA graphs on a
GPU), the paths meant to bring GPU decoding near the memory-bound rate (benchmarks/gpu_check.py
measures all three). They draw the same tokens as the loop: greedy takes the argmax of the same
float32 logits, and sampling runs as the last logits processor of a greedy `generate` that
returns -inf for every token but the one `next_tokens` draws with the same per-prompt uniforms.
Only the floating-point rounding of the logits can differ (a static cache attends over its
whole, masked, length). Finished rows stay in a static batch (padded) until its longest row ends.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import CompileConfig, LogitsProcessor, LogitsProcessorList

log = logging.getLogger(__name__)


class GenerationError(ValueError):
    pass


# generation.backend values that generate here: the decode loop; transformers' generate with a static cache (compiled)
HF_BACKENDS = ("hf", "hf_static", "hf_compiled")


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float     # 0 = greedy
    top_p: float           # 1.0 = no top-p filtering
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


def processed_scores(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """[rows, vocab] float32 logits -> the scores sampling draws from (softmax of them): temperature,
    then top-k, then top-p, each as transformers' Temperature/TopK/TopPLogitsWarper with
    min_tokens_to_keep=1; a filtered token scores -inf."""
    scores = logits / spec.temperature if spec.temperature != 1.0 else logits
    if spec.top_k:
        kth_best = torch.topk(scores, min(spec.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if spec.top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        # drop the least likely tokens while their total mass stays within 1 - top_p; keep the most likely
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - spec.top_p
        drop_sorted[..., -1] = False
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, spec: SamplingSpec, uniforms: torch.Tensor | None) -> torch.Tensor:
    """One token per row of [rows, vocab] logits: the argmax when greedy; else row r's draw from its
    processed distribution by inverting the cumulative distribution at uniforms[r] in [0, 1)."""
    logits = logits.float()
    if spec.temperature == 0:
        return logits.argmax(dim=-1)
    # float64, so u * total < total and a token of probability 0 is never drawn
    cdf = processed_scores(logits, spec).softmax(dim=-1).double().cumsum(dim=-1)
    return torch.searchsorted(cdf, uniforms.double()[:, None] * cdf[:, -1:], right=True).squeeze(1)


def _cut(generated: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(generated):
        if token in eos:
            return generated[: position + 1], False
    return generated, True


class _BufferedLayer(DynamicLayer):
    """A full-attention cache layer that writes into buffers sized for the whole decode (prompt
    width + max_new_tokens) and returns views of the filled part: DynamicLayer concatenates, which
    copies the layer's whole cache on every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (new row j = old row indices[j]) in place: only the rows whose slot
        changes are copied (gathered first, so sources may overlap destinations)."""
        if not self.is_initialized:  # a layer the model never wrote (as DynamicLayer, nothing to select)
            return
        rows, end = len(indices), self.get_seq_length()
        moved = (indices != torch.arange(rows, device=indices.device)).nonzero().squeeze(1)
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[moved, :, :end] = buffer[indices[moved], :, :end]
        self.key_buffer, self.value_buffer = self.key_buffer[:rows], self.value_buffer[:rows]
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]


def _decode_cache(model, capacity: int) -> DynamicCache:
    """transformers' cache for the model's layer types, full-attention layers buffered."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_BufferedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _rows_to_keep(running: torch.Tensor) -> torch.Tensor:
    """The running rows of a batch as the next batch's row order: a running row among the first
    `running.sum()` keeps its slot and the running rows after them fill the finished rows' slots,
    so the cache moves one row per finished row, whatever the order rows finish in."""
    rows = int(running.sum())
    order = torch.arange(rows, device=running.device)
    order[(~running[:rows]).nonzero().squeeze(1)] = running[rows:].nonzero().squeeze(1) + rows
    return order


def _decode_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, spec: SamplingSpec,
                  uniforms: torch.Tensor | None, eos: torch.Tensor) -> list[list[int]]:
    """Generated ids per row of a left-padded batch, each ending at its first EOS or after
    `spec.max_new_tokens` tokens; row r samples step t with uniforms[r, t] (None: greedy).
    Finished rows leave the batch and the cache."""
    rows, width = input_ids.shape
    device = input_ids.device
    # the mask of every step, written once: prompt (padding 0) then ones for the new tokens
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, spec.max_new_tokens)], dim=1)
    # transformers' positions for left padding: the count of real tokens before each one
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = _decode_cache(model, width + spec.max_new_tokens)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    position = positions[:, -1:] + 1
    active = torch.arange(rows, device=device)     # batch row of each row still decoding
    generated: list[list[int]] = [[] for _ in range(rows)]
    for step in range(spec.max_new_tokens):
        tokens = next_tokens(logits, spec, None if uniforms is None else uniforms[active, step])
        for r, token in zip(active.tolist(), tokens.tolist()):
            generated[r].append(token)
        if step + 1 == spec.max_new_tokens:
            break
        running = ~torch.isin(tokens, eos)
        if not running.all():
            if not running.any():
                break
            keep = _rows_to_keep(running)
            active, tokens, mask, position = active[keep], tokens[keep], mask[keep], position[keep]
            cache.batch_select_indices(keep)
        logits = model(input_ids=tokens[:, None], attention_mask=mask[:, : width + step + 1], position_ids=position,
                       cache=cache, use_cache=True).logits[:, -1]
        position = position + 1
    return generated


class _DrawnToken(LogitsProcessor):
    """The last logits processor of a greedy transformers `generate`: row r's scores at step t become
    0 for the token `next_tokens` draws with uniforms[r, t] and -inf elsewhere, so the argmax is
    exactly the decode loop's draw."""

    def __init__(self, spec: SamplingSpec, uniforms: torch.Tensor, width: int):
        self.spec, self.uniforms, self.width = spec, uniforms, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        tokens = next_tokens(scores, self.spec, self.uniforms[:, step])
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


@contextmanager
def _blank_generation_config(model):
    """transformers fills every field the config given to `generate` leaves unset from
    `model.generation_config` (a checkpoint's repetition_penalty, suppress_tokens, ...): for the
    call, the model has a blank one, so only what `_generate_batch` sets applies, as in the loop."""
    kept = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = kept


def _generate_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, spec: SamplingSpec,
                    uniforms: torch.Tensor | None, eos: list[int], pad: int, cache_length: int,
                    compiled: bool) -> list[list[int]]:
    """`_decode_batch` through transformers' `generate` with a static cache of `cache_length`
    positions (module docstring); rows keep going (padded) after their EOS, so each row's ids
    are cut at its first EOS later, as the loop's are."""
    config = GenerationConfig(
        max_new_tokens=spec.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos or None, pad_token_id=pad,
        cache_implementation="static", max_cache_len=cache_length, disable_compile=not compiled,
        compile_config=CompileConfig() if compiled else None)
    if compiled and input_ids.device.type == "cpu":
        config.compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    processors = LogitsProcessorList([] if uniforms is None else [_DrawnToken(spec, uniforms, input_ids.shape[1])])
    with _blank_generation_config(model):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                logits_processor=processors)
    return output[:, input_ids.shape[1]:].tolist()


def generate_ids(model, prompt_ids: list[list[int]], spec: SamplingSpec, batch_size: int, seed: int, eos: list[int],
                 pad: int, desc: str, backend: str = "hf") -> list[list[int]]:
    """Generated ids per prompt (token ids), in input order, by `backend` (one of HF_BACKENDS):
    each ends at its first id in `eos` (if any) or after spec.max_new_tokens, except that
    hf_static/hf_compiled rows continue with `pad` after their EOS (cut them with `_cut`)."""
    if batch_size <= 0:
        raise GenerationError(f"batch_size {batch_size} must be positive")
    if backend not in HF_BACKENDS:
        raise GenerationError(f"generation backend {backend!r} is not one of {list(HF_BACKENDS)}")
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    # one static cache size for the whole call: the longest prompt (the first batch) + the new tokens
    cache_length = (len(prompt_ids[order[0]]) if order else 0) + spec.max_new_tokens
    results: list[list[int] | None] = [None] * len(prompt_ids)
    device = model.device
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch"):
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            # prompt i's own stream: its completion does not depend on the batch it lands in
            uniforms = None if spec.temperature == 0 else torch.stack([
                torch.rand(spec.max_new_tokens, generator=torch.Generator(device=device).manual_seed(seed + i),
                           device=device) for i in batch])
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if backend == "hf":
                generated = _decode_batch(model, input_ids, attention_mask, spec, uniforms, eos_tensor)
            else:
                generated = _generate_batch(model, input_ids, attention_mask, spec, uniforms, eos, pad, cache_length,
                                            compiled=backend == "hf_compiled")
            for row, i in enumerate(batch):
                results[i] = generated[row]
    return results


def generate(model, tokenizer, prompts: list[str], spec: SamplingSpec, batch_size: int, seed: int,
             desc: str, backend: str = "hf") -> list[Completion]:
    """One completion per prompt (already chat-templated), in input order, by `backend` (HF_BACKENDS)."""
    if tokenizer.pad_token_id is None:
        raise GenerationError("the tokenizer has no pad token; load models with resp.models.load_model, which sets one")
    eos = eos_token_ids(model, tokenizer)
    eos_set = set(eos)
    # The chat template already wrote every special token the prompt needs.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    generated = generate_ids(model, prompt_ids, spec, batch_size, seed, eos, tokenizer.pad_token_id, desc, backend)
    results = []
    for ids, tokens in zip(prompt_ids, generated, strict=True):
        completion_ids, truncated = _cut(tokens, eos_set)
        body = completion_ids if truncated else completion_ids[:-1]
        results.append(Completion(list(ids), completion_ids, tokenizer.decode(body, skip_special_tokens=False),
                                  truncated))
    return results


BACKENDS = (*HF_BACKENDS, "vllm")
# The python of a separate vLLM environment (README, "GPU users"): vLLM pins a torch and a transformers
# of its own, below resp's range, so it runs there (resp/vllm_worker.py) when this variable is set. A
# path on this machine, not an experiment knob: it changes where tokens are computed, not which.
VLLM_PYTHON = "RESP_VLLM_PYTHON"
VLLM_MISSING = (f"vllm is not installed here: set {VLLM_PYTHON} to the python of a vLLM environment "
                "(README, GPU users), or set {knob}: hf")
WORKER = Path(__file__).with_name("vllm_worker.py")


def require_vllm(backend_knob: str):
    """The vllm module; None when VLLM_PYTHON names a separate vLLM environment's python; else a
    one-line error naming the params knob (`backend_knob`) that asked for vLLM."""
    python = os.environ.get(VLLM_PYTHON)
    if python:
        if not (Path(python).is_file() and os.access(python, os.X_OK)):
            raise GenerationError(f"{VLLM_PYTHON}={python} is not an executable file: point it at the python of the "
                                  "vLLM environment (e.g. /opt/vllm-env/bin/python)")
        return None
    try:
        import vllm
    except ImportError:
        raise GenerationError(VLLM_MISSING.format(knob=backend_knob)) from None
    return vllm


class VllmWorker:
    """`vllm.LLM` in the vLLM environment of `python`: resp/vllm_worker.py there, token ids over a pipe."""

    def __init__(self, python: str, llm_kwargs: dict):
        self.process = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask(llm_kwargs)

    def _ask(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker ended: its last line (or none) says why
        line = self.process.stdout.readline()
        reply = json.loads(line) if line else {"error": f"exited with status {self.process.wait()} (its stderr above)"}
        if "error" in reply:
            self.close()
            raise GenerationError(f"the vLLM worker ({VLLM_PYTHON}) failed: {reply['error']}")
        return reply

    def generate(self, prompt_ids: list[list[int]], sampling: list[dict]) -> list[list[int]]:
        return self._ask({"prompts": prompt_ids, "sampling": sampling})["token_ids"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


class VllmEngine:
    """One vLLM engine over a saved model directory, for any number of `generate` calls.

    Starting an engine takes long on a real model, so evaluation keeps one per evaluated model
    for all its sampling passes. For a pruned model, load a masked export (pruned units zeroed in
    the stock shapes, so vLLM loads it like the base model). `close()` (or leaving the `with`
    block) gives the GPU memory back to the model being pruned. With VLLM_PYTHON set, the engine
    runs in that environment (`VllmWorker`); otherwise vllm is imported here.
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
        llm_kwargs = dict(model=self.model_dir, tokenizer=self.model_dir, revision=revision, tokenizer_revision=revision,
                          gpu_memory_utilization=gpu_memory_utilization)
        self.llm = self.vllm.LLM(**llm_kwargs) if self.vllm else VllmWorker(os.environ[VLLM_PYTHON], llm_kwargs)

    def generate(self, prompts: list[str], spec: SamplingSpec, seed: int) -> list[Completion]:
        """One completion per prompt (already chat-templated). Prompt i is sampled with seed + i, so
        a completion does not depend on how vLLM batches requests. EOS ids, the cut and the
        decoding are those of `generate`."""
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        sampling = [dict(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k or -1,
                         max_tokens=spec.max_new_tokens, seed=seed + i, stop_token_ids=self.eos,
                         skip_special_tokens=False) for i in range(len(prompts))]
        if self.vllm:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                                        [self.vllm.SamplingParams(**kwargs) for kwargs in sampling])
            generated = [list(output.outputs[0].token_ids) for output in outputs]
        else:
            generated = self.llm.generate(prompt_ids, sampling)
        results = []
        for ids, tokens in zip(prompt_ids, generated, strict=True):
            completion_ids, truncated = _cut(tokens, set(self.eos))
            body = completion_ids if truncated else completion_ids[:-1]
            results.append(Completion(list(ids), completion_ids, self.tokenizer.decode(body, skip_special_tokens=False),
                                      truncated))
        log.info("vllm generated %d completions from %s", len(results), self.model_dir)
        return results

    def close(self) -> None:
        if isinstance(self.llm, VllmWorker):
            self.llm.close()
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
    """`generate` (HF_BACKENDS) or `generate_vllm` (vllm, from `model_dir`), per the params knob
    `backend_knob` (generation.backend or evaluation.backend), which the error messages name."""
    if backend in HF_BACKENDS:
        return generate(model, tokenizer, prompts, spec, batch_size=batch_size, seed=seed, desc=desc, backend=backend)
    if backend != "vllm":
        raise GenerationError(f"generation backend {backend!r} is not one of {list(BACKENDS)}")
    if model_dir is None or gpu_memory_utilization is None:
        raise GenerationError(f"{backend_knob} vllm needs a saved model directory (a masked export of the current "
                              "mask) and scale.vllm_gpu_memory_utilization")
    return generate_vllm(model_dir, prompts, spec, seed, gpu_memory_utilization, backend_knob)
