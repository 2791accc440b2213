"""resp.distributed: sharding, two gloo workers give the one-process scores (mean and
per-sample-abs modes), the score file round trip, and the environment checks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from resp.distributed import (DistributedError, distributed_taylor_scores, init_distributed, launched_by_torchrun,
                              lockstep_batches, shard, shard_model, sharded_taylor_scores)
from resp.importance import ImportanceError, load_scores, taylor_scores
from resp.models import load_model
from resp.stages.common import base_model
from resp.stages.score import score_traces
from resp.structures import structures_for
from resp.traces import Trace, TraceSet


def trace(i: int, prompt: int, completion: int) -> Trace:
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(1, 300, (prompt + completion,), generator=g).tolist()
    return Trace(f"t{i}", ids[:prompt], ids[prompt:], "", False)


# 7 traces (an odd count, so the shards differ in size) of total lengths 5, 9, 3, 12, 6, 8, 4
TRACES = [trace(i, p, c) for i, (p, c) in enumerate([(2, 3), (4, 5), (1, 2), (5, 7), (3, 3), (2, 6), (3, 1)])]


def test_shards_deal_out_the_length_sorted_order():
    # length order: t2(3) t6(4) t0(5) t4(6) t5(8) t1(9) t3(12)
    assert [t.prompt_id for t in shard(TRACES, 0, 2)] == ["t2", "t0", "t5", "t3"]
    assert [t.prompt_id for t in shard(TRACES, 1, 2)] == ["t6", "t4", "t1"]
    assert [t.prompt_id for t in shard(TRACES, 2, 3)] == ["t0", "t1"]
    with pytest.raises(DistributedError, match=r"rank 2 is outside \[0, 2\)"):
        shard(TRACES, 2, 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, params, traces_path, out_dir, ports):
    """One torchrun-like worker: the mean-mode file entry initialises its own process group; the
    per-sample-abs run uses a group the caller initialised."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]), GLOO_SOCKET_IFNAME="lo")
    written = score_traces(params, base_model(params), traces_path, out_dir / "mean.safetensors")
    assert (written is not None) == (rank == 0)

    os.environ["MASTER_PORT"] = str(ports[1])
    device = init_distributed("cpu")
    try:
        model, tokenizer = load_model(params.model.name_or_path, None, "float32", device)
        s = structures_for(model, "query_head", [])
        scores = distributed_taylor_scores(model, TRACES, s, 2, tokenizer.pad_token_id, per_sample_abs=True,
                                           grads_only_scored=True, grad_checkpointing=False)
        torch.save(scores, out_dir / f"abs-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_workers_equal_one_process(tiny_params, tmp_path):
    traces_path = tmp_path / "traces.jsonl"
    TraceSet(TRACES, {"kind": "test"}).save(traces_path)
    params = tiny_params.model_copy(update={"importance": tiny_params.importance.model_copy(update={"batch_size": 2})})
    mp.start_processes(worker, args=(params, traces_path, tmp_path, (free_port(), free_port())), nprocs=2,
                       start_method="fork")

    model, tokenizer = load_model(params.model.name_or_path)
    s_default = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)
    single = taylor_scores(model, TRACES, s_default, 7, tokenizer.pad_token_id)
    got, manifest = load_scores(tmp_path / "mean.safetensors")
    assert (got.n_samples, got.n_tokens) == (single.n_samples, single.n_tokens) == (7, 27)
    assert manifest["world_size"] == 2 and manifest["traces_digest"] == TraceSet.load(traces_path).manifest["digest"]
    torch.testing.assert_close(got.attention, single.attention, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got.channels, single.channels, rtol=1e-5, atol=1e-12)
    assert got.mean_loss == pytest.approx(single.mean_loss, rel=1e-6)

    s = structures_for(model, "query_head", [])
    single_abs = taylor_scores(model, TRACES, s, 7, tokenizer.pad_token_id, per_sample_abs=True)
    for rank in (0, 1):  # every worker ends with the scores of all traces
        abs_scores = torch.load(tmp_path / f"abs-rank{rank}.pt", weights_only=False)
        assert abs_scores.n_samples == 7
        torch.testing.assert_close(abs_scores.attention, single_abs.attention, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(abs_scores.channels, single_abs.channels, rtol=1e-5, atol=1e-12)


def sharded_worker(rank: int, params, traces_path, out_dir, ports):
    """A torchrun-like worker scoring on FSDP2-sharded parameters: through the file entry (mean mode,
    params' importance settings), then with all weights requiring grad under gradient checkpointing."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]), GLOO_SOCKET_IFNAME="lo")
    written = score_traces(params, base_model(params), traces_path, out_dir / "sharded.safetensors")
    assert (written is not None) == (rank == 0)

    os.environ["MASTER_PORT"] = str(ports[1])
    device = init_distributed("cpu")
    try:
        model, tokenizer = load_model(params.model.name_or_path, None, "float32", device)
        model = shard_model(model, device)
        weight = model.model.layers[1].mlp.up_proj.weight
        assert weight.to_local().shape[0] == weight.shape[0] // 2  # each worker holds half the rows
        s = structures_for(model, "kv_group", [])
        scores = sharded_taylor_scores(model, TRACES, s, 3, tokenizer.pad_token_id, grads_only_scored=False,
                                       grad_checkpointing=True)
        torch.save(scores, out_dir / f"sharded-all-grads-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_scoring_equals_one_process(tiny_params, tmp_path):
    """FSDP2 over two gloo workers (shards of 4 and 3 traces, so one worker runs a label-less lockstep
    batch): the scores of one process up to fp32 summation order (rtol 1e-5), and the same masks."""
    from resp.masks import Mask, prune_step

    traces_path = tmp_path / "traces.jsonl"
    TraceSet(TRACES, {"kind": "test"}).save(traces_path)
    params = tiny_params.model_copy(update={
        "importance": tiny_params.importance.model_copy(update={"batch_size": 2}),
        "scale": tiny_params.scale.model_copy(update={"scoring": "sharded"})})
    assert lockstep_batches(TRACES, 2, 2, 0) == 2 and lockstep_batches(TRACES, 2, 3, 0) == 2
    mp.start_processes(sharded_worker, args=(params, traces_path, tmp_path, (free_port(), free_port())), nprocs=2,
                       start_method="fork")

    model, tokenizer = load_model(params.model.name_or_path)
    s = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)
    single = taylor_scores(model, TRACES, s, 7, tokenizer.pad_token_id)
    got, manifest = load_scores(tmp_path / "sharded.safetensors")
    assert manifest["scoring"] == "sharded" and manifest["world_size"] == 2
    assert (got.n_samples, got.n_tokens) == (7, 27) and got.mean_loss == pytest.approx(single.mean_loss, rel=1e-6)
    torch.testing.assert_close(got.attention, single.attention, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got.channels, single.channels, rtol=1e-5, atol=1e-12)
    assert not torch.equal(got.channels, torch.zeros_like(got.channels))
    for target in (0.2, 0.4):
        ours = prune_step(*got.normalized(s, "paper"), Mask.dense(s), s, target)
        theirs = prune_step(*single.normalized(s, "paper"), Mask.dense(s), s, target)
        assert ours.digest() == theirs.digest()

    s_kv = structures_for(model, "kv_group", [])
    all_grads = taylor_scores(model, TRACES, s_kv, 7, tokenizer.pad_token_id, grads_only_scored=False)
    for rank in (0, 1):  # every worker gathers the unit scores of all traces
        sharded = torch.load(tmp_path / f"sharded-all-grads-rank{rank}.pt", weights_only=False)
        assert sharded.n_samples == 7
        torch.testing.assert_close(sharded.attention, all_grads.attention, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(sharded.channels, all_grads.channels, rtol=1e-5, atol=1e-12)


def test_sharded_scoring_refuses_per_sample_abs(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    with pytest.raises(ImportanceError, match="per_sample_abs is not implemented for sharded parameters"):
        taylor_scores(tiny_qwen3, TRACES, s, 2, 0, per_sample_abs=True, sharded=True)


def test_one_process_without_torchrun_writes_the_same_scores(tiny_params, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    traces_path = tmp_path / "traces.jsonl"
    TraceSet(TRACES, {"kind": "test"}).save(traces_path)
    path = score_traces(tiny_params, base_model(tiny_params), traces_path, tmp_path / "scores.safetensors")
    got, manifest = load_scores(path)
    model, tokenizer = load_model(tiny_params.model.name_or_path)
    s = structures_for(model, tiny_params.prune.attention_unit, tiny_params.prune.protected_layers)
    single = taylor_scores(model, TRACES, s, tiny_params.importance.batch_size, tokenizer.pad_token_id)
    assert torch.equal(got.attention, single.attention) and torch.equal(got.channels, single.channels)
    assert manifest["world_size"] == 1 and manifest["importance"]["batch_size"] == tiny_params.importance.batch_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors", "scores.safetensors.json",
                                                           "traces.jsonl", "traces.jsonl.json"]


def test_incomplete_environment_is_refused(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_by_torchrun()
    with pytest.raises(DistributedError, match="no distributed environment"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match=r"incomplete \(missing LOCAL_RANK, MASTER_ADDR, MASTER_PORT\)"):
        launched_by_torchrun()


def test_distributed_scores_need_a_process_group(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    with pytest.raises(DistributedError, match="process group is not initialised"):
        distributed_taylor_scores(tiny_qwen3, TRACES, s, 2, 0, False, True, False)


def test_cli_score_writes_the_library_scores(tiny_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    from resp.cli import app
    from resp.config import load_params

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    traces_path = tmp_path / "traces.jsonl"
    TraceSet(TRACES, {"kind": "test"}).save(traces_path)
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    result = CliRunner().invoke(app, ["score", "--traces", str(traces_path), "--out", str(tmp_path / "s.safetensors"),
                                      "--model", str(tiny_model_dir), "--params", str(params),
                                      "--set", "model.device=cpu", "--set", "model.dtype=float32"])
    assert result.exit_code == 0, result.output
    assert f"wrote scores to {tmp_path / 's.safetensors'}" in result.output
    got, manifest = load_scores(tmp_path / "s.safetensors")
    assert manifest["model"]["name"] == str(tiny_model_dir) and (got.n_samples, got.n_tokens) == (7, 27)
    # under a mask: what the score stage's function computes in this process for it
    from resp.masks import Mask

    s = structures_for(load_model(str(tiny_model_dir))[0], "query_head", None)
    mask = Mask.dense(s)
    mask.heads[0, :2] = False
    mask.channels[1, ::3] = False
    mask.save(tmp_path / "mask.safetensors", {"kind": "test"})
    result = CliRunner().invoke(app, ["score", "--traces", str(traces_path), "--out", str(tmp_path / "m.safetensors"),
                                      "--model", str(tiny_model_dir), "--mask", str(tmp_path / "mask.safetensors"),
                                      "--params", str(params), "--set", "model.device=cpu", "--set", "model.dtype=float32"])
    assert result.exit_code == 0, result.output
    masked, masked_manifest = load_scores(tmp_path / "m.safetensors")
    assert masked_manifest["mask_digest"] == mask.digest() != manifest["mask_digest"]
    p = load_params(params, ["model.device=cpu", "model.dtype=float32", f"model.name_or_path={tiny_model_dir}"])
    expected, _ = load_scores(score_traces(p, base_model(p), traces_path, tmp_path / "lib.safetensors",
                                           mask=str(tmp_path / "mask.safetensors")))
    assert torch.equal(masked.attention, expected.attention) and torch.equal(masked.channels, expected.channels)
    assert not torch.equal(masked.channels, got.channels)
    missing = CliRunner().invoke(app, ["score", "--traces", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x"),
                                       "--model", str(tiny_model_dir), "--params", str(params)])
    assert missing.exit_code == 2 and "error: trace set" in missing.output and "not found" in missing.output


# ---- scale-out generation: the vLLM backend of resp.generation (vllm itself is an optional extra)

def test_vllm_backend_without_vllm_says_how_to_fix(monkeypatch, tiny_model_dir):
    import sys

    from resp.generation import GenerationError, SamplingSpec, generate_with_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    spec = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=4)
    with pytest.raises(GenerationError) as err:
        generate_with_backend("vllm", None, None, ["x"], spec, 1, 0, "g", model_dir=tiny_model_dir, gpu_memory_utilization=0.5)
    assert str(err.value) == ("vllm is not installed here: set RESP_VLLM_PYTHON to the python of a vLLM environment (README, GPU users), "
                              "or set generation.backend: hf")
    with pytest.raises(GenerationError) as err:  # evaluation chose vllm: the message names its knob
        generate_with_backend("vllm", None, None, ["x"], spec, 1, 0, "g", model_dir=tiny_model_dir, gpu_memory_utilization=0.5,
                              backend_knob="evaluation.backend")
    assert str(err.value) == ("vllm is not installed here: set RESP_VLLM_PYTHON to the python of a vLLM environment (README, GPU users), "
                              "or set evaluation.backend: hf")
    with pytest.raises(GenerationError, match=r"needs a saved model directory \(a masked export"):
        generate_with_backend("vllm", None, None, ["x"], spec, 1, 0, "g")
    with pytest.raises(GenerationError, match=r"backend 'tgi' is not one of \['hf', 'hf_static', 'hf_compiled', 'vllm'\]"):
        generate_with_backend("tgi", None, None, ["x"], spec, 1, 0, "g")


def test_vllm_outputs_become_completions_like_hf(stand_in_vllm, tiny_model_dir, tiny_tokenizer):
    """A stand-in vllm module: checks what generate_vllm asks for and how it turns outputs into Completions."""
    from resp.generation import SamplingSpec, generate_vllm

    eos = sorted({tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"), tiny_tokenizer.pad_token_id})
    outs = [[40, 41, eos[0], 42], [43, 44, 45]]  # first stops at an EOS (42 is cut), second runs out
    vllm = stand_in_vllm(lambda call, index, prompt_ids, sampling: outs[index])
    prompts = ["<|im_start|>user\nTom<|im_end|>\n", "<|im_start|>user\n12+3<|im_end|>\n"]
    spec = SamplingSpec(temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=3)
    got = generate_vllm(tiny_model_dir, prompts, spec, seed=7, gpu_memory_utilization=0.4)

    ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    [llm] = vllm.llms
    assert llm["llm"] == {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir), "revision": None,
                          "tokenizer_revision": None, "gpu_memory_utilization": 0.4}
    [made] = llm["passes"]
    assert made["prompts"] == [{"prompt_token_ids": i} for i in ids]
    assert [s["seed"] for s in made["sampling"]] == [7, 8]
    assert made["sampling"][0] == {"temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_tokens": 3, "seed": 7,
                                   "stop_token_ids": eos, "skip_special_tokens": False}
    assert [(c.prompt_ids, c.completion_ids, c.truncated) for c in got] == [
        (ids[0], [40, 41, eos[0]], False), (ids[1], [43, 44, 45], True)]
    assert got[0].text == tiny_tokenizer.decode([40, 41], skip_special_tokens=False)


def test_hf_backend_is_generate(tiny_tokenizer):
    from conftest import make_qwen3

    from resp.generation import SamplingSpec, generate, generate_with_backend

    model = make_qwen3()
    model.generation_config.eos_token_id = None
    prompts = ["<|im_start|>user\nTom<|im_end|>\n", "<|im_start|>user\n12+3<|im_end|>\n"]
    spec = SamplingSpec(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5)
    assert (generate_with_backend("hf", model, tiny_tokenizer, prompts, spec, 2, 3, "g")
            == generate(model, tiny_tokenizer, prompts, spec, batch_size=2, seed=3, desc="g"))
