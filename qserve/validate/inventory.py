"""Which weight files the checkpoint has, and which tensors they hold (headers only).

With `model.safetensors.index.json` the index is the truth loaders follow: every shard it names must
exist, hold exactly the tensors mapped to it, and no tensor may live in two shards. Without an index,
every top-level `*.safetensors` file is a weight file (AutoGPTQ's `gptq_model-4bit-128g.safetensors`
included).
"""

from __future__ import annotations

from dataclasses import dataclass

from qserve.validate.files import INDEX_JSON_MAX_BYTES, CheckpointDir
from qserve.validate.report import Finding, error, warning
from qserve.validate.safetensors_header import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInventory:
    tensors: dict[str, TensorInfo]  # name -> where it lives (first file wins for duplicates)
    files: tuple[str, ...]  # weight files whose header was read
    sound_files: frozenset[str]  # files whose data may be read (`--deep`)
    indexed: bool
    # Tensors the index places in a shard that could not be read: they exist, but nothing about them
    # can be checked, and their absence from `tensors` is not a finding of its own.
    unavailable: frozenset[str]
    complete: bool  # every weight file's header was read

    def known(self, name: str) -> bool:
        return name in self.tensors or name in self.unavailable


def take_inventory(cdir: CheckpointDir, listing: list[str]) -> tuple[TensorInventory, list[Finding]]:
    findings: list[Finding] = []
    index_map: dict[str, str] | None = None
    if INDEX_NAME in listing:
        raw, problems = cdir.read_json(INDEX_NAME, INDEX_JSON_MAX_BYTES)
        findings += problems
        index_map, problems = _weight_map(raw)
        findings += problems
    local = [n for n in listing if n.endswith(".safetensors")]
    if index_map is not None:
        shard_names = sorted(set(index_map.values()))
        for stale in sorted(set(local) - set(shard_names)):
            findings.append(
                warning(
                    "SHARD_UNREFERENCED",
                    stale,
                    f"only the shards named in {INDEX_NAME}",
                    "a weight file the index does not name",
                    "is not named by the index, so loaders ignore it",
                    "a leftover from another export; delete it",
                )
            )
    else:
        shard_names = local
    tensors: dict[str, TensorInfo] = {}
    read: list[str] = []
    sound: set[str] = set()
    complete = True
    for shard in shard_names:
        header, problems = _read_shard(cdir, shard, index_map is not None)
        findings += problems
        if header is None:
            complete = False
            continue
        read.append(shard)
        if header.sound:
            sound.add(shard)
        for name, info in header.tensors.items():
            if name in tensors:
                findings.append(
                    error(
                        "DUPLICATE_TENSOR",
                        name,
                        "one copy",
                        f"copies in {tensors[name].file} and {shard}",
                        "is stored in two weight files; which copy a loader keeps is arbitrary",
                        "remove the stale file or re-export the checkpoint",
                    )
                )
                continue
            tensors[name] = info
    unavailable: frozenset[str] = frozenset()
    if index_map is not None:
        findings += _cross_check(index_map, tensors, set(read))
        unavailable = frozenset(n for n, shard in index_map.items() if shard not in read and n not in tensors)
    inventory = TensorInventory(
        tensors, tuple(read), frozenset(sound), index_map is not None, unavailable, complete
    )
    return inventory, findings


def _weight_map(raw: object) -> tuple[dict[str, str] | None, list[Finding]]:
    if raw is None:
        return None, []
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        return None, [
            error(
                "INDEX_MISMATCH",
                INDEX_NAME,
                '{"weight_map": {tensor name: shard file}}',
                "no usable weight_map",
                "the index has no usable weight_map; loaders cannot find the shards",
                "regenerate the index (save_pretrained writes it)",
            )
        ]
    return weight_map, []


def _read_shard(cdir: CheckpointDir, shard: str, from_index: bool):
    resolved = cdir.resolve(shard)
    if resolved.finding is not None:
        return None, [resolved.finding]
    if not resolved.exists:
        return None, [
            error(
                "SHARD_MISSING",
                shard,
                f"a weight file named by {INDEX_NAME}" if from_index else "a weight file",
                "no such file",
                "is named by the index but missing",
                "the download is incomplete; fetch the missing shard",
            )
        ]
    size, problem = cdir.regular_file(resolved)
    if problem is not None:
        return None, [problem]
    return read_header(resolved.path, shard, size)


def _cross_check(index_map: dict[str, str], tensors: dict[str, TensorInfo], read: set[str]) -> list[Finding]:
    findings: list[Finding] = []
    for name, shard in sorted(index_map.items()):
        if shard not in read:
            continue  # the shard itself was reported
        info = tensors.get(name)
        if info is None:
            findings.append(
                error(
                    "INDEX_MISMATCH",
                    name,
                    f"in {shard}, as the index says",
                    "in no weight file",
                    f"is listed in the index (shard {shard}) but no weight file holds it",
                    "the index and the shards come from different exports; regenerate the index",
                )
            )
        elif info.file != shard:
            findings.append(
                error(
                    "INDEX_MISMATCH",
                    name,
                    f"in {shard}, as the index says",
                    f"in {info.file}",
                    f"the index maps it to {shard} but it is stored in {info.file}",
                    "regenerate the index",
                )
            )
    for name, info in sorted(tensors.items()):
        if name not in index_map:
            findings.append(
                error(
                    "INDEX_MISMATCH",
                    name,
                    "listed in the index",
                    f"only in {info.file}",
                    "is stored in a shard but missing from the index, so loaders never load it",
                    "regenerate the index",
                )
            )
    return findings
