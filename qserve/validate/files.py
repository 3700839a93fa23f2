"""The checkpoint directory as untrusted input: contained paths and bounded JSON.

A downloaded checkpoint may be hostile. Every file the validator opens goes through `CheckpointDir`:
a name must resolve inside the directory (a symlink pointing elsewhere is reported, never followed),
must be a regular file (a FIFO named config.json would block a read forever), and JSON is read with
a byte cap and a container cap before it is parsed, so a JSON bomb costs a bounded amount of memory.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from qserve.errors import CheckpointError
from qserve.validate.report import Finding, error

CONFIG_JSON_MAX_BYTES = 4 * 2**20  # real config / quantize_config files are a few KB
INDEX_JSON_MAX_BYTES = 16 * 2**20  # the largest real index (~90k tensors) is under 10 MB
JSON_MAX_CONTAINERS = 100_000  # objects + arrays; each costs ~100 bytes once parsed


@dataclass(frozen=True)
class Resolved:
    """A name inside the checkpoint: `path` is set when it is safe to open, else `finding` says why."""

    name: str
    path: Path | None
    finding: Finding | None = None

    @property
    def exists(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class CheckpointDir:
    root: Path  # resolved
    allowed: tuple[Path, ...]  # resolved trees a symlink may point into

    @classmethod
    def open(cls, path: str | os.PathLike) -> CheckpointDir:
        p = Path(path)
        try:
            exists, is_dir = p.exists(), p.is_dir()
        except OSError as exc:  # e.g. a parent directory without search permission
            raise CheckpointError(f"{p}: cannot access the directory ({exc.strerror})") from exc
        if not exists:
            raise CheckpointError(f"{p}: no such directory; pass the checkpoint directory to validate")
        if not is_dir:
            raise CheckpointError(
                f"{p}: not a directory; a checkpoint is a directory holding config.json and *.safetensors"
            )
        root = p.resolve()
        allowed = [root]
        # The Hugging Face cache stores `<repo>/snapshots/<rev>/<file>` as symlinks to `<repo>/blobs/<sha>`:
        # those leave the snapshot directory but stay inside the same repository's blob store.
        if root.parent.name == "snapshots":
            allowed.append(root.parent.parent / "blobs")
        return cls(root=root, allowed=tuple(allowed))

    def listing(self) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(self.root))
        except OSError as exc:
            raise CheckpointError(f"{self.root}: cannot list the directory ({exc.strerror})") from exc

    def resolve(self, name: str) -> Resolved:
        """Resolve `name` (a file name from the directory or from an index) without leaving the tree."""
        if not name or "\x00" in name or Path(name).is_absolute() or ".." in Path(name).parts:
            return Resolved(
                name,
                None,
                error(
                    "PATH_ESCAPE",
                    name,
                    "a file name inside the checkpoint directory",
                    repr(name),
                    "names a path outside the checkpoint directory",
                    "a hostile or broken index; refuse to load this checkpoint",
                ),
            )
        candidate = self.root / name
        if not os.path.lexists(candidate):
            return Resolved(name, None)
        try:
            target = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling link or a link loop
            return Resolved(name, None)
        if not any(target == root or target.is_relative_to(root) for root in self.allowed):
            return Resolved(
                name,
                None,
                error(
                    "SYMLINK_ESCAPE",
                    name,
                    f"a file inside {self.root}",
                    f"a link to {target}",
                    "is a symlink that resolves outside the checkpoint directory; it was not followed",
                    "copy the real file into the directory, or remove the link",
                ),
            )
        return Resolved(name, target)

    def regular_file(self, resolved: Resolved) -> tuple[int | None, Finding | None]:
        """The file's size if it is a regular file, else a finding."""
        assert resolved.path is not None
        try:
            st = os.stat(resolved.path)
        except OSError as exc:
            return None, _unreadable(resolved.name, exc)
        if not stat.S_ISREG(st.st_mode):
            return None, error(
                "FILE_UNREADABLE",
                resolved.name,
                "a regular file",
                "a directory, device or pipe",
                "is not a regular file",
                "replace it with the real file",
            )
        return st.st_size, None

    def read_json(self, name: str, max_bytes: int = CONFIG_JSON_MAX_BYTES) -> tuple[object, list[Finding]]:
        """Parse `name` as JSON within the caps. Returns (value or None, findings); None when absent."""
        resolved = self.resolve(name)
        if not resolved.exists:
            return None, [resolved.finding] if resolved.finding else []
        size, problem = self.regular_file(resolved)
        if problem is not None:
            return None, [problem]
        if size > max_bytes:
            return None, [_bad_json(name, f"{size} bytes, over the {max_bytes}-byte limit", "is too large")]
        try:
            with open(resolved.path, "rb") as fh:
                raw = fh.read(max_bytes + 1)  # the file may grow after stat
        except OSError as exc:
            return None, [_unreadable(name, exc)]
        if len(raw) > max_bytes:
            return None, [_bad_json(name, f"more than {max_bytes} bytes", "is too large")]
        return parse_json_bounded(name, raw)


def parse_json_bounded(name: str, raw: bytes) -> tuple[object, list[Finding]]:
    """json.loads with a container cap (counted before parsing) and every parser failure as a finding."""
    # Counting brackets over-counts those inside strings, which only makes the cap stricter.
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > JSON_MAX_CONTAINERS:
        return None, [
            _bad_json(name, f"{containers} objects/arrays", f"nests over {JSON_MAX_CONTAINERS} containers")
        ]
    try:
        return json.loads(raw.decode("utf-8")), []
    except UnicodeDecodeError as exc:
        return None, [_bad_json(name, f"invalid UTF-8 at byte {exc.start}", "is not UTF-8 text")]
    except RecursionError:
        return None, [_bad_json(name, "nesting deeper than the parser allows", "is nested too deeply")]
    except ValueError as exc:  # JSONDecodeError, and int strings beyond Python's digit limit
        return None, [_bad_json(name, str(exc)[:200], "is not valid JSON")]


def _bad_json(name: str, found: str, message: str) -> Finding:
    return error(
        "JSON_INVALID",
        name,
        "a well-formed JSON file of sane size",
        found,
        message,
        "re-download the file or regenerate it with the tool that wrote the checkpoint",
    )


def _unreadable(name: str, exc: OSError) -> Finding:
    return error(
        "FILE_UNREADABLE",
        name,
        "a readable file",
        exc.strerror or type(exc).__name__,
        "cannot be read",
        "check the file's permissions",
    )
