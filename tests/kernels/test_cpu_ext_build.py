"""The C++ kernels' build guard: a build killed midway must not stall every later process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from qserve.kernels import cpu_ext

# A child that takes the guard on a directory, says so, and sleeps inside it until it is killed.
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from qserve.kernels import cpu_ext
    with cpu_ext._build_guard(Path(sys.argv[1])):
        (Path(sys.argv[1]) / "lock").touch()  # what torch's own guard leaves while it builds
        print("holding", flush=True)
        time.sleep(600)
    """
)


def test_a_lock_file_left_by_a_killed_build_is_removed_by_the_next_one(tmp_path, caplog):
    (tmp_path / "lock").touch()
    with cpu_ext._build_guard(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert "left by a build that was stopped" in caplog.text


def test_the_guard_waits_for_a_live_builder_and_is_free_once_it_is_killed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding"
        # While the holder lives, a second process cannot take the guard (its torch lock is not stale).
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, sys; f = open(sys.argv[1], 'a');"
                "sys.exit(0 if fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB) is None else 1)",
                str(tmp_path / ".qserve-build.flock"),
            ],
            capture_output=True,
            timeout=60,
        )
        assert probe.returncode != 0, "the guard must be exclusive while a build runs"
        assert (tmp_path / "lock").exists()
    finally:
        child.kill()
        child.wait(timeout=60)
    # SIGKILL mid-build: the kernel drops the flock, the torch lock file stays; the next builder goes on.
    assert (tmp_path / "lock").exists()
    start = time.monotonic()
    with cpu_ext._build_guard(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert time.monotonic() - start < 30
