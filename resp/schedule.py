"""Global iterative pruning with progressive regeneration (method steps 6-8).

`iterative_prune` runs K linear steps in parameter sparsity up to max(targets). At each step
it scores every unit on the current traces with already-pruned units at zero, ranks them
globally and prunes the lowest (`prune_step`), so masks are nested. Traces are regenerated
with the current pruned model either before scoring once the measured sparsity has crossed a
milestone (`regenerate: milestones`, once per milestone), or when the trace drift exceeds a
threshold (`regenerate: drift`): drift is the rise of the decode-only loss of the current
traces under the current pruned model (the loss the scoring pass computes anyway) over its
value right after the traces were made; the step is then scored again on the fresh traces.
Every step logs that loss, so drift is measured for every method. Masks are kept at each
target sparsity. The state is saved after every step and a rerun resumes from it.

Options (reflection): `verify_select` branches at each milestone (refresh vs keep traces),
prunes both to the next milestone and keeps the branch whose regenerated answers on the
calibration questions are more often correct. Trace filtering is applied by the caller's
`prepare` function (see `resp.recipe`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resp.importance import UnitScores
from resp.masks import Mask, MaskError, apply_mask, prune_step
from resp.structures import Structures
from resp.traces import TraceSet

log = logging.getLogger(__name__)

ScoreFn = Callable[[Mask, TraceSet], UnitScores]          # scores of the model masked by Mask
RegenerateFn = Callable[[Mask, str], tuple[TraceSet, str]]  # (mask, tag) -> (traces, saved path)


def schedule_points(targets: list[float], steps: int) -> list[float]:
    """The K linear sparsity levels up to max(targets), with each target included exactly."""
    top = max(targets)
    points = {round(top * k / steps, 6) for k in range(1, steps + 1)} | {round(t, 6) for t in targets}
    return sorted(p for p in points if p > 0)


@dataclass
class PruneState:
    step: int                                     # number of schedule points done
    mask: Mask
    traces: TraceSet
    traces_path: str
    milestones_done: list[float] = field(default_factory=list)
    saved: dict[float, Mask] = field(default_factory=dict)
    saved_after: dict[float, int] = field(default_factory=dict)  # trace sets used when each target was saved
    trace_history: list[dict] = field(default_factory=list)   # every trace set used, in order
    log: list[dict] = field(default_factory=list)
    regenerations: int = 0
    reference_loss: float | None = None   # loss of the current traces when they were made (drift baseline)
    regenerated: bool = False             # traces were regenerated since the last step


@dataclass
class ScheduleConfig:
    targets: list[float]
    steps: int
    milestones: list[float]      # regenerate: milestones (empty: never at milestones)
    normalize: str
    verify_select: bool
    drift_threshold: float | None = None   # regenerate: drift (None: never on drift)


class Checkpointer:
    """Saves the state after each step: step-numbered mask files first, then `state.json`
    (atomic rename) pointing at them, then removes the previous step's files. A crash at any
    point leaves a consistent state.json whose files exist and match their digests."""

    def __init__(self, directory: str | Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def save(self, st: PruneState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f"step{st.step:04d}-r{st.regenerations}"
        files = {"mask": st.mask.save(self.dir / f"mask-{tag}.safetensors", {"kind": "state"}).name}
        for t, m in st.saved.items():
            files[f"{t:.4f}"] = m.save(self.dir / f"saved-{t:.4f}-{tag}.safetensors", {"kind": "state"}).name
        body = {"fingerprint": self.fingerprint, "step": st.step, "traces_path": st.traces_path,
                "milestones_done": st.milestones_done, "saved": {k: v for k, v in files.items() if k != "mask"},
                "saved_after": {f"{t:.4f}": n for t, n in st.saved_after.items()}, "mask": files["mask"],
                "trace_history": st.trace_history, "log": st.log, "regenerations": st.regenerations,
                "reference_loss": st.reference_loss, "regenerated": st.regenerated}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(body, indent=2))
        os.replace(tmp, self.dir / "state.json")
        keep = set(files.values()) | {f + ".json" for f in files.values()}
        for old in self.dir.glob("*.safetensors*"):
            if old.name not in keep:
                old.unlink()

    def load(self) -> PruneState | None:
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        if body["fingerprint"] != self.fingerprint:
            log.warning("ignoring saved state in %s: it was made with other inputs", self.dir)
            return None
        mask, _ = Mask.load(self.dir / body["mask"])
        saved = {float(t): Mask.load(self.dir / name)[0] for t, name in body["saved"].items()}
        saved_after = {float(t): n for t, n in body["saved_after"].items()}
        log.info("resuming from step %d (saved state in %s)", body["step"], self.dir)
        return PruneState(body["step"], mask, TraceSet.load(body["traces_path"]), body["traces_path"],
                          body["milestones_done"], saved, saved_after, body["trace_history"], body["log"],
                          body["regenerations"], body["reference_loss"], body["regenerated"])


def _crossed(st: PruneState, milestones: list[float], s: Structures) -> list[float]:
    current = st.mask.sparsity(s)
    return [m for m in milestones if m not in st.milestones_done and current >= m - 1e-9]


def _step(st: PruneState, k: int, points: list[float], cfg: ScheduleConfig, s: Structures, score: ScoreFn,
          regenerate: RegenerateFn | None = None) -> None:
    """Score on the current traces (regenerating first if they drifted past the threshold), keep
    masks at targets passed, prune to the next point."""
    scores = score(st.mask, st.traces)
    if st.reference_loss is None or st.regenerated:
        st.reference_loss = scores.mean_loss
    drift = scores.mean_loss - st.reference_loss
    drifted = None
    if cfg.drift_threshold is not None and regenerate is not None and drift > cfg.drift_threshold:
        drifted = drift
        _regenerate(st, regenerate, f"drift-step{st.step:04d}", s)
        scores = score(st.mask, st.traces)
        st.reference_loss, drift = scores.mean_loss, 0.0
    att, ch = scores.normalized(s, cfg.normalize)
    previous = st.mask.sparsity(s)
    for t in cfg.targets:
        if previous < t <= points[k] + 1e-9 and t not in st.saved:
            st.saved[t] = prune_step(att, ch, st.mask, s, t)
            st.saved_after[t] = len(st.trace_history)
    st.mask = prune_step(att, ch, st.mask, s, points[k])
    st.step = k + 1
    entry = {"step": st.step, "target": points[k], "scored_sparsity": previous, "sparsity": st.mask.sparsity(s),
             "structure_ratio": st.mask.structure_ratio(s), "loss": scores.mean_loss, "drift": drift,
             "regenerated": st.regenerated or drifted is not None, "traces": st.traces_path,
             "kept": st.mask.kept_per_layer()}
    if drifted is not None:
        entry["drift_before_regeneration"] = drifted
    st.regenerated = False
    st.log.append(entry)
    log.info("step %d/%d: sparsity %.4f (target %.4f), structures %.4f, loss %.4f (drift %+.4f)%s",
             st.step, len(points), entry["sparsity"], points[k], entry["structure_ratio"], entry["loss"], drift,
             " after regenerating" if entry["regenerated"] else "")


def _regenerate(st: PruneState, regenerate: RegenerateFn, tag: str, s: Structures) -> None:
    st.traces, st.traces_path = regenerate(st.mask, tag)
    st.regenerations += 1
    st.regenerated = True
    st.trace_history.append({"path": st.traces_path, "digest": st.traces.manifest["digest"],
                             "at_step": st.step, "sparsity": st.mask.sparsity(s), "tag": tag,
                             **st.traces.stats()})


def _copy(st: PruneState) -> PruneState:
    return PruneState(st.step, st.mask.clone(), st.traces, st.traces_path, list(st.milestones_done),
                      {t: m.clone() for t, m in st.saved.items()}, dict(st.saved_after), list(st.trace_history),
                      list(st.log), st.regenerations, st.reference_loss, st.regenerated)


def iterative_prune(s: Structures, cfg: ScheduleConfig, initial: PruneState, score: ScoreFn,
                    regenerate: RegenerateFn | None, checkpoint: Checkpointer | None) -> PruneState:
    """Run the schedule from `initial` (step 0 or a resumed state) to the end."""
    points = schedule_points(cfg.targets, cfg.steps)
    if max(cfg.targets) >= 1:
        raise MaskError("targets must be below 1")
    st = initial
    if checkpoint and (resumed := checkpoint.load()) is not None:
        st = resumed
    while st.step < len(points):
        crossed = _crossed(st, cfg.milestones, s) if regenerate else []
        if crossed and cfg.verify_select:
            st = _verify_select(st, crossed, points, cfg, s, score, regenerate)
        else:
            if crossed:
                st.milestones_done.extend(crossed)
                _regenerate(st, regenerate, f"milestone-{crossed[-1]:.2f}", s)
                if checkpoint:  # a crash while scoring must not redo the regeneration
                    checkpoint.save(st)
            _step(st, st.step, points, cfg, s, score, regenerate)
        if checkpoint:
            checkpoint.save(st)
    return st


def _verify_select(st, crossed, points, cfg, s, score, regenerate) -> PruneState:
    """Branch refresh vs keep at a milestone; advance both to the next milestone; keep the better."""
    st.milestones_done.extend(crossed)
    refresh, keep = _copy(st), _copy(st)
    _regenerate(refresh, regenerate, f"milestone-{crossed[-1]:.2f}-refresh", s)
    for branch in (refresh, keep):
        _step(branch, branch.step, points, cfg, s, score)
        while branch.step < len(points) and not _crossed(branch, cfg.milestones, s):
            _step(branch, branch.step, points, cfg, s, score)
    accuracy = {}
    for name, branch in (("refresh", refresh), ("keep", keep)):
        probe, path = regenerate(branch.mask, f"verify-{name}-step{branch.step}")
        accuracy[name] = probe.stats()["answer_accuracy"] or 0.0
    winner = refresh if accuracy["refresh"] >= accuracy["keep"] else keep
    name = "refresh" if winner is refresh else "keep"
    winner.log.append({"verify_select": accuracy, "chosen": name, "at_step": winner.step})
    log.info("verify_select at milestone %s: accuracy refresh %.3f vs keep %.3f -> %s",
             crossed, accuracy["refresh"], accuracy["keep"], name)
    return winner


class MaskedModel:
    """Puts a model into the state of a mask before scoring or generating.

    Masks along one run are nested, so zeroing in place is enough; with `keep_dense` a CPU
    copy of the prunable weights is kept so branches can return to a less sparse mask.
    """

    def __init__(self, model, s: Structures, keep_dense: bool):
        self.model, self.s = model, s
        self.dense = ({n: p.detach().cpu().clone() for n, p in model.named_parameters()
                       if n.endswith("proj.weight") or n.endswith("proj.bias")} if keep_dense else None)

    def set(self, mask: Mask):
        if mask.biases and self.dense is None:
            raise ValueError("a mask with bias compensation adds to biases: build MaskedModel with keep_dense=True")
        if self.dense is not None:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in self.dense:
                        p.copy_(self.dense[name])
        apply_mask(self.model, mask, self.s)
        return self.model
