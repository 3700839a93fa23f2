"""bench/serve.py against a live server over the fake engine: the arithmetic of its metrics."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from server_testing import serve_in_thread

from qserve.serve.api.app import create_app

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_bench_reports_vllm_metrics(bench, tokenizer, tmp_path):
    if not Path(bench.DEFAULT_DATASET).is_file():
        pytest.skip(f"ShareGPT data not at {bench.DEFAULT_DATASET}")
    engine = FakeEngine(tokenizer, delay=0.005, max_model_len=4096)
    out = tmp_path / "r.json"
    with serve_in_thread(create_app(engine, ["tiny"])) as url:
        summary = bench.main(["--base-url", url, "--model", "tiny", "--num-prompts", "6", "--max-tokens", "8",
                              "--request-rate", "50", "--ignore-eos", "--result-file", str(out)])  # fmt: skip
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 6 * 8  # every answer is longer than 8 tokens, capped
    saved = json.loads(out.read_text())
    reqs = saved["requests"]
    # 8 tokens arrive in at most 8 chunks (fewer if the server coalesced outputs for a lagging reader).
    assert len(reqs) == 6 and all(1 <= len(r["itl"]) + 1 <= 8 and r["output_tokens"] == 8 for r in reqs)
    tpot = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) * 1000 for r in reqs]
    assert summary["mean_tpot_ms"] == pytest.approx(sum(tpot) / 6)
    assert summary["mean_ttft_ms"] == pytest.approx(1000 * sum(r["ttft"] for r in reqs) / 6)
    assert summary["output_throughput"] == pytest.approx(48 / summary["duration"])
    assert summary["total_input_tokens"] == sum(len(c[0]) for c in engine.calls)
    for key in ("median_itl_ms", "p99_e2el_ms", "request_throughput", "total_token_throughput"):
        assert summary[key] > 0
