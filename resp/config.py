"""Every knob of the project, as one typed config loaded from `params.yaml`.

Unknown keys are rejected and every validation error is reported at once; defaults live in
`params.yaml` only (fields here have none, so a missing key is an error, not a silent
default). Library functions receive the sub-config they need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldParams(Strict):
    seed: int
    train_items: int = Field(gt=0)
    test_items: int = Field(ge=500)
    prose_items: int = Field(gt=0)
    dir: str
    check_items: int = Field(gt=0)     # `resp world check`: held-out items per task
    check_samples: int = Field(ge=2)   # sampled completions per item (distinct completions, self-check rate)

    @model_validator(mode="after")
    def _splits(self):
        if self.check_items > self.test_items:
            raise ValueError(f"check_items ({self.check_items}) exceeds test_items ({self.test_items}): "
                             "measure at most the test split")
        if self.train_items < self.test_items:
            raise ValueError(f"train_items ({self.train_items}) is below test_items ({self.test_items}): the calibration "
                             "and few-shot pool would be smaller than the test split; raise train_items")
        return self


class WorldStyle(Strict):
    check_hard: float = Field(ge=0, le=1)
    check_easy: float = Field(ge=0, le=1)
    error: float = Field(ge=0, le=1)
    opening: float = Field(ge=0, le=1)
    closing: float = Field(ge=0, le=1)


class EmbeddedModelParams(Strict):
    seed: int
    threads: int = Field(gt=0)
    train_examples: int = Field(gt=0)
    prose_fraction: float = Field(ge=0, le=1)
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(ge=6)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    weight_decay: float = Field(ge=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    checkpoint_every: int = Field(ge=0)      # keep a checkpoint + validation accuracy every N steps (0: never)
    validation_items: int = Field(gt=0)       # fresh problems per task for that accuracy
    validation_max_new_tokens: int = Field(gt=0)
    style: WorldStyle
    dir: str

    @model_validator(mode="after")
    def _gqa(self):
        if self.num_heads % self.num_kv_heads or self.num_heads // self.num_kv_heads < 2:
            raise ValueError("num_heads must be a multiple of num_kv_heads with >= 2 query heads per KV head")
        return self


class ModelParams(Strict):
    name_or_path: str          # hub id (e.g. Qwen/Qwen3-8B) or local directory
    revision: str | None       # hub revision (branch, tag or sha); None = default branch
    dtype: Literal["float32", "bfloat16", "float16"]
    device: str                # cpu, cuda, cuda:0, ...
    trust_remote_code: bool = False   # run modeling code shipped in a model directory (never implied by its files)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device: use cpu, cuda, cuda:N or mps")
        return value


class TaskParams(Strict):
    format: Literal["gsm8k", "mathqa", "text"]
    source: str                # local directory/file, or a hub dataset id
    subset: str | None         # hub dataset config name (GSM8K: "main")
    few_shot: int = Field(ge=0, le=8)
    calibration_split: str     # split the calibration prompts come from
    eval_split: str


class CalibrationParams(Strict):
    num_prompts: int = Field(gt=0)
    seed: int
    # Selective self-generated calibration (calibration: self_selected; Xiang et al. 2025): sample
    # `select_candidates` prompts `select_samples` times each, keep traces whose length lies within
    # the candidates' `select_length_quantiles`, most challenging first (the dense model's answers disagree most).
    select_candidates: int = Field(gt=0)
    select_samples: int = Field(ge=2)
    select_length_quantiles: tuple[float, float]

    @model_validator(mode="after")
    def _selection(self):
        lo, hi = self.select_length_quantiles
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"select_length_quantiles {[lo, hi]} must satisfy 0 <= low < high <= 1, e.g. [0.25, 0.9]")
        if self.select_candidates < self.num_prompts:
            raise ValueError(f"select_candidates ({self.select_candidates}) is below num_prompts ({self.num_prompts}): "
                             "selection needs at least as many candidates as it keeps")
        return self


class GenerationParams(Strict):
    # hf: resp's decode loop | hf_static: transformers' generate, static KV cache | hf_compiled: the same,
    # torch.compile'd (CUDA graphs) | vllm (resp/generation.py)
    backend: Literal["hf", "hf_static", "hf_compiled", "vllm"]
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    top_k: int = Field(ge=0)
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    seed: int


class ImportanceParams(Strict):
    batch_size: int = Field(gt=0)
    per_sample_abs: bool       # sum_n |w*g_n| instead of |w * mean_n g_n|
    normalize: Literal["paper", "params", "none"]
    grad_checkpointing: bool
    grads_only_scored: bool    # requires_grad only on the scored projections
    # null: the model's full-vocabulary logits of every token; N: LM head + cross-entropy on the completion
    # tokens only, N at a time, recomputed in the backward (resp/importance.py; same gradients)
    loss_chunk_tokens: int | None = Field(gt=0)


def sparsities(values: list[float]) -> list[float]:
    """A list of sparsity fractions: each in (0, 1), none repeated, ascending."""
    for v in values:
        if not 0 < v < 1:
            raise ValueError(f"sparsity {v} is outside (0, 1): use a fraction such as 0.4")
    if len(set(values)) != len(values):
        raise ValueError(f"{values} repeats a value: list each sparsity once")
    if values != sorted(values):
        raise ValueError(f"{values} must be sorted ascending")
    return values


class PruneParams(Strict):
    attention_unit: Literal["query_head", "kv_group"]
    steps: int = Field(gt=0)
    targets: list[float]
    milestones: list[float]
    protected_layers: list[int] | None   # None: first floor(0.1*L) layers and the last
    # regenerate: drift -> regenerate when the traces' loss rose by this fraction of the dense
    # calibration traces' own loss under the dense model (relative, so it scales with the model)
    drift_threshold: float = Field(gt=0)
    seed: int
    # Cheaper schedules (1, 1, null: the paper's, every step scores every token of every trace):
    score_every: int = Field(ge=1)       # score every k-th step, the steps between re-rank the last scores (rescored after a regeneration)
    score_subsets: int = Field(ge=1)     # each scoring pass reads one of m rotating subsets of the traces (trace i in subset i mod m)
    score_tokens: int | None = Field(gt=0)   # score only the first N completion tokens of each trace (null: all)

    @field_validator("targets", "milestones")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        return sparsities(values)

    @model_validator(mode="after")
    def _targets(self):
        if not self.targets:
            raise ValueError("targets is empty: give at least one parameter sparsity, e.g. [0.4]")
        fine = [t for t in self.targets if round(t, 2) != t]
        if fine:
            raise ValueError(f"targets {fine} have more than two decimals: mask files and metrics key a target as "
                             "sparsity-0.30, so use at most two (e.g. 0.12 or 0.13)")
        if self.score_every > self.steps:
            raise ValueError(f"score_every ({self.score_every}) exceeds steps ({self.steps}): only the first step would "
                             "score and the schedule is one-shot; use score_every <= steps")
        late = [m for m in self.milestones if m >= self.targets[-1]]
        if late:
            raise ValueError(f"milestones {late} are not below the last target {self.targets[-1]}: a milestone "
                             "there never triggers (no scoring step follows the last prune); drop them")
        return self


class EvaluationParams(Strict):
    backend: Literal["hf", "vllm"]   # vllm generates from a masked export of each evaluated model
    num_items: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    top_k: int = Field(ge=0)
    samples: int = Field(ge=0)   # sampled completions per item (0: no sampled pass), drawn in one pass
    sample_seed: int
    reflection_markers: list[str]   # a completion containing one of these checks or corrects itself
    nll_traces: int = Field(ge=0)
    nll_batch_size: int = Field(gt=0)


class HealParams(Strict):
    """Recovery of a pruned model on the dense model's own traces (resp.healing): the dense model teaches."""
    steps: int                   # optimizer steps (validated below: the message names the fix)
    lr: float = Field(gt=0)
    schedule: Literal["constant", "linear", "cosine"]   # after the linear warmup
    warmup_steps: int = Field(ge=0)
    batch_size: int = Field(gt=0)   # traces per step
    loss: Literal["kl", "ce"]       # kl: KL(teacher || student) per completion token; ce: cross-entropy on the teacher's samples
    mode: Literal["full", "lora"]   # full: every remaining weight; lora: peft adapters merged back before export
    lora_rank: int = Field(gt=0)    # used by mode lora; at most the narrowest kept block of a pruned layer
    lora_alpha: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(ge=0)   # 0: no clipping
    num_prompts: int = Field(gt=0)  # healing traces: the dense model's on the first N calibration prompts (`resp traces --limit N`)
    seed: int
    checkpoint_every: int = Field(ge=0)  # resumable checkpoint every N steps (0: none)

    @field_validator("steps")
    @classmethod
    def _budget(cls, steps: int) -> int:
        if steps <= 0:
            raise ValueError(f"heal.steps is {steps}: the healing budget must be a positive number of optimizer steps")
        return steps

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps > self.steps:
            raise ValueError(f"heal.warmup_steps ({self.warmup_steps}) exceeds heal.steps ({self.steps}): lower it")
        return self


