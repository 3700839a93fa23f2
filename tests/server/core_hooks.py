"""Engine hooks for tests of the engine core process (serve/engine_core.py). A hook runs inside the core
process, so it must be importable there by name: it lives in this module, not in a test."""

from __future__ import annotations

import time

STEP_S = 0.05  # long enough that one step is clearly more than the IPC round trip on a busy machine


def slow_steps(engine) -> None:
    """Every step takes at least STEP_S (the tiny model's steps otherwise take a millisecond or two)."""
    real = engine.runner.execute

    def execute(scheduled, states):
        time.sleep(STEP_S)
        return real(scheduled, states)

    engine.runner.execute = execute
