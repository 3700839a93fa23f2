"""Where a result came from: the command line, the commit, uncommitted changes, the machine.

Benchmark scripts put `describe_run()` into every JSON they write (bench/RESULTS.md cites those files),
so a figure can be traced to the code and the machine that produced it without anyone's notes.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LISTED = 50  # uncommitted paths listed in full; beyond that only their count


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip("\n")  # not strip(): a porcelain status line starts with a space


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_run(argv: list[str] | None = None) -> dict:
    """A JSON-able record of this process: command, commit, changed tracked files, machine, date.

    `commit` is None outside a git checkout; `uncommitted` lists tracked files that differ from it
    (the figure then measured code that no commit holds exactly).
    """
    argv = sys.argv if argv is None else argv
    script = argv[0] if argv else ""
    if script.endswith(".py"):
        with contextlib.suppress(ValueError):  # a script outside the repository keeps its own path
            script = str(Path(script).resolve().relative_to(REPO))
    command = shlex.join(["python", script, *argv[1:]])
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in status.splitlines()] if status else []
    record = {
        "command": command,
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted": changed[:MAX_LISTED],
        "uncommitted_count": len(changed),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        record["machine"]["torch"] = torch.__version__
        record["machine"]["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            record["machine"]["gpu"] = torch.cuda.get_device_name()
    return record
