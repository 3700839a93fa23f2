"""Every finding code the validator can emit is documented in qserve.validate.codes, and vice versa."""

from __future__ import annotations

import ast
from pathlib import Path

import qserve.validate
from qserve.validate.codes import CODES

CONSTRUCTORS = {"error", "warning", "info", "make", "_count"}  # make: error or warning


def emitted_codes() -> set[str]:
    codes = set()
    for path in Path(qserve.validate.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            first = node.args[0]
            if name in CONSTRUCTORS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                codes.add(first.value)
    return codes


def test_every_emitted_code_is_documented_and_every_documented_code_is_emitted():
    emitted = emitted_codes()
    assert len(emitted) > 30  # the scan itself works
    assert emitted - CODES.keys() == set(), "undocumented codes"
    assert CODES.keys() - emitted == set(), "documented codes nothing emits"
