"""Every row of the bad-input campaign (tests/bad_inputs.py) ends in one line naming the problem
and the fix, with exit code 2 and no traceback (an audit row: exit 1 naming the tampering; a row
that did the wrong thing silently: the right thing, checked); the table grows with every new bad input."""

from __future__ import annotations

import pytest
from bad_inputs import CASES, build_project, judge, run_case


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_world_dir, mlflow_store):
    return build_project(tmp_path_factory.mktemp("campaign"), tiny_model_dir, tiny_world_dir, mlflow_store)


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_ends_in_one_line(case, project):
    result, lines = run_case(case, project)
    wrong = judge(case, project, result, lines)
    assert wrong is None, (wrong, result.output)


def test_a_second_writer_of_a_run_directory_is_refused_and_a_killed_one_leaves_no_lock(project):
    """Two `resp prune` into one --out both reported success (the last won). Now the second gets
    "in use by pid N" before loading anything; the lock dies with its process, kill -9 included."""
    import signal
    import subprocess
    import sys

    from bad_inputs import Case

    out = project.root / "scratch" / "shared-run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom resp.locking import run_dir_lock\n"
                               f"with run_dir_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        case = Case("concurrency", "x", "", "", lambda p: ["prune", "--task", "arith", "--method", "magnitude",
                                                             "--out", str(out)], "")
        result, lines = run_case(case, project)
        assert (result.exit_code, lines) == (2, [f"error: run directory {out} is in use by pid {holder.pid}: wait for "
                                                 "that run to finish, or prune into another --out"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result, lines = run_case(case, project)
    assert result.exit_code == 0, result.output
    assert (out / "masks" / "sparsity-0.10.safetensors").is_file()
