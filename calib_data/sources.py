"""Text sources for calibration and evaluation: local files, directories, presets, hub datasets.

A source string is one of
  - a preset name (`c4`, `wikitext2-valid`, `shakespeare`, `wikitext2`), resolved to its file under the
    data root ($QSERVE_DATA, else ../shared/data next to the repository), else (online) to the public
    Hugging Face dataset it comes from;
  - a local `.txt`, `.jsonl` or `.json` file, or a directory of those;
  - a Hugging Face dataset id (`org/name` or `org/name:config:split`), loaded with `datasets` when online.
Nothing here imports torch: sources are resolved before any model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qserve.errors import DataSourceError

TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".json")
MAX_TEXT_FILE_BYTES = 2 * 1024**3  # refuse absurd inputs instead of reading them into memory


@dataclass(frozen=True)
class Preset:
    name: str
    relpath: str  # under the data root
    hub: tuple[str, str | None, str]  # (dataset id, config, split) for the online fallback
    hub_files: str | None = None  # data_files pattern where the hub dataset is huge (C4)
    purpose: str = "calibration"


PRESETS: dict[str, Preset] = {
    "c4": Preset(
        "c4",
        "calib/c4/c4_en_train_00000_first1000.jsonl",
        ("allenai/c4", None, "train"),
        hub_files="en/c4-train.00000-of-01024.json.gz",
    ),
    "wikitext2-valid": Preset(
        "wikitext2-valid",
        "calib/wikitext-2-tokens/valid.txt",
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"),
    ),
    "shakespeare": Preset(
        "shakespeare", "calib/tinyshakespeare/input.txt", ("karpathy/tiny_shakespeare", None, "train")
    ),
    "wikitext2": Preset(
        "wikitext2",
        "eval/wikitext-2-raw/wiki.test.raw",
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        purpose="evaluation",
    ),
}


def data_root() -> Path:
    """$QSERVE_DATA, else ../shared/data next to the repository root."""
    env = os.environ.get("QSERVE_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass(frozen=True)
class ResolvedSource:
    """Where the text will be read from: exactly one of `paths` or `hub` is set."""

    spec: str
    paths: tuple[Path, ...] = ()
    hub: tuple[str, str | None, str] | None = None
    hub_files: str | None = None
    kind: str = "documents"  # "documents" (one text per record) or "rows" (wikitext lines)

    def describe(self) -> str:
        """Where the text is read from, for log lines: the file, the directory's file count, or the hub."""
        if self.hub is not None:
            name, config, split = self.hub
            extra = f", {self.hub_files}" if self.hub_files else ""
            return f"Hugging Face dataset {name} ({config or 'default'}, {split}{extra})"
        if len(self.paths) == 1:
            return str(self.paths[0])
        return f"{len(self.paths)} files under {os.path.commonpath([str(p) for p in self.paths])}"


def _is_hub_id(spec: str) -> bool:
    head = spec.split(":")[0]
    parts = head.split("/")
    return len(parts) == 2 and all(parts) and not Path(head).exists()


def _datasets_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None


