"""The documents the code cites exist in the repository, say what the code does, and the results they
point to are committed files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qserve.kernels import packing
from qserve.quantize.config import QuantConfig
from qserve.quantize.export import quantization_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("*.py", "*.md", "*.yaml", "*.sh", "*.toml")
SKIP_DIRS = {".venv", ".git", "qserve.egg-info", "runs", "node_modules", "__pycache__"}


def _repo_files() -> list[Path]:
    files = []
    for pattern in SOURCES:
        for path in REPO.rglob(pattern):
            if not SKIP_DIRS & set(path.relative_to(REPO).parts):
                files.append(path)
    return files


def test_every_cited_doc_exists():
    cited: dict[str, list[str]] = {}
    for path in _repo_files():
        for name in re.findall(r"\bdocs/[\w.-]+\.md\b", path.read_text(errors="replace")):
            cited.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert {"docs/formats.md", "docs/benchmarks.md"} <= set(cited)  # the code does cite them
    missing = {name: where for name, where in cited.items() if not (REPO / name).is_file()}
    assert not missing, f"cited but not in the repository: {missing}"


def test_no_citation_of_documents_outside_the_repository():
    old = re.compile(r"shared/docs|\b(FORMATS|BENCHMARKS|ARCHITECTURE|GPU)\.md\b")
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in _repo_files()
        if path.name != "test_docs.py"
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if old.search(line)
    ]
    assert not hits, f"cite docs/*.md instead: {hits}"


def test_results_cite_committed_json_and_every_result_is_cited():
    results_dir = REPO / "bench" / "results"
    text = (REPO / "bench" / "RESULTS.md").read_text() + (REPO / "bench" / "HISTORY.md").read_text()
    linked = set(re.findall(r"\]\((results/[^)]+\.json)\)", text))
    assert linked, "RESULTS.md links no JSON"
    for link in linked:
        assert (REPO / "bench" / link).is_file(), f"RESULTS.md links {link}, which is not committed"
    on_disk = {f"results/{p.name}" for p in results_dir.glob("*.json")}
    mentioned = {f"results/{name}" for name in re.findall(r"results/([\w.-]+\.json)", text)}
    assert on_disk <= mentioned, (
        f"JSON under bench/results/ that RESULTS.md never mentions: {on_disk - mentioned}"
    )


def test_results_evidence_is_never_a_tmp_path():
    """A figure's evidence is a committed JSON (or says it is not in the repository), never /tmp."""
    bad = [
        line
        for line in (REPO / "bench" / "RESULTS.md").read_text().splitlines()
        if re.search(r"JSON: `?/tmp/|\(/tmp/[^)]*\.json\)|\| `?/tmp/[^|]*\.json`? \|", line)
    ]
    assert not bad, bad


def _json_blocks(text: str) -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.S)]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_formats_doc_metadata_has_exactly_the_exported_keys(method):
    blocks = _json_blocks((REPO / "docs" / "formats.md").read_text())
    documented = [b for b in blocks if b.get("quant_method") == method]
    assert len(documented) == 1
    written = quantization_config(QuantConfig(model="m", method=method, output="o", group_size=64))
    assert list(documented[0]) == list(written)  # same keys, same order
    assert documented[0]["checkpoint_format" if method == "gptq" else "version"] == (
        "gptq" if method == "gptq" else "gemm"
    )


def test_formats_doc_examples_match_the_packing_code():
    import torch

    text = (REPO / "docs" / "formats.md").read_text()
    codes = torch.arange(8, dtype=torch.int32)
    gptq_word = packing.pack_rows(codes.reshape(8, 1), 4).item() & 0xFFFFFFFF
    awq_word = packing.pack_cols(codes.reshape(1, 8), 4, packing.AWQ_ORDER).item() & 0xFFFFFFFF
    assert f"0x{gptq_word:08x}" in text and f"0x{awq_word:08x}" in text
    assert str(packing.AWQ_ORDER) in text and str(packing.AWQ_REVERSE_ORDER) in text
