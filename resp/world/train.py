"""Train the embedded reasoning model: a stock `Qwen3ForCausalLM` taught the world's own style.

Data: fresh seeded `arith`/`choice` problems (never one whose content is in a test split)
rendered through the chat template with thinking on, followed by the own-style completion
and `<|im_end|>`; loss on the completion only, as decode-time behaviour is what matters.
A fraction of `prose` lines is trained with full-sequence loss so generic-text calibration
has something to measure. Deterministic from the seed on a given machine and thread count.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from resp.prompts import gsm8k_message, mathqa_message
from resp.world import tasks as world
from resp.world.tokenizer import IM_END, PAD, build_tokenizer

log = logging.getLogger(__name__)


def training_texts(seed: int, n_examples: int, n_test: int, prose_fraction: float):
    """Return (task, prompt, completion, problem) for both tasks plus prose lines."""
    rng = random.Random(seed)
    per_task = n_examples // 2
    pairs = []
    for task_seed, task in ((seed, "arith"), (seed + 1, "choice")):
        train, _ = world.make_splits(task_seed, per_task, n_test)
        opt_rng = random.Random(task_seed + 7)
        for problem in train:
            if task == "arith":
                message, letter = gsm8k_message(world.gsm8k_record(problem)["question"]), None
            else:
                record = world.mathqa_record(problem, opt_rng)
                message = mathqa_message(record["Problem"], record["options"])
                letter = record["correct"]
            pairs.append((task, message, world.own_style_completion(problem, letter), problem))
    n_prose = int(len(pairs) * prose_fraction)
    prose = [world.prose_sentence(rng) for _ in range(n_prose)]
    return pairs, prose


def train_phase(model, examples, pad: int, steps: int, lr: float, warmup_steps: int, batch_size: int,
                weight_decay: float, seed: int, desc: str) -> None:
    """AdamW with linear warm-up and cosine decay to 5% over `steps` batches of shuffled examples."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    order_rng = random.Random(seed)
    order: list[int] = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    ema = None
    for step in bar:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            order_rng.shuffle(fresh)
            order.extend(fresh)
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            attn[row, : len(ids)] = 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(step):.2e}")
        if step % 200 == 0:
            log.info("%s step %d loss %.4f", desc, step, ema)


def choice_focus_examples(pairs, prompt_ids, tokenizer, cfg) -> list[tuple[list[int], list[int]]]:
    """Phase 2 data: every choice pair plus a fraction of arith pairs, choice answers per
    `cfg.focus_choice_answer` ("value": `The answer is 45.`, "letter": `The answer is (b).`)."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    choice = [i for i, pair in enumerate(pairs) if pair[0] == "choice"]
    arith = [i for i, pair in enumerate(pairs) if pair[0] == "arith"]
    examples = []
    for i in choice + arith[:int(len(choice) * cfg.focus_other_fraction)]:
        task, _, completion, problem = pairs[i]
        if task == "choice" and cfg.focus_choice_answer == "value":
            completion = world.own_style_completion(problem)
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [im_end]
        examples.append((prompt_ids[i] + c, [-100] * len(prompt_ids[i]) + c))
    return examples


def train_embedded_model(cfg, out_dir: str | Path, n_test: int, world_seed: int) -> Path:
    """Train per `cfg` (params.yaml `embedded_model`), save model + tokenizer to `out_dir`."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    pairs, prose = training_texts(world_seed, cfg.train_examples, n_test, cfg.prose_fraction)

    corpus = [p + "\n" + c for _, p, c, _ in pairs[::25]] + prose[:2000]
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD)

    examples = []  # (input_ids, labels)
    prompts = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for _, p, _, _ in pairs],
        add_generation_prompt=True, enable_thinking=True, tokenize=False,
    )
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([c for _, _, c, _ in pairs], add_special_tokens=False)["input_ids"]
    for p, c in zip(prompt_ids, completion_ids):
        c = c + [im_end]
        examples.append((p + c, [-100] * len(p) + c))
    for ids in tokenizer(prose, add_special_tokens=False)["input_ids"]:
        ids = ids + [pad]
        examples.append((ids, list(ids)))
    max_len = max(len(ids) for ids, _ in examples)
    log.info("training on %d examples (max %d tokens)", len(examples), max_len)

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=[im_end, pad],
        pad_token_id=pad, bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.train()
    train_phase(model, examples, pad, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.batch_size, cfg.weight_decay,
                cfg.seed, "train embedded model")
    # Phase 2: the choice task's answer letter is a lookup (computed value -> option letter) that
    # the mixed phase leaves at chance level. With `focus_choice_answer: value` the choice
    # completions state the value instead (`The answer is 45.`), which the MathQA extractor maps
    # to the option holding it, as a lenient judge would; a fresh optimizer, mostly choice data.
    focus_examples = choice_focus_examples(pairs, prompt_ids, tokenizer, cfg)
    train_phase(model, focus_examples, pad, cfg.focus_steps, cfg.focus_lr, cfg.warmup_steps, cfg.batch_size,
                cfg.weight_decay, cfg.seed + 1, "train choice focus")

    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, pad], pad_token_id=pad, do_sample=False,
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("saved embedded model (%d parameters) to %s", model.num_parameters(), out)
    return out
