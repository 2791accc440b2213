"""The iterative schedule with fake scorers/regenerators over files: exact regeneration points, nesting,
unique step outputs."""

import pytest
import torch

from conftest import make_qwen3
from resp.importance import UnitScores, load_scores, save_scores
from resp.masks import Mask, prune_step
from resp.schedule import PruneState, ScheduleConfig, iterative_prune, schedule_points
from resp.structures import structures_for
from resp.traces import Trace, TraceSet


def test_schedule_points_linear_with_targets():
    assert schedule_points([0.2, 0.4], 4) == [0.1, 0.2, 0.3, 0.4]
    assert schedule_points([0.25, 0.5], 4) == [0.125, 0.25, 0.375, 0.5]
    assert schedule_points([0.3], 2) == [0.15, 0.3]
    assert schedule_points([0.2, 0.35], 2) == [0.175, 0.2, 0.35]


def load(path, s):
    return Mask.dense(s) if path is None else Mask.load(path)[0]


class FileStages:
    """`schedule.Stages` over files, from a fake's in-memory score and regenerate; `apply` is the
    real `prune_step` on unnormalised scores. Records every output name."""

    def __init__(self, fake, s, directory):
        self.fake, self.s, self.dir, self.names = fake, s, directory, []

    def _out(self, name):
        assert name not in self.names, f"two steps wrote {name}"
        self.names.append(name)
        return self.dir / "steps" / f"{name}.safetensors"

    def score(self, mask, traces, name, part):
        scores = self.fake.score(load(mask, self.s), TraceSet.load(traces))
        return str(save_scores(scores, self._out(name), {})), scores.mean_loss

    def apply(self, scores, mask, sparsity, name):
        unit, _ = load_scores(scores)
        return str(prune_step(unit.attention, unit.channels, load(mask, self.s), self.s, sparsity).save(self._out(name), {}))

    def regenerate(self, mask, tag):
        return self.fake.regenerate(load(mask, self.s), tag)[1]


def saved(st, s, targets):
    return [load(st.saved[t], s) for t in targets]


class Fake:
    """Deterministic scores that depend on the traces' tag, and a regenerator that counts calls."""

    def __init__(self, s, tmp_path, fail_at_step=None):
        self.s, self.tmp, self.calls, self.regens, self.fail_at = s, tmp_path, 0, [], fail_at_step

    def traces(self, tag):
        ts = TraceSet([Trace(tag, [1], [2, 3], tag, False, "1", tag != "initial")], {"tag": tag})
        path = self.tmp / f"{tag}.jsonl"
        ts.save(path)
        return ts, str(path)

    def score(self, mask, traces):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        seed = sum(map(ord, traces.manifest["tag"]))
        g = torch.Generator().manual_seed(seed)
        att = torch.rand(self.s.num_layers, self.s.attention_units, generator=g, dtype=torch.float64)
        ch = torch.rand(self.s.num_layers, self.s.intermediate_size, generator=g, dtype=torch.float64)
        return UnitScores(att * mask.attention_units(self.s), ch * mask.channels, 1, 2, 0.5)

    def regenerate(self, mask, tag):
        self.regens.append((tag, mask.sparsity(self.s)))
        return self.traces(tag)


def run(tmp_path, fake, s, cfg):
    _, path = fake.traces("initial")
    steps = FileStages(fake, s, tmp_path)
    st = iterative_prune(s, cfg, PruneState(0, None, path), steps, regenerate=True)
    st.names = steps.names
    return st


CFG = ScheduleConfig(targets=[0.2, 0.3, 0.4], steps=8, milestones=[0.1, 0.2, 0.3], verify_select=False)


def test_regenerates_once_per_milestone_and_nests(tmp_path):
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Fake(s, tmp_path)
    st = run(tmp_path, fake, s, CFG)
    assert [tag for tag, _ in fake.regens] == ["milestone-0.10", "milestone-0.20", "milestone-0.30"]
    # each regeneration happened right after its milestone was crossed, with the pruned model
    for (tag, sparsity), m in zip(fake.regens, [0.1, 0.2, 0.3]):
        assert m <= sparsity < m + 0.05 + 1e-9
    assert fake.calls == 8                  # one scoring per step, recomputed after regeneration
    assert st.regenerations == 3 and st.milestones_done == [0.1, 0.2, 0.3]
    masks = saved(st, s, CFG.targets)
    for t, m in zip(CFG.targets, masks):
        assert t <= m.sparsity(s) < t + (s.head_params + s.kv_params) / s.decoder_params  # last unit may kill a group
    assert masks[0].contains(masks[1]) and masks[1].contains(masks[2])
    assert all(m.heads[s.num_layers - 1].all() and m.channels[s.num_layers - 1].all() for m in masks)
    assert [e["step"] for e in st.log] == list(range(1, 9))


