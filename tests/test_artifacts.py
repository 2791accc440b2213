"""resp.artifacts: atomic files and directories (no temp left, the old file kept on failure),
manifests renamed in after their payload, digests against hashlib, target names both ways,
the masks of a run directory, the run layout, and Mask/TraceSet files byte-identical to the
format they had before they were written through this module."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resp import artifacts
from resp.artifacts import (ArtifactError, Layout, atomic_dir, atomic_path, bytes_digest, content_digest, dir_digest,
                            existing_exports, file_digest, is_local, json_digest, manifest_path, mask_file,
                            masks_in_dir, parse_target, read_manifest, target_key, target_name, text_digest,
                            write_bytes, write_json, write_text, write_with_manifest)
from resp.masks import Mask
from resp.traces import Trace, TraceSet

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"   # sha256(b"abc"), FIPS 180-2


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- atomic writes

def test_writes_create_parents_and_leave_no_temp_file(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    assert write_json(path, {"b": 1, "a": [1, 2]}) == path
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}'
    write_json(path, {"b": 1, "a": 2}, sort_keys=True, newline=True)
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    write_text(tmp_path / "t.md", "é\n")
    assert (tmp_path / "t.md").read_bytes() == "é\n".encode()
    write_bytes(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert names(path.parent) == ["x.json"] and names(tmp_path) == ["a", "b.bin", "t.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "x.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError, match="^writer failed$"):
        with atomic_path(path) as tmp:
            assert tmp == tmp_path / f".x.txt.tmp-{os.getpid()}"
            tmp.write_text("half of the new")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old" and names(tmp_path) == ["x.txt"]


def test_a_failed_payload_keeps_the_old_payload_and_manifest(tmp_path):
    path = tmp_path / "m.bin"
    write_with_manifest(path, lambda tmp: tmp.write_bytes(b"v1"), {"version": 1})

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"v2, cut")
        raise OSError("disk full")

    with pytest.raises(OSError, match="^disk full$"):
        write_with_manifest(path, broken, {"version": 2})
    assert path.read_bytes() == b"v1" and read_manifest(path) == {"version": 1}
    assert names(tmp_path) == ["m.bin", "m.bin.json"]


def test_the_manifest_is_renamed_in_after_the_payload(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renamed.append((Path(src).name, Path(dst).name, Path(dst).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", recording_replace)
    path = write_with_manifest(tmp_path / "m.bin", lambda tmp: tmp.write_bytes(b"payload"), {"b": 1, "a": 2})
    pid = os.getpid()
    assert renamed == [(f".m.bin.tmp-{pid}", "m.bin", False), (f".m.bin.json.tmp-{pid}", "m.bin.json", False)]
    assert manifest_path(path) == tmp_path / "m.bin.json"
    assert manifest_path(path).read_text() == '{\n  "a": 2,\n  "b": 1\n}'
    assert path.read_bytes() == b"payload"


def test_atomic_dir_replaces_a_directory_whole(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        assert tmp == tmp_path / f".export.tmp-{os.getpid()}" and tmp.is_dir() and list(tmp.iterdir()) == []
        (tmp / "a.txt").write_text("1")
    assert names(out) == ["a.txt"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        assert names(out) == ["a.txt"]   # the old one stays readable until the new one is complete
    assert names(out) == ["b.txt"] and names(tmp_path) == ["export"]


def test_atomic_dir_keeps_the_old_directory_when_the_writer_fails(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError, match="^bad weights$"):
        with atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("half")
            raise ValueError("bad weights")
    assert names(out) == ["a.txt"] and names(tmp_path) == ["export"]


def test_atomic_dir_removes_temp_directories_of_dead_writers_only(tmp_path):
    dead = tmp_path / f".export.tmp-{dead_pid()}"
    alive = tmp_path / ".export.tmp-1"            # pid 1 always runs: another writer, mid-export
    other = tmp_path / f".other.tmp-{dead_pid()}"  # a temp of another directory
    for d in (dead, alive, other):
        d.mkdir()
        (d / "w.bin").write_bytes(b"partial")
    with atomic_dir(tmp_path / "export") as tmp:
        (tmp / "a.txt").write_text("1")
    assert names(tmp_path) == sorted(["export", alive.name, other.name])


# ---------------------------------------------------------------- digests

def test_digests(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_bytes(b"abc")
    (tmp_path / "d" / "sub" / "b.txt").write_bytes(b"")
    assert file_digest(tmp_path / "d" / "a.txt") == ABC_SHA256 == text_digest("abc") == bytes_digest(b"abc")
    empty = hashlib.sha256(b"").hexdigest()
    assert dir_digest(tmp_path / "d") == hashlib.sha256(f"a.txt{ABC_SHA256}sub/b.txt{empty}".encode()).hexdigest()
    assert json_digest({"b": 1, "a": [2]}) == json_digest({"a": [2], "b": 1}) == text_digest('{"a": [2], "b": 1}')
    (tmp_path / "d" / "sub" / "b.txt").rename(tmp_path / "d" / "sub" / "c.txt")
    assert dir_digest(tmp_path / "d") != hashlib.sha256(f"a.txt{ABC_SHA256}sub/b.txt{empty}".encode()).hexdigest()


def test_content_digest(tmp_path):
    payload = write_with_manifest(tmp_path / "m.bin", lambda tmp: tmp.write_bytes(b"abc"), {})
    write_bytes(tmp_path / "plain.bin", b"abc")
    (tmp_path / "d").mkdir()
    write_bytes(tmp_path / "d" / "x", b"abc")
    manifest = file_digest(manifest_path(payload))
    assert content_digest({"z": str(payload), "a": [str(tmp_path / "plain.bin"), None, 3, 0.5, True],
                           "d": tmp_path / "d", "gone": str(tmp_path / "gone")}) == {
        "a": [[ABC_SHA256, None], None, 3, 0.5, True],
        "d": dir_digest(tmp_path / "d"),
        "gone": f"missing:{tmp_path / 'gone'}",
        "z": [ABC_SHA256, manifest],
    }


@pytest.mark.parametrize("ref, local", [
    ("Qwen/Qwen3-0.6B", False), ("gsm8k", False), ("openai/gsm8k", False),
    ("./model", True), ("/abs/model", True), ("~/model", True), ("data/world/arith", True),
    ("train.jsonl", True), ("test.json", True),
])
def test_is_local(ref, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # an empty directory: nothing named like a hub id exists here
    assert is_local(ref) is local


def test_is_local_for_what_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert is_local("owner/name") and not is_local("owner/other")


# ---------------------------------------------------------------- targets

@pytest.mark.parametrize("target, key", [(0.0, "0.00"), (0.1, "0.10"), (0.2, "0.20"), (0.3, "0.30"), (0.35, "0.35"),
                                         (0.5, "0.50"), (0.7, "0.70"), (0.95, "0.95")])
def test_target_names_round_trip(tmp_path, target, key):
    assert target_key(target) == key and target_name(target) == f"sparsity-{key}"
    assert mask_file(tmp_path, target) == tmp_path / f"sparsity-{key}.safetensors"
    for text in (key, target_name(target), mask_file(tmp_path, target).name):
        assert parse_target(text) == target
    assert parse_target(target_key(0.1 + 0.2)) == 0.3   # equal targets are equal keys
    assert {parse_target("0.30"): "x"}[0.3] == "x"


@pytest.mark.parametrize("text", ["sparsity-abc", "dense", "", "1.5", "1.0", "-0.1", "nan", "sparsity-", "sparsity-1"])
def test_parse_target_refuses_what_is_not_a_target(text):
    with pytest.raises(ArtifactError, match=rf"^{text!r} names no sparsity target: expected a fraction in \[0, 1\) "
                                            r"such as 0\.30, or sparsity-0\.30$"):
        parse_target(text)


def test_masks_in_dir(tmp_path):
    for name in ("sparsity-0.20.safetensors", "sparsity-0.10.safetensors", "sparsity-0.10.safetensors.json",
                 "sparsity-x.safetensors", "sparsity-0.30.safetensors.tmp-12", "other.safetensors"):
        (tmp_path / name).write_bytes(b"")
    found = masks_in_dir(tmp_path)
    assert found == {0.1: tmp_path / "sparsity-0.10.safetensors", 0.2: tmp_path / "sparsity-0.20.safetensors"}
    assert list(found) == [0.1, 0.2]


def test_masks_in_dir_without_masks(tmp_path):
    (tmp_path / "sparsity-0.10.safetensors.json").write_text("{}")
    with pytest.raises(ArtifactError, match=rf"^no masks \(sparsity-\*\.safetensors\) in {tmp_path}: "
                                            r"run `resp prune` first$"):
        masks_in_dir(tmp_path)


# ---------------------------------------------------------------- layout

def test_layout_paths():
    layout = Layout(Path("data"))
    assert layout.dense_traces("arith") == Path("data/runs/arith/traces/dense.jsonl")
    assert layout.heldout_traces("arith") == Path("data/runs/arith/traces/heldout.jsonl")
    assert layout.run_dir("arith", "resp") == Path("data/runs/arith/resp")
    assert layout.masks_dir("arith", "resp") == Path("data/runs/arith/resp/masks")
    assert layout.metrics("arith", "resp") == Path("data/metrics/arith/resp.json")
    assert layout.dense_metrics("choice") == Path("data/metrics/choice/dense.json")
    assert layout.method_exports("arith", "flap") == Path("data/checkpoints/arith/flap")
    assert layout.export_root("arith", "flap", 0.3) == Path("data/checkpoints/arith/flap/sparsity-0.30")


def test_existing_exports(tmp_path):
    (tmp_path / "sparsity-0.10" / "masked").mkdir(parents=True)
    (tmp_path / "sparsity-0.10" / "compact").mkdir()
    (tmp_path / "sparsity-0.10" / "gguf").mkdir()                 # not an asked format
    (tmp_path / "sparsity-0.20").mkdir()                          # no format directory
    (tmp_path / "sparsity-0.30").mkdir()
    (tmp_path / "sparsity-0.30" / "uniform").write_text("a file")  # not a directory
    assert existing_exports(tmp_path, [0.1, 0.2, 0.3], ["masked", "compact", "uniform"]) == {
        0.1: {"masked": tmp_path / "sparsity-0.10" / "masked", "compact": tmp_path / "sparsity-0.10" / "compact"}}
    assert existing_exports(tmp_path / "none", [0.1], ["masked"]) == {}


# ---------------------------------------------------------------- adopters write the bytes they always wrote

def _mask() -> Mask:
    heads = torch.tensor([[True, False, True, True], [False, True, True, True]])
    channels = torch.tensor([[True, True, False], [True, False, True]])
    biases = {"o_proj": torch.tensor([[0.5, -1.0], [0.25, 2.0]]), "down_proj": torch.zeros(2, 2)}
    return Mask(heads, channels, biases)


@pytest.mark.parametrize("with_biases", [False, True])
def test_mask_files_are_byte_identical_to_the_format_before(tmp_path, with_biases):
    mask = _mask()
    if not with_biases:
        mask.biases = None
    manifest = {"model": {"key": "k" * 64}, "target": 0.3, "label": "flap", "protected_layers": [0]}
    path = mask.save(tmp_path / "run" / "sparsity-0.30.safetensors", manifest)
    # the bytes the writer wrote before it used resp.artifacts: save_file of uint8/float32 tensors,
    # and the manifest as json.dumps(indent=2, sort_keys=True) without a final newline
    tensors = {"heads": mask.heads.to(torch.uint8), "channels": mask.channels.to(torch.uint8)}
    tensors.update({f"bias.{n}": t.to(torch.float32).contiguous() for n, t in (mask.biases or {}).items()})
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    meta = {**manifest, "digest": mask.digest(), "heads_shape": [2, 4], "channels_shape": [2, 3]}
    assert path.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert Path(f"{path}.json").read_bytes() == json.dumps(meta, indent=2, sort_keys=True).encode()
    assert names(path.parent) == ["sparsity-0.30.safetensors", "sparsity-0.30.safetensors.json"]
    loaded, loaded_meta = Mask.load(path)
    assert loaded.digest() == mask.digest() and loaded_meta == meta


def test_trace_set_files_are_byte_identical_to_the_format_before(tmp_path):
    traces = [Trace("test-0", [1, 2], [3, 4, 5], "x = 3 é", False, "3", True),
              Trace("test-1", [], [6], "", True)]
    trace_set = TraceSet(traces, {"task": "arith", "kind": "self_generated", "model": {"key": "k"}})
    path = tmp_path / "traces" / "dense.jsonl"
    digest = trace_set.save(path)
    body = "".join(json.dumps(asdict(t), sort_keys=True) + "\n" for t in traces).encode()
    assert path.read_bytes() == body
    assert body.startswith(b'{"answer": "3", "completion_ids": [3, 4, 5], "correct": true, "prompt_id": "test-0", '
                           b'"prompt_ids": [1, 2], "text": "x = 3 \\u00e9", "truncated": false}\n')
    assert digest == hashlib.sha256(body).hexdigest()
    expected = {"task": "arith", "kind": "self_generated", "model": {"key": "k"}, "n": 2,
                "mean_completion_tokens": 2.0, "truncation_rate": 0.5, "answer_accuracy": 1.0, "digest": digest,
                "prompt_ids_digest": hashlib.sha256(b"test-0\ntest-1").hexdigest()}
    assert trace_set.manifest == expected
    assert Path(f"{path}.json").read_bytes() == json.dumps(expected, indent=2, sort_keys=True).encode()
    assert names(path.parent) == ["dense.jsonl", "dense.jsonl.json"]
    assert TraceSet.load(path).traces == traces


def test_written_files_take_the_umask_mode(tmp_path):
    """safetensors writes 0600 whatever the umask: every file the tool writes (one file, or a directory of
    them) gets the mode the umask gives, as any other tool's output would."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from resp.artifacts import atomic_dir, atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        with atomic_dir(tmp_path / "export") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(old)
    for path in (tmp_path / "a.safetensors", tmp_path / "export" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o755
