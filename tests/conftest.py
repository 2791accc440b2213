"""Shared fixtures: tiny random Qwen3 and Llama models (head_dim * heads != hidden on purpose)
and a tiny tokenizer with the Qwen3-style chat template. Nothing is downloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from resp.world.tokenizer import build_tokenizer

torch.set_num_threads(1)

TINY = dict(vocab_size=300, hidden_size=24, intermediate_size=40, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=512, tie_word_embeddings=False)


def make_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**{**TINY, **overrides})).eval()


def make_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


MAKERS = {"qwen3": make_qwen3, "llama": make_llama}


@pytest.fixture(params=sorted(MAKERS))
def tiny_model(request):
    """A tiny random model of each supported family in turn (4 layers, 4 q heads, 2 kv heads)."""
    return MAKERS[request.param]()


@pytest.fixture
def tiny_qwen3():
    return make_qwen3()


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (vocab <= 300) with <|im_start|>/<|im_end|>/<think> and the chat template."""
    corpus = ["Tom has 12 apples. He buys 3 more. How many apples does Tom have now?",
              "<think>\n12+3=15\n</think>\n\nThe answer is 15.", "The river rests near the hills."] * 20
    return build_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Qwen3 saved with the tiny tokenizer, ready for `resp.models.load_model`."""
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("tiny-qwen3")
    model = make_qwen3()
    eos, pad = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"), tiny_tokenizer.pad_token_id
    model.config.eos_token_id, model.config.pad_token_id = [eos, pad], pad
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    with torch.no_grad():  # a random model rarely ends a turn: make <|im_end|> likely so traces vary in length
        model.lm_head.weight[eos] *= 30
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory):
    """Small arith (GSM8K format), choice (MathQA format) and prose files from the world generators."""
    from resp.world.problems import write_world

    path = tmp_path_factory.mktemp("world")
    write_world(str(path), seed=7, n_train=24, n_test=8, n_prose=24)
    return path


@pytest.fixture
def tiny_params(tiny_model_dir, tiny_world_dir):
    """The repo's params.yaml shrunk to seconds: tiny model, tiny tasks, few prompts and steps."""
    from pathlib import Path

    from resp.config import load_params

    root = Path(__file__).resolve().parent.parent
    return load_params(root / "params.yaml", [
        f"model.name_or_path={tiny_model_dir}",
        f"tasks.arith.source={tiny_world_dir / 'arith'}",
        f"tasks.choice.source={tiny_world_dir / 'choice'}",
        f"tasks.prose.source={tiny_world_dir / 'prose'}",
        "calibration.num_prompts=6", "generation.max_new_tokens=12", "generation.batch_size=4",
        "importance.batch_size=4", "prune.steps=4", "prune.targets=[0.1,0.2]", "prune.milestones=[0.05,0.1]",
        "evaluation.num_items=4", "evaluation.max_new_tokens=8", "evaluation.nll_traces=4",
    ])


def tiny_overrides(model_dir, world_dir) -> list[str]:
    """`tiny_params`' overrides, for fixtures wider than one test (module/session scope)."""
    return [f"model.name_or_path={model_dir}", f"tasks.arith.source={world_dir / 'arith'}",
            f"tasks.choice.source={world_dir / 'choice'}", f"tasks.prose.source={world_dir / 'prose'}",
            "calibration.num_prompts=6", "generation.max_new_tokens=12", "generation.batch_size=4",
            "importance.batch_size=4", "prune.steps=4", "prune.targets=[0.1,0.2]", "prune.milestones=[0.05,0.1]",
            "evaluation.num_items=4", "evaluation.max_new_tokens=8", "evaluation.nll_traces=4"]