SCORERS = ("taylor", "wanda_sp", "owl_sp", "flap", "magnitude", "random")
CALIBRATION_SOURCES = ("self", "self_selected", "gold", "generic", "none")
SELF_SOURCES = ("self", "self_selected")   # the dense model's own traces


class MethodParams(Strict):
    """One pruning method: a scorer, the calibration it reads, when traces are regenerated, and
    the reflection options (method.md): branch-and-verify at milestones, trace filtering."""
    scorer: Literal[SCORERS]                   # type: ignore[valid-type]
    calibration: Literal[CALIBRATION_SOURCES]  # type: ignore[valid-type]
    regenerate: Literal["none", "milestones", "drift"] = "none"   # milestones: at prune.milestones; drift: past prune.drift_threshold
    verify_select: bool = False                # at each regeneration, branch refresh vs keep and keep the better
    trace_filter: Literal["none", "correct", "correct_or_agree"] = "none"
    # fresh: each regeneration samples with its own random stream (the paper's `generate`);
    # common: every regeneration reuses the dense traces' per-prompt streams (common random numbers)
    regeneration_stream: Literal["fresh", "common"] = "fresh"
    bias_compensation: bool = True   # flap: add W[:, removed] @ mean(x[removed]) to output biases (created if absent)
    # recovery after pruning (resp heal); None: the masks are used as pruned. Left out of dumps when None, so the
    # params hashes and cache keys of methods without healing stay what they were before healing existed.
    heal: HealParams | None = Field(default=None, exclude_if=lambda value: value is None)

    @property
    def reads_dense_traces(self) -> bool:
        """Calibrated on the dense model's own traces made beforehand (`resp traces`): the one place that says so."""
        return self.calibration == "self"

    @model_validator(mode="after")
    def _combination(self):
        reads_data = self.scorer not in ("magnitude", "random")
        if reads_data and self.calibration == "none":
            raise ValueError(f"scorer {self.scorer} needs calibration data: set calibration to self, gold or generic")
        if not reads_data and self.calibration != "none":
            raise ValueError(f"scorer {self.scorer} reads no calibration data: set calibration: none")
        iterative_self = self.scorer == "taylor" and self.calibration in SELF_SOURCES
        if self.regenerate != "none" and not iterative_self:
            raise ValueError("regenerate needs the iterative taylor scorer on self-generated traces "
                             "(scorer: taylor, calibration: self or self_selected)")
        if self.verify_select and self.regenerate != "milestones":
            raise ValueError("verify_select branches at regeneration milestones: set regenerate: milestones")
        if self.regeneration_stream != "fresh" and self.regenerate == "none":
            raise ValueError("regeneration_stream only matters when traces are regenerated: set regenerate: "
                             "milestones or drift, or drop regeneration_stream")
        if not self.bias_compensation and self.scorer != "flap":
            raise ValueError("bias_compensation is FLAP's: only scorer: flap reads it; drop it from this method")
        if self.trace_filter != "none" and not iterative_self:
            raise ValueError("trace_filter keeps self-generated traces by their answers: it needs scorer: taylor "
                             "with calibration: self or self_selected")
        return self


