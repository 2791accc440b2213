"""resp.cli (and flows.cli, the console command): every subcommand's --help runs; `resp benchmark` end to end on a saved tiny model; the old
`resp eval` name points to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_qwen3
from typer.testing import CliRunner

from flows.cli import app
from resp.config import TaskParams, load_params
from resp.evaluation import evaluate_task
from resp.generation import SamplingSpec
from resp.models import load_model
from resp.tasks import load_items

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
runner = CliRunner()


def test_help_runs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "benchmark" in result.output and " eval " not in result.output
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
    assert "--task-file" in runner.invoke(app, ["benchmark", "--help"]).output
    assert {"run", "schedule", "prune", "traces"} <= {c.name for c in app.registered_commands}


def test_the_library_cli_imports_no_prefect():
    """`resp.cli` is the library's command line; Prefect (and flows/) enter only through flows.cli."""
    import subprocess
    import sys

    code = "import sys, resp.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"


@pytest.fixture
def saved_model(tmp_path, tiny_tokenizer):
    model = make_qwen3()
    model.generation_config.eos_token_id = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    path = tmp_path / "model"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"question": f"Tom has {a} apples. How many?", "answer": f"{a}\n#### {a}"}) + "\n"
                            for a in (3, 12, 7)))
    return path


def test_benchmark_writes_what_evaluate_task_computes(saved_model, task_file, tmp_path):
    out = tmp_path / "metrics" / "eval.json"
    result = runner.invoke(app, ["benchmark", "--model", str(saved_model), "--task-file", str(task_file), "--format", "gsm8k",
                                 "--out", str(out), "--params", str(PARAMS), "--set", "evaluation.max_new_tokens=5",
                                 "--set", "evaluation.batch_size=2", "--set", "model.device=cpu"])
    assert result.exit_code == 0, result.output
    assert f"{task_file} [test] {saved_model}: accuracy strict 0.0000 (0/3), flexible " in result.output
    report = json.loads(out.read_text())
    assert {k: report[k] for k in ("model", "revision", "task", "format", "split", "sampling")} == {
        "model": str(saved_model), "revision": None, "task": str(task_file), "format": "gsm8k", "split": "test",
        "sampling": {"temperature": 0.0, "top_p": 0.95, "top_k": 20, "max_new_tokens": 5, "seed": 0, "batch_size": 2,
                     "backend": "hf"}}
    model, tokenizer = load_model(str(saved_model))
    items = load_items(TaskParams(format="gsm8k", source=str(task_file), subset=None, few_shot=0,
                                  calibration_split="test", eval_split="test"), "test")
    expected = evaluate_task(model, tokenizer, items, "gsm8k", SamplingSpec(0.0, 0.95, 20, 5), batch_size=2, seed=0)
    assert {k: report[k] for k in expected} == expected
    assert [r["id"] for r in report["records"]] == ["test-0", "test-1", "test-2"]


def test_benchmark_with_vllm_generates_from_the_model_directory(saved_model, task_file, tmp_path, stand_in_vllm,
                                                                tiny_tokenizer, monkeypatch):
    """evaluation.backend=vllm: vLLM loads --model itself (no Hugging Face copy); records come from its outputs."""
    monkeypatch.setattr("resp.models.load_model", lambda *a, **k: pytest.fail("vllm evaluation loaded the model with transformers"))
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = tiny_tokenizer("<think>\n</think>\n\nThe answer is 12.", add_special_tokens=False)["input_ids"] + [end]
    vllm = stand_in_vllm(lambda call, index, prompt_ids, sampling: reply)
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["benchmark", "--model", str(saved_model), "--task-file", str(task_file), "--format", "gsm8k",
                                 "--out", str(out), "--params", str(PARAMS), "--set", "evaluation.backend=vllm",
                                 "--temperature", "0.6", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert f"{task_file} [test] {saved_model}: accuracy strict 0.3333 (1/3), flexible 0.3333, mean completion {len(reply):.1f} tokens" in result.output
    [llm] = vllm.llms
    assert llm["llm"] == {"model": str(saved_model), "tokenizer": str(saved_model), "revision": None,
                          "tokenizer_revision": None,
                          "gpu_memory_utilization": load_params(PARAMS).scale.vllm_gpu_memory_utilization}
    [call] = llm["passes"]
    assert [(s["temperature"], s["seed"]) for s in call["sampling"]] == [(0.6, 4), (0.6, 5), (0.6, 6)]
    report = json.loads(out.read_text())
    assert report["sampling"]["backend"] == "vllm"
    assert [(r["gold"], r["answer_strict"], r["correct_strict"], r["completion_tokens"]) for r in report["records"]] == [
        ("3", "12", False, len(reply)), ("12", "12", True, len(reply)), ("7", "12", False, len(reply))]


@pytest.mark.parametrize("args,message", [
    ([], "error: vllm is not installed here: set RESP_VLLM_PYTHON to the python of a vLLM environment (README, GPU users), or set evaluation.backend: hf"),
    (["--model", "/nonexistent"], "error: model directory /nonexistent does not exist: check model.name_or_path"),
])
def test_benchmark_with_vllm_bad_input_is_one_line(args, message, task_file, stand_in_vllm, monkeypatch):
    import sys

    stand_in_vllm(lambda call, index, prompt_ids, sampling: pytest.fail("nothing should be generated"))
    if not args:
        monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    result = runner.invoke(app, ["benchmark", "--task-file", str(task_file), "--format", "gsm8k", "--params", str(PARAMS),
                                 "--set", "evaluation.backend=vllm", *args])
    assert (result.exit_code, result.output) == (2, message + "\n")


def test_benchmark_named_task_with_limit(saved_model, monkeypatch):
    monkeypatch.chdir(ROOT)  # params.yaml names data/world/arith relative to the project root
    result = runner.invoke(app, ["benchmark", "--model", str(saved_model), "--task", "arith", "--limit", "2",
                                 "--set", "evaluation.max_new_tokens=3", "--set", "model.device=cpu"])
    assert result.exit_code == 0, result.output
    assert f"arith [test] {saved_model}: accuracy strict 0.0000 (0/2)" in result.output


@pytest.mark.parametrize("args,message", [
    (["--task", "arith", "--task-file", "x.jsonl"],
     "error: give exactly one of --task NAME (from params.yaml tasks) or --task-file PATH --format F"),
    (["--task", "nope"], "error: task 'nope' is not in params.yaml tasks; defined: ['arith', 'choice', 'gsm8k', 'mathqa', 'prose']"),
    (["--task-file", "x.jsonl"], "error: --task-file needs --format, one of ['gsm8k', 'mathqa', 'text'] (got None)"),
    (["--task", "arith", "--set", "evaluation.nope=1"],
     f"error: {PARAMS} is invalid: evaluation.nope: Extra inputs are not permitted"),
    (["--task", "arith", "--model", "/nonexistent"],
     "error: model directory /nonexistent does not exist: check model.name_or_path"),
])
def test_benchmark_bad_input_is_one_line(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["benchmark", "--params", str(PARAMS), *args])
    assert result.exit_code == 2
    assert result.output == message + "\n"


@pytest.mark.parametrize("args", [[], ["--task", "arith", "--model", "Qwen/Qwen3-0.6B"]])
def test_eval_was_renamed_to_benchmark(args):
    """click would suggest `resp evaluate` for an unknown `eval`: the old name says where it went, whatever its options."""
    result = runner.invoke(app, ["eval", *args])
    assert (result.exit_code, result.output) == (2, "error: `resp eval` is now `resp benchmark` (any model on a task); "
                                                    "`resp evaluate` evaluates the masks of a pruning run\n")