def _hub_offline() -> str | None:
    """The variable that forbids hub downloads, if one is set (then a hub fallback would only fail later)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _hub_usable(name: str, looked: list[str]) -> bool:
    """Whether a Hugging Face dataset can be fetched; if not, record why in `looked`."""
    offline = _hub_offline()
    if offline:
        looked.append(f"Hugging Face dataset {name} (skipped: {offline} is set)")
        return False
    if not _datasets_available():
        looked.append(f"Hugging Face dataset {name} (needs `pip install datasets` and network)")
        return False
    return True


def resolve_source(spec: str) -> ResolvedSource:
    """Resolve `spec` without reading it; DataSourceError naming every place looked if it is missing."""
    looked: list[str] = []
    if spec in PRESETS:
        preset = PRESETS[spec]
        path = data_root() / preset.relpath
        kind = "rows" if spec.startswith("wikitext2") else "documents"
        if path.is_file():
            return ResolvedSource(spec, paths=(path,), kind=kind)
        looked.append(f"preset file {path}")
        if _hub_usable(preset.hub[0], looked):
            return ResolvedSource(spec, hub=preset.hub, hub_files=preset.hub_files, kind=kind)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            return ResolvedSource(spec, paths=(path,))
        if path.is_dir():
            files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES))
            if files:
                return ResolvedSource(spec, paths=files)
            looked.append(f"directory {path} (no {'/'.join(TEXT_SUFFIXES)} files inside)")
        else:
            looked.append(f"local path {path.resolve()} (does not exist)")
        if _is_hub_id(spec):
            name, _, rest = spec.partition(":")
            config, _, split = rest.partition(":")
            if _hub_usable(name, looked):
                return ResolvedSource(spec, hub=(name, config or None, split or "train"))
    raise DataSourceError(
        f"text source {spec!r} not found. Looked at: {'; '.join(looked)}. "
        f"Presets: {', '.join(PRESETS)} (set QSERVE_DATA to the folder holding them); "
        "or pass a .txt/.jsonl/.json file, a directory of those, or a Hugging Face dataset id."
    )


def check_source(spec: str) -> ResolvedSource:
    """Alias used by the CLI before loading a model: fail fast on a missing source."""
    return resolve_source(spec)


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_TEXT_FILE_BYTES:
        raise DataSourceError(f"{path} is {size / 1e9:.1f} GB; qserve reads at most 2 GB of text per file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _documents_from_file(path: Path, text_field: str) -> list[str]:
    text = _read_text(path)
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            docs.append(_field(record, text_field, f"{path}:{lineno}"))
        return docs
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get(text_field), list):
            data = data[text_field]
        if not isinstance(data, list):
            raise DataSourceError(
                f"{path}: expected a JSON list of strings or of objects with a {text_field!r} field, "
                f"found {type(data).__name__}"
            )
        return [_field(r, text_field, f"{path}[{i}]") for i, r in enumerate(data)]
    # Plain text: paragraphs separated by blank lines are the documents.
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def _field(record, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    raise DataSourceError(
        f"{where}: no string field {text_field!r} (use --text-field to name the field holding the text)"
    )


def _load_hub(src: ResolvedSource, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataSourceError(f"{src.spec}: loading a hub dataset needs `pip install datasets`") from None
    name, config, split = src.hub  # type: ignore[misc]
    try:
        if src.hub_files:
            ds = datasets.load_dataset(name, data_files={split: src.hub_files}, split=split)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset, gated: report what was tried
        raise DataSourceError(
            f"could not load Hugging Face dataset {name} ({config}, {split}): {exc}"
        ) from None
    if text_field not in ds.column_names:
        raise DataSourceError(f"dataset {name} has no column {text_field!r}; columns: {ds.column_names}")
    return list(ds[text_field])


def load_documents(spec: str, text_field: str = "text") -> list[str]:
    """All documents of a source, in a stable order."""
    src = resolve_source(spec)
    if src.hub is not None:
        docs = _load_hub(src, text_field)
    else:
        docs = [d for path in src.paths for d in _documents_from_file(path, text_field)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataSourceError(f"text source {spec!r} holds no text")
    return docs


def load_eval_rows(spec: str = "wikitext2") -> list[str]:
    """Rows for the GPTQ/AWQ perplexity protocol: wikitext lines, blank lines as empty strings."""
    src = resolve_source(spec)
    if src.hub is not None:
        return _load_hub(src, "text")
    rows: list[str] = []
    for path in src.paths:
        if path.suffix in (".txt", ".raw"):
            # Iterate the file as the protocol's reference does (split on "\n" only, keep the newline).
            _read_text(path)  # size and encoding checks
            with path.open(encoding="utf-8") as f:
                rows += [r if r.strip() else "" for r in f]
        else:
            rows += _documents_from_file(path, "text")
    return rows
