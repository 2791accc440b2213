"""Train the embedded reasoning model: a stock `Qwen3ForCausalLM` taught the world's own style.

Data: fresh seeded `arith`/`choice` problems (never one whose content is in a test split)
rendered through the chat template with thinking on, followed by one reasoning path drawn
from the own-style distribution (`problems.Style`: phrasings, checks, corrected slips) and
`<|im_end|>`; loss on the completion only, as decode-time behaviour is what matters.
A fraction of `prose` lines is trained with full-sequence loss so generic-text calibration
has something to measure.

The learning rate warms up, then decays as 1/sqrt(step): it does not depend on the total
number of steps, so the checkpoint kept at step k of a long run equals a run with `steps: k`.
Checkpoints with their greedy validation accuracy are kept next to the model
(`<dir>.checkpoints/`), which is how `steps` was chosen to put dense accuracy in the
world's target band. Deterministic from the seed on a given machine and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from resp.artifacts import atomic_dir
from resp.prompts import gsm8k_message, mathqa_message
from resp.world import problems
from resp.world.tokenizer import IM_END, PAD, build_tokenizer

log = logging.getLogger(__name__)


def style_of(cfg) -> problems.Style:
    return problems.Style(**cfg.style.model_dump())


def task_problems(world_seed: int, n_per_task: int, n_test: int, n_valid: int):
    """Per task: (train problems, validation problems, option rng) disjoint from the test split."""
    out = {}
    for task_seed, task in ((world_seed, "arith"), (world_seed + 1, "choice")):
        train, _ = problems.make_splits(task_seed, n_per_task + n_valid, n_test)
        out[task] = (train[:n_per_task], train[n_per_task:], random.Random(task_seed + 7))
    return out


def task_message(task: str, problem: problems.Problem, opt_rng: random.Random) -> tuple[str, str, str | None]:
    """(user message, gold answer as evaluation reads it, options or None)."""
    if task == "arith":
        return gsm8k_message(problems.gsm8k_record(problem)["question"]), str(problem.answer), None
    record = problems.mathqa_record(problem, opt_rng)
    return mathqa_message(record["Problem"], record["options"]), record["correct"], record["options"]


def training_texts(seed: int, n_examples: int, n_test: int, n_valid: int, prose_fraction: float, style: problems.Style):
    """Return (pairs, prose, validation): pairs are (task, prompt, completion) for both tasks,
    each completion one path drawn from `style`; choice completions state the value (`The
    answer is 45.`), which the MathQA extractor maps to the option holding it; validation is
    (task, prompt, gold, options) on problems seen neither in training nor in test."""
    rng = random.Random(seed)
    style_rng = random.Random(seed + 11)
    pairs, validation = [], []
    for task, (train, valid, opt_rng) in task_problems(seed, n_examples // 2, n_test, n_valid).items():
        for problem in train:
            message, _, _ = task_message(task, problem, opt_rng)
            pairs.append((task, message, problems.own_style_completion(problem, rng=style_rng, style=style)))
        for problem in valid:
            validation.append((task, *task_message(task, problem, opt_rng)))
    n_prose = int(len(pairs) * prose_fraction)
    prose = [problems.prose_sentence(rng) for _ in range(n_prose)]
    return pairs, prose, validation


def learning_rate(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then lr * sqrt(warmup / step): independent of the run's length."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * math.sqrt(max(1, warmup_steps) / (step + 1))


@torch.no_grad()
def validation_accuracy(model, tokenizer, validation, max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """Greedy accuracy per task (strict extraction, as evaluation reads it)."""
    from resp.tasks import is_correct

    model.eval()
    hits: dict[str, list[bool]] = {}
    prompts = tokenizer.apply_chat_template([[{"role": "user", "content": m}] for _, m, _, _ in validation],
                                           add_generation_prompt=True, enable_thinking=True, tokenize=False)
    for start in range(0, len(validation), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=False)
        for (task, _, gold, options), text in zip(validation[start:start + batch_size], texts):
            fmt = "gsm8k" if task == "arith" else "mathqa"
            text = text.split(IM_END)[0]
            hits.setdefault(task, []).append(is_correct(fmt, text, gold, options, extractor="strict"))
    model.train()
    return {task: sum(h) / len(h) for task, h in hits.items()}


def length_buckets(examples, order: list[int], rng: random.Random, batch_size: int, pool: int = 16) -> list[list[int]]:
    """The next `pool` batches: shuffled examples grouped by length, so a batch pads little
    (the prompt lengths vary by 2x); batch order shuffled again. Consumes `order` in place."""
    while len(order) < batch_size * pool:
        fresh = list(range(len(examples)))
        rng.shuffle(fresh)
        order.extend(fresh)
    take = sorted(order[:batch_size * pool], key=lambda i: len(examples[i][0]))
    del order[:batch_size * pool]
    batches = [take[i:i + batch_size] for i in range(0, len(take), batch_size)]
    rng.shuffle(batches)
    return batches


def _save(model, tokenizer, out: Path, history: list[dict]) -> None:
    """Model, tokenizer and the validation history so far, written whole or not at all."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")


