"""resp.locking: one writer per output; a held lock fails at once naming the holder; the kernel frees it."""

import os
import subprocess
import sys

import pytest

from resp.locking import LockError, exclusive, lock_path, pid_alive, run_dir_lock


def test_the_lock_file_lies_beside_what_it_guards(tmp_path):
    assert lock_path(tmp_path / "runs" / "resp") == tmp_path / "runs" / ".resp.resp-lock"


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "runs" / "resp"
    with run_dir_lock(run):
        assert lock_path(run).read_text().split()[0] == str(os.getpid())
        with pytest.raises(LockError) as info:
            with run_dir_lock(run):
                pass
    assert str(info.value) == (f"run directory {run} is in use by pid {os.getpid()}: wait for that run to finish, "
                               "or prune into another --out")
    with run_dir_lock(run):   # released with the block
        pass


def test_a_waiting_writer_says_how_long_it_waited(tmp_path):
    with exclusive(tmp_path / "store.db", "tracking store", "wait"):
        with pytest.raises(LockError, match=r"is in use by pid \d+ \(waited 0 s\): wait$"):
            with exclusive(tmp_path / "store.db", "tracking store", "wait", wait_s=0.2):
                pass


def test_a_missing_folder_is_an_error_unless_the_output_makes_it(tmp_path):
    with pytest.raises(LockError, match=f"^tracking store {tmp_path}/no/store.db: folder {tmp_path}/no does not exist"):
        with exclusive(tmp_path / "no" / "store.db", "tracking store", "fix it"):
            pass
    with exclusive(tmp_path / "new" / "run", "run directory", "fix it", make_parent=True):
        assert (tmp_path / "new").is_dir()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from resp.locking import run_dir_lock\n"
                               f"with run_dir_lock({str(tmp_path / 'run')!r}):\n    print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockError, match=f"in use by pid {holder.pid}:"):
        with run_dir_lock(tmp_path / "run"):
            pass
    holder.kill()
    holder.wait()
    assert pid_alive(os.getpid()) and not pid_alive(holder.pid)
    with run_dir_lock(tmp_path / "run"):
        pass
