"""Lazy access to tensor data across weight files, for `--deep`."""

from __future__ import annotations

import contextlib

from qserve.validate.files import CheckpointDir
from qserve.validate.inventory import TensorInventory


class TensorReader:
    """Lazily opened safe_open handles, one per weight file, closed together."""

    def __init__(self, cdir: CheckpointDir, inventory: TensorInventory):
        self._cdir, self._inventory = cdir, inventory
        self._handles: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            path = self._cdir.resolve(file).path
            self._handles[file] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[file]

    def full(self, name: str):
        return self.handle(self._inventory.tensors[name].file).get_tensor(name)

    def columns(self, name: str, stop: int):
        return self.handle(self._inventory.tensors[name].file).get_slice(name)[:, :stop]

    def rows(self, name: str, start: int, stop: int):
        return self.handle(self._inventory.tensors[name].file).get_slice(name)[start:stop]
