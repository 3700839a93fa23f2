"""qserve.provenance: the command, commit and machine a benchmark JSON records."""

from __future__ import annotations

import subprocess

from qserve import provenance


def test_describe_run_records_command_commit_and_machine():
    rec = provenance.describe_run(["bench/quality.py", "--methods", "awq,gptq", "--workdir", "/tmp/a b"])
    assert rec["command"] == "python bench/quality.py --methods awq,gptq --workdir '/tmp/a b'"
    head = subprocess.run(
        ["git", "-C", str(provenance.REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert rec["commit"] == head and len(head) == 40
    assert isinstance(rec["uncommitted"], list) and rec["uncommitted_count"] >= len(rec["uncommitted"])
    assert rec["machine"]["cpu"] and rec["machine"]["logical_cpus"] >= 1
    assert rec["date"].endswith("Z")


def test_script_path_is_made_relative_to_the_repository():
    rec = provenance.describe_run([str(provenance.REPO / "bench" / "throughput.py"), "--threads", "2"])
    assert rec["command"] == "python bench/throughput.py --threads 2"


def test_a_modified_tracked_file_is_listed_whole(tmp_path, monkeypatch):
    """In a checkout with an unstaged change (status line " M f.txt"), the path comes back intact."""

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one")
    (tmp_path / "f.txt").write_text("b\n")
    (tmp_path / "new.txt").write_text("untracked files are not listed\n")
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    rec = provenance.describe_run(["x.py"])
    assert rec["uncommitted"] == ["f.txt"] and rec["uncommitted_count"] == 1
    assert rec["commit"] == provenance._git("rev-parse", "HEAD") and len(rec["commit"]) == 40


def test_changed_tracked_files_are_listed(monkeypatch):
    """A figure measured on uncommitted code says so: the status lines become paths."""
    monkeypatch.setattr(
        provenance, "_git", lambda *a: " M serve/engine.py\nM  bench/serve.py" if a[0] == "status" else "abc"
    )
    rec = provenance.describe_run(["x.py"])
    assert rec["uncommitted"] == ["serve/engine.py", "bench/serve.py"] and rec["commit"] == "abc"


def test_outside_a_git_checkout_commit_is_none(monkeypatch):
    monkeypatch.setattr(provenance, "_git", lambda *a: None)
    rec = provenance.describe_run(["x.py"])
    assert rec["commit"] is None and rec["uncommitted"] == [] and rec["uncommitted_count"] == 0