class ScriptedLM:
    """Stands in for a causal LM in `resp.generation.generate`'s decode loop: its logits pick the
    next token of a fixed reply (token ids, ending with EOS) per prompt (token ids), so what is
    generated is known exactly. The KV cache holds each row's token ids in place of keys, so rows
    leave the batch as real ones do."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]], eos: int, vocab_size: int):
        from transformers import GenerationConfig

        self.replies, self.vocab_size = replies, vocab_size
        self.device = torch.device("cpu")
        self.config = LlamaConfig(**{**TINY, "num_hidden_layers": 1})   # the cache layout: one full-attention layer
        self.generation_config = GenerationConfig(eos_token_id=eos)

    def __call__(self, input_ids, attention_mask, cache, **kwargs):
        from types import SimpleNamespace

        ids = input_ids[:, None, :, None].float()
        seen, _ = cache.update(ids, ids, 0)
        logits = torch.zeros(len(input_ids), 1, self.vocab_size)
        for row, (tokens, real) in enumerate(zip(seen[:, 0, :, 0].long(), attention_mask.bool())):
            tokens = tokens[real].tolist()
            prompt = next(p for p in self.replies if tuple(tokens[: len(p)]) == p)
            logits[row, 0, self.replies[prompt][len(tokens) - len(prompt)]] = 1
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """One sqlite MLflow store for the session (creating one takes ~6 s): `registry.*` overrides.

    MLFLOW_TRACKING_URI is cleared for the session (it would win over registry.tracking_uri).
    """
    path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("DO_NOT_TRACK", "true")
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # creates the tables once
        yield [f"registry.tracking_uri={uri}", f"registry.artifact_location={path / 'artifacts'}"]


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One temporary Prefect API (server + database) for the session, analytics off, PREFECT_HOME in tmp."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_URL", raising=False)
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_HOME", str(home))
        with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            with prefect_test_harness(server_startup_timeout=180):   # a busy 2-core machine starts it slowly
                yield


class StandInVllm:
    """A stand-in `vllm` module (the real one needs CUDA) that records what it is asked.

    `reply(n, index, prompt_ids, sampling) -> token ids` scripts the output for prompt `index` of
    the `n`-th `LLM.generate` call (from 0, over all LLMs); `on_load(model_dir)` runs in
    `LLM.__init__`, while the model directory still exists, and what it returns is kept. `llms`
    holds one dict per LLM made: its keyword arguments ("llm"), `on_load`'s result ("loaded"), and
    "passes", one {"prompts", "sampling"} per `generate` call as received. `SamplingParams(**kw)`
    is the dict `kw`.
    """

    def __init__(self, reply, on_load=None):
        from types import SimpleNamespace

        self.llms: list[dict] = []
        llms, passes = self.llms, []

        class LLM:
            def __init__(self, **kwargs):
                self.record = {"llm": kwargs, "loaded": on_load(kwargs["model"]) if on_load else None, "passes": []}
                llms.append(self.record)

            def generate(self, prompts, sampling):
                n = len(passes)
                passes.append(n)
                self.record["passes"].append({"prompts": prompts, "sampling": sampling})
                return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=reply(n, i, p["prompt_token_ids"], s))])
                        for i, (p, s) in enumerate(zip(prompts, sampling))]

        self.module = SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw)


@pytest.fixture
def stand_in_vllm(monkeypatch):
    """`install(reply, on_load=None)` puts a `StandInVllm` in place of the `vllm` module and returns it."""
    import sys

    def install(reply, on_load=None) -> StandInVllm:
        stand_in = StandInVllm(reply, on_load)
        monkeypatch.setitem(sys.modules, "vllm", stand_in.module)
        return stand_in

    return install


# ---- DVC in scratch projects (the venv's own dvc)

DVC = str(Path(sys.executable).parent / "dvc")


def dvc(project: Path, *args: str) -> str:
    result = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def dvc_project(path: Path) -> Path:
    """A new git + DVC project at `path` (analytics off)."""
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    dvc(path, "init", "--quiet")
    dvc(path, "config", "core.analytics", "false")
    return path