class BaselineParams(Strict):
    owl_outlier_m: float = Field(gt=0)     # OWL's M: a score is an outlier above M times the layer mean
    owl_lambda: float = Field(ge=0, lt=1)  # OWL's lambda: layer sparsities within +-lambda of the target
    flap_statistics_dtype: Literal["float64", "model"]   # FLAP's statistics forward: float64 (CPU-independent bytes) | model dtype


class ReportParams(Strict):
    reference: str                 # the method every comparison is made against (resp)
    no_regeneration: str           # its ablation without regeneration (the regeneration effect)
    ablations: list[str]           # variants of the reference reported as ablation rows (not baselines)
    drift_triggered: str           # the ablation regenerating on drift: its regenerations counted, its drift plotted
    bootstrap_samples: int = Field(ge=100)
    confidence: float = Field(gt=0, lt=1)
    seed: int


class StudyParams(Strict):
    """The study (method.md, "The study"): every method x task x calibration seed, resumable cell by cell."""
    dir: str                       # committed: study.json, cells/, dense/, results.md, metrics.json, plots/
    work_dir: str                  # not committed: trace sets, run directories, the evaluation cache
    seeds: list[StrictInt]         # calibration seeds: each sets calibration.seed, generation.seed and prune.seed
    tasks: list[str]
    methods: list[str]             # data-free deterministic methods (magnitude) run once and count for every seed
    targets: list[float]
    num_items: int = Field(gt=0)   # evaluation items per task (greedy, and `samples` sampled completions each)
    samples: int = Field(ge=0)
    reference: str                 # differences are stated against this method

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("seeds is empty: give at least one calibration seed, e.g. [0, 1, 2]")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seeds {seeds} repeat {repeated}: a repeated seed would count one calibration twice; "
                             "list each seed once")
        return seeds

    @field_validator("targets")
    @classmethod
    def _targets(cls, values: list[float]) -> list[float]:
        if not values:
            raise ValueError("targets is empty: give at least one parameter sparsity, e.g. [0.4]")
        return sparsities(values)