def train_embedded_model(cfg, out_dir: str | Path, n_test: int, world_seed: int) -> Path:
    """Train per `cfg` (params.yaml `embedded_model`), save model + tokenizer to `out_dir`."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    pairs, prose, validation = training_texts(world_seed, cfg.train_examples, n_test, cfg.validation_items,
                                              cfg.prose_fraction, style_of(cfg))

    corpus = [p + "\n" + c for _, p, c in pairs[::25]] + prose[:2000]
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD)

    examples = []  # (input_ids, labels)
    prompts = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for _, p, _ in pairs],
        add_generation_prompt=True, enable_thinking=True, tokenize=False,
    )
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([c for _, _, c in pairs], add_special_tokens=False)["input_ids"]
    for p, c in zip(prompt_ids, completion_ids):
        c = c + [im_end]
        examples.append((p + c, [-100] * len(p) + c))
    for ids in tokenizer(prose, add_special_tokens=False)["input_ids"]:
        ids = ids + [pad]
        examples.append((ids, list(ids)))
    max_len = max(len(ids) for ids, _ in examples)
    log.info("training on %d examples (max %d tokens, mean completion %.1f tokens)", len(examples), max_len,
             sum(map(len, completion_ids)) / len(completion_ids))

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=[im_end, pad],
        pad_token_id=pad, bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, pad], pad_token_id=pad, do_sample=False)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    out = Path(out_dir)
    checkpoints = out.with_name(out.name + ".checkpoints")
    history = []
    order_rng = random.Random(cfg.seed)
    order: list[int] = []
    batches: list[list[int]] = []
    bar = tqdm(range(cfg.steps), desc="train embedded model", unit="step")
    ema = None
    for step in bar:
        if not batches:
            batches = length_buckets(examples, order, order_rng, cfg.batch_size)
        batch = [examples[i] for i in batches.pop()]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            attn[row, : len(ids)] = 1
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg.lr, cfg.warmup_steps)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{learning_rate(step, cfg.lr, cfg.warmup_steps):.2e}")
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            acc = validation_accuracy(model, tokenizer, validation, cfg.validation_max_new_tokens, cfg.batch_size * 2)
            history.append({"step": done, "loss_ema": ema, "validation_accuracy": acc})
            log.info("step %d loss %.4f validation accuracy %s", done, ema, acc)
            _save(model, tokenizer, checkpoints / f"step-{done}", history)

    acc = validation_accuracy(model, tokenizer, validation, cfg.validation_max_new_tokens, cfg.batch_size * 2)
    history.append({"step": cfg.steps, "loss_ema": ema, "validation_accuracy": acc})
    model.eval()
    _save(model, tokenizer, out, history)
    log.info("saved embedded model (%d parameters) to %s; validation accuracy %s", model.num_parameters(), out, acc)
    return out
