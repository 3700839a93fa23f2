"""deploy/docker: both Dockerfiles pass hadolint and hold what the deployment relies on (non-root numeric
user matching the Kubernetes securityContext, the model volume, the port, a /health check, `qserve serve`
as the command); the files they COPY are enough to build qserve's wheel. No Docker daemon here: the
images themselves are not built by these tests."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from conftest import DEPLOY, K8S, ROOT, tool

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, vendored by pip
    from pip._vendor import tomli as tomllib

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*[!e]"))  # not the .dockerignore files


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def last(path: Path, keyword: str) -> str:
    found = [args for kw, args in instructions(path) if kw == keyword]
    assert found, f"{path.name}: no {keyword}"
    return found[-1]


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        if any(fnmatch(part, pattern) for part in [path, *Path(path).parts]):
            result = not negate
    return result


def ignore_patterns(dockerfile: Path) -> list[str]:
    text = Path(f"{dockerfile}.dockerignore").read_text()
    return [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_contract(dockerfile):
    steps = instructions(dockerfile)
    kinds = [kw for kw, _ in steps]
    assert kinds[0] == "FROM" and kinds.count("FROM") == 1
    user = last(dockerfile, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), f"USER {user}: a numeric, non-root user"
    assert kinds.index("USER") > max(i for i, kw in enumerate(kinds) if kw == "RUN"), "RUN steps after USER"
    pod = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert (int(uid), int(gid)) == (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    assert "/models" in json.loads(last(dockerfile, "VOLUME"))
    assert last(dockerfile, "EXPOSE") == "8000"
    health = last(dockerfile, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in health and "CMD" in health
    assert json.loads(last(dockerfile, "ENTRYPOINT")) == ["qserve"]
    for kw, args in steps:
        assert not (kw == "ADD" and re.search(r"https?://", args)), f"ADD of a URL: {args}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_default_command_is_one_qserve_serve_accepts(dockerfile):
    from qserve.commands.serve import build_config, serve

    args = json.loads(last(dockerfile, "CMD"))
    assert args[0] == "serve"
    ctx = serve.make_context("serve", args[1:])
    params = dict(ctx.params)
    model, config_file = params.pop("model"), params.pop("config_file")
    params["served_model_name"] = tuple(params["served_model_name"])
    cfg = build_config(ctx, model, config_file, params)
    assert (cfg.host, cfg.port, cfg.model) == ("0.0.0.0", 8000, "/models/model")
    assert cfg.device == ("cuda" if dockerfile.name.endswith("cuda") else "auto")


def copied_sources(dockerfile: Path) -> list[str]:
    sources = []
    for kw, args in instructions(dockerfile):
        if kw == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copies_every_package_folder_and_nothing_ignored(dockerfile):
    sources = copied_sources(dockerfile)
    patterns = ignore_patterns(dockerfile)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source, patterns), f"COPY {source}: excluded by the .dockerignore"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= set(sources), f"package folders not copied: {folders - set(sources)}"
    assert pyproject["project"]["readme"] in sources
    assert ignored(".venv", patterns) and ignored(".git", patterns) and ignored("runs", patterns)


def test_cpu_image_pins_the_torch_that_bootstrap_installs():
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pin = re.search(r'CPU build (torch==[\d.]+)', bootstrap).group(1)
    assert f'"{pin}" --index-url https://download.pytorch.org/whl/cpu' in (DEPLOY / "docker" / "Dockerfile.cpu").read_text()


def test_copied_files_build_a_complete_wheel(tmp_path):
    """The build context the Dockerfile sees (its COPY sources, less the .dockerignore) builds qserve's
    wheel, with the server, the CLI and the C++ kernel sources in it."""
    dockerfile = DEPLOY / "docker" / "Dockerfile.cpu"
    patterns = ignore_patterns(dockerfile)
    context = tmp_path / "context"
    for source in copied_sources(dockerfile):
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=lambda d, names: [
                n for n in names if ignored(n, patterns)])  # fmt: skip
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(src, context / source)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"),
         str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "w").glob("qserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("qserve/cli.py", "qserve/commands/serve.py", "qserve/serve/api/app.py", "qserve/serve/engine.py",
                   "qserve/validate/__init__.py", "qserve/kernels/cpu_ext.py"):  # fmt: skip
        assert needed in names, needed
    assert any(n.startswith("qserve/kernels/csrc/") and n.endswith(".cpp") for n in names)
    assert not any("__pycache__" in n for n in names)