class RunParams(Strict):
    tasks: list[str]
    methods: list[str]   # names declared under `methods`

    @field_validator("tasks", "methods")
    @classmethod
    def _not_empty(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("is empty, so a run would do nothing: name at least one")
        return values


class ExportParams(Strict):
    formats: list[Literal["masked", "compact", "uniform"]]
    channel_multiple: int = Field(gt=0)


class RegistryParams(Strict):
    tracking_uri: str          # MLFLOW_TRACKING_URI, when set, wins
    experiment: str = Field(min_length=1)
    artifact_location: str     # artifact folder (path or URI) of a newly created experiment
    log_exports: bool          # copy export directories into the artifact store
    connect_timeout_s: float = Field(default=5.0, gt=0, le=10)   # reachability check of an http(s) tracking server


_CRON_NAMES = "jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|sun|mon|tue|wed|thu|fri|sat"
_CRON_FIELD = re.compile(rf"(\*|(\d+|{_CRON_NAMES})(-(\d+|{_CRON_NAMES}))?)(/\d+)?", re.IGNORECASE)
_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class ScheduleParams(Strict):
    cron: str
    timezone: str

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if value.strip() in _CRON_ALIASES:
            return value
        if len(fields) != 5 or not all(_CRON_FIELD.fullmatch(part) for f in fields for part in f.split(",")):
            raise ValueError(f"{value!r} is not a 5-field cron expression: use e.g. '0 3 * * *' (daily at 03:00)")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone: use e.g. UTC or Europe/Berlin") from None
        return value


class ScaleParams(Strict):
    vllm_gpu_memory_utilization: float = Field(gt=0, le=1)   # GPU share vLLM may take (generation/evaluation.backend vllm)
    scoring: Literal["data_parallel", "sharded"]   # scoring over workers: replicate the model, or shard it (FSDP2)
    score_nproc: int = Field(ge=1)   # the score stage's workers (torchrun); 1: in this process


class FlowParams(Strict):
    data_dir: str                # root of runs/, metrics/, checkpoints/
    results_dir: str             # persisted Prefect task results (the cache)
    cache: bool
    task_runner: Literal["thread", "dask"]
    workers: int = Field(gt=0)
    dask_address: str | None     # existing Dask scheduler; None: start a LocalCluster
    dask_processes: bool
    register_models: bool        # register every pruned model in MLflow at the end of a run


class Params(Strict):
    world: WorldParams
    embedded_model: EmbeddedModelParams
    model: ModelParams
    tasks: dict[str, TaskParams]
    prose_task: str
    calibration: CalibrationParams
    generation: GenerationParams
    importance: ImportanceParams
    prune: PruneParams
    methods: dict[str, MethodParams]
    baselines: BaselineParams
    evaluation: EvaluationParams
    report: ReportParams
    run: RunParams
    export: ExportParams
    registry: RegistryParams
    schedule: ScheduleParams
    scale: ScaleParams
    flow: FlowParams
    study: StudyParams

    @model_validator(mode="after")
    def _task_names(self):
        unknown = [t for t in [*self.run.tasks, self.prose_task] if t not in self.tasks]
        if unknown:
            raise ValueError(f"run.tasks/prose_task name unknown tasks {unknown}; defined: {sorted(self.tasks)}")
        undeclared = [m for m in self.run.methods if m not in self.methods]
        if undeclared:
            raise ValueError(f"run.methods names undeclared methods {undeclared}; declare them under `methods` "
                             f"(declared: {', '.join(self.methods)})")
        unknown = [t for t in self.study.tasks if t not in self.tasks]
        undeclared = [m for m in [*self.study.methods, self.study.reference] if m not in self.methods]
        if unknown or undeclared:
            raise ValueError(f"study names unknown tasks {unknown} / undeclared methods {undeclared}; "
                             "declare them under `tasks` / `methods`")
        if self.prune.score_subsets > self.calibration.num_prompts:
            raise ValueError(f"prune.score_subsets ({self.prune.score_subsets}) exceeds calibration.num_prompts "
                             f"({self.calibration.num_prompts}): some scoring passes would have no trace and no target "
                             "is reachable; use at most num_prompts subsets")
        named = [self.report.reference, self.report.no_regeneration, *self.report.ablations, self.report.drift_triggered]
        undeclared = [m for m in named if m not in self.methods]
        if undeclared:
            raise ValueError(f"report names undeclared methods {undeclared}; declare them under `methods`")
        for m in self.run.methods:
            check_regeneration(self, m)
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


@dataclass(frozen=True)
class Method:
    """A declared method as a run hands it to its stages: `name` labels what the run writes (run
    directories, manifests, logs) and fills the `methods.{method}` params sections; `declaration`
    (`methods.<name>`) says how it runs. Built once where a run enters (`declared_method`)."""
    name: str
    declaration: MethodParams


def declared_method(params: Params, name: str, error: type[ValueError] = ParamsError) -> Method:
    """The method `name` as params.yaml declares it, or `error` naming the fix when it does not."""
    if name not in params.methods:
        raise error(f"method {name!r} is not declared; declare it under `methods` in params.yaml "
                    f"(declared: {', '.join(params.methods)})")
    return Method(name, params.methods[name])


def check_regeneration(params: Params, method: str) -> None:
    """A method declared to regenerate at milestones needs at least one milestone, or it never regenerates."""
    declared = params.methods.get(method)
    if declared is not None and declared.regenerate == "milestones" and not params.prune.milestones:
        raise ParamsError(f"method {method!r} regenerates at prune.milestones but prune.milestones is empty, so it would "
                          "never regenerate: list milestones below the last target, or use a method with regenerate: none")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ParamsError(f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}): keep one, YAML would silently use the last")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ParamsError(f"override {dotted!r}: {key!r} is not a section of params.yaml")
        node = node[key]
    node[keys[-1]] = value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load and validate params; `overrides` are `section.key=value` strings (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found: run from the project root or pass --params PATH")
    body = path.read_bytes()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path} is not UTF-8 text (byte 0x{body[e.start]:02x} at offset {e.start}): "
                          "save it as UTF-8") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ParamsError(f"{path} is not valid YAML ({where}{getattr(e, 'problem', None) or 'parse error'}); fix the file") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path} does not hold a mapping of sections (world:, model:, ...): fix the file or pass "
                          "--params PATH to the project's params.yaml")
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        if not key.strip() or any(not part.strip() for part in key.split(".")):
            raise ParamsError(f"override {item!r} has an empty key part before '=': write section.key=value, "
                              "e.g. prune.steps=10")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"override {item!r}: the value is not valid YAML; quote it, e.g. {key}='\"{value}\"'") from None
        _set_dotted(tree, key, parsed)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ParamsError(f"{path} is invalid: " + "; ".join(lines)) from None