def test_same_inputs_same_masks(tmp_path):
    s = structures_for(make_qwen3(), "query_head", None)
    a = run(tmp_path / "a", Fake(s, _mk(tmp_path / "a")), s, CFG)
    b = run(tmp_path / "b", Fake(s, _mk(tmp_path / "b")), s, CFG)
    assert [m.digest() for m in saved(a, s, CFG.targets)] == [m.digest() for m in saved(b, s, CFG.targets)]


def _mk(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_every_step_writes_an_output_of_its_own(tmp_path):
    """A workflow engine caches each step by its output name and inputs: names never repeat."""
    s = structures_for(make_qwen3(), "query_head", None)
    st = run(tmp_path, Fake(s, tmp_path), s, CFG)
    assert st.names[:3] == ["step-0001/scores", "step-0001/mask", "step-0002/scores"]
    assert "step-0004/target-0.2000" in st.names and len(st.names) == len(set(st.names))
    assert st.mask == str(tmp_path / "steps" / "step-0008" / "mask.safetensors")


def test_no_milestones_never_regenerates(tmp_path):
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Fake(s, tmp_path)
    cfg = ScheduleConfig([0.2], 4, [], False)
    st = run(tmp_path, fake, s, cfg)
    assert fake.regens == [] and st.regenerations == 0 and fake.calls == 4


def test_verify_select_branches_and_keeps_better(tmp_path):
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Fake(s, tmp_path)
    cfg = ScheduleConfig([0.2, 0.3], 6, [0.1, 0.2], True)
    st = run(tmp_path, fake, s, cfg)
    decisions = [e for e in st.log if "verify_select" in e]
    assert len(decisions) == 2
    # the fake marks every regenerated trace correct and the initial one wrong: refresh wins
    assert all(d["chosen"] == "refresh" for d in decisions)
    assert [t for t, _ in fake.regens if "refresh" in t and t.startswith("milestone")] == ["milestone-0.10-refresh", "milestone-0.20-refresh"]
    m20, m30 = saved(st, s, [0.2, 0.3])
    assert m20.contains(m30)


class Reflect:
    """A world where the two verify_select branches prune differently and answer differently.

    Scores depend on which traces they are computed on: the dense model's own traces
    ("initial") make layer 0 look vital, regenerated traces make layer 1 look vital, so the
    keep branch prunes layers 1-2 and the refresh branch prunes layers 0 and 2. Answers depend
    on the pruned weights only: a regenerated trace set has one trace per MLP channel of
    `judge_layer`, correct while that channel is kept, so its answer accuracy is the share of
    that layer's channels the mask keeps.
    """

    def __init__(self, s, tmp_path, judge_layer):
        self.s, self.tmp, self.judge = s, tmp_path, judge_layer
        self.regens, self.scored_on = [], []

    def traces(self, tag, kind, mask):
        ts = TraceSet([Trace(f"train-{c}", [1], [2, 3], tag, False, "1", bool(kept))
                       for c, kept in enumerate(mask.channels[self.judge].tolist())], {"tag": tag, "kind": kind})
        path = self.tmp / f"{tag}.jsonl"
        ts.save(path)
        return ts, str(path)

    def score(self, mask, traces):
        self.scored_on.append(traces.manifest["tag"])
        vital = 0 if traces.manifest["kind"] == "initial" else 1
        g = torch.Generator().manual_seed(0)
        att = torch.rand(self.s.num_layers, self.s.attention_units, generator=g, dtype=torch.float64)
        ch = torch.rand(self.s.num_layers, self.s.intermediate_size, generator=g, dtype=torch.float64)
        att[vital] += 10
        ch[vital] += 10
        return UnitScores(att * mask.attention_units(self.s), ch * mask.channels, 1, 2, 0.5)

    def regenerate(self, mask, tag):
        self.regens.append(tag)
        return self.traces(tag, "regenerated", mask)

    def run(self, cfg):
        _, path = self.traces("initial", "initial", Mask.dense(self.s))
        return iterative_prune(self.s, cfg, PruneState(0, None, path), FileStages(self, self.s, self.tmp), regenerate=True)


VERIFY = ScheduleConfig([0.2, 0.3], 6, [0.1, 0.2], True)


def _digests(st, targets):
    return [Mask.load(st.saved[t])[0].digest() for t in targets]


def _final(st):
    return Mask.load(st.mask)[0]


def test_verify_select_keeps_the_kept_traces_when_their_branch_answers_better(tmp_path):
    """Judged on layer 0 (which only the dense traces protect), the keep branch answers better at
    both milestones: the run continues with the dense traces and ends exactly where a run that
    never regenerates ends. An "always refresh" implementation fails every assertion here."""
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Reflect(s, _mk(tmp_path / "verify"), judge_layer=0)
    st = fake.run(VERIFY)
    decisions = [e for e in st.log if "verify_select" in e]
    assert [d["chosen"] for d in decisions] == ["keep", "keep"]
    for d in decisions:  # the probes answered from each branch's own pruned weights
        assert d["verify_select"]["keep"] == 1.0 and d["verify_select"]["refresh"] < 1.0
    assert [t for t in fake.regens if t.startswith("milestone")] == ["milestone-0.10-refresh", "milestone-0.20-refresh"]
    # the kept branch's traces and masks are the ones continued with
    initial_path = str(tmp_path / "verify" / "initial.jsonl")
    assert TraceSet.load(st.traces).manifest["tag"] == "initial" and st.traces == initial_path
    assert st.regenerations == 0 and st.trace_history == []
    assert [e["traces"] for e in st.log if "step" in e] == [initial_path] * 6
    assert _final(st).channels[0].all() and Mask.load(st.saved[0.3])[0].heads[0].all()
    plain = Reflect(s, _mk(tmp_path / "plain"), judge_layer=0).run(ScheduleConfig([0.2, 0.3], 6, [], False))
    assert _digests(st, [0.2, 0.3]) == _digests(plain, [0.2, 0.3])
    assert _final(st).digest() == _final(plain).digest()


def test_verify_select_refreshes_when_the_refreshed_branch_answers_better(tmp_path):
    """Judged on layer 1 (which only regenerated traces protect), the refresh branch answers
    better at the first milestone (strictly; the second is a tie, which goes to refresh): the
    run ends exactly where plain progressive regeneration ends. An "always keep"
    implementation fails here."""
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Reflect(s, _mk(tmp_path / "verify"), judge_layer=1)
    st = fake.run(VERIFY)
    decisions = [e for e in st.log if "verify_select" in e]
    assert [d["chosen"] for d in decisions] == ["refresh", "refresh"]
    first, second = (d["verify_select"] for d in decisions)
    assert first["refresh"] > first["keep"]
    assert second["refresh"] == second["keep"]  # both branches hold regenerated traces by then
    assert st.regenerations == 2 and [h["tag"] for h in st.trace_history] == ["milestone-0.10-refresh",
                                                                               "milestone-0.20-refresh"]
    assert TraceSet.load(st.traces).manifest["tag"] == "milestone-0.20-refresh"
    assert st.traces == str(tmp_path / "verify" / "milestone-0.20-refresh.jsonl")
    plain = Reflect(s, _mk(tmp_path / "plain"), judge_layer=1).run(
        ScheduleConfig([0.2, 0.3], 6, [0.1, 0.2], False))
    assert _digests(st, [0.2, 0.3]) == _digests(plain, [0.2, 0.3])
    never = Reflect(s, _mk(tmp_path / "never"), judge_layer=1).run(ScheduleConfig([0.2, 0.3], 6, [], False))
    assert _digests(st, [0.2, 0.3]) != _digests(never, [0.2, 0.3])  # the branches really differ


class Drifting(Fake):
    """Loss of a trace set rises with the sparsity gained since it was made (1 nat/token per unit)."""

    def __init__(self, s, tmp_path):
        super().__init__(s, tmp_path)
        self.made_at = {"initial": 0.0}

    def score(self, mask, traces):
        scores = super().score(mask, traces)
        scores.mean_loss = 0.5 + mask.sparsity(self.s) - self.made_at[traces.manifest["tag"]]
        return scores

    def regenerate(self, mask, tag):
        self.made_at[tag] = mask.sparsity(self.s)
        return super().regenerate(mask, tag)


def test_drift_triggered_regeneration_fires_exactly_past_the_threshold(tmp_path):
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Drifting(s, tmp_path)
    # the threshold is relative to the dense traces' own loss (0.5 here): 0.24 * 0.5 = 0.12 nats/token
    cfg = ScheduleConfig([0.2, 0.4], 8, [], False, drift_threshold=0.24)
    st = run(tmp_path, fake, s, cfg)
    assert all(e["drift_threshold_nats"] == pytest.approx(0.12) for e in st.log)
    # drift rises 0.05 per step: past 0.12 at the third step after each regeneration (scored at ~0.15, ~0.30)
    assert [tag for tag, _ in fake.regens] == ["drift-step0003", "drift-step0006"]
    assert st.regenerations == 2 and fake.calls == 8 + 2     # a regenerated step is scored again
    for entry in st.log:
        assert entry["drift"] == pytest.approx(entry["loss"] - 0.5) and entry["drift"] <= 0.12
        assert entry["regenerated"] == ("drift_before_regeneration" in entry)
        if entry["regenerated"]:
            assert entry["drift_before_regeneration"] > 0.12 and entry["drift"] == 0.0
    assert [e["scored_sparsity"] for e in st.log] == [0.0] + [e["sparsity"] for e in st.log[:-1]]


def test_milestone_regeneration_logs_drift_against_the_fresh_traces(tmp_path):
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Drifting(s, tmp_path)
    st = run(tmp_path, fake, s, CFG)   # milestones, no drift threshold: drift is measured, never acted on
    regenerated = [e["step"] for e in st.log if e["regenerated"]]
    assert len(regenerated) == 3 and st.regenerations == 3
    for entry in st.log:
        assert entry["drift"] == pytest.approx(entry["loss"] - 0.5)
        if entry["regenerated"]:
            assert entry["drift"] == 0.0
