"""`qserve serve` flags, `--config` merging, and the refusal of a checkpoint that fails validation."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from qserve.commands import serve as serve_cmd
from qserve.errors import ConfigError, RecipeError
from qserve.serve.api.config import ServeConfig, parse_bytes


@pytest.fixture
def captured(monkeypatch):
    """Runs the click command up to the config; records it instead of starting a server."""
    seen = []
    monkeypatch.setattr(serve_cmd, "run_server", seen.append)
    monkeypatch.delenv("QSERVE_API_KEY", raising=False)

    def invoke(*args, env=None):
        result = CliRunner().invoke(serve_cmd.serve, list(args), env=env, catch_exceptions=True)
        return result, (seen[-1] if seen else None)

    return invoke


def test_flags_use_vllm_names(captured):
    result, cfg = captured("/m", "--host", "0.0.0.0", "--port", "9000", "--served-model-name", "a", "--served-model-name",
                           "b", "--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
                           "--block-size", "32", "--gpu-memory-utilization", "0.5", "--kv-cache-memory", "2GiB",
                           "--max-queue", "3", "--log-level", "debug", "--dtype", "bfloat16", "--device", "cpu",
                           "--no-enable-prefix-caching")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (cfg.host, cfg.port, cfg.model_names, cfg.max_model_len) == ("0.0.0.0", 9000, ["a", "b"], 256)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.block_size) == (8, 512, 32)
    assert cfg.kv_cache_memory == 2 * 1024**3 and cfg.max_queue == 3 and cfg.gpu_memory_utilization == 0.5
    assert (cfg.log_level, cfg.dtype, cfg.device, cfg.enable_prefix_caching) == (
        "debug",
        "bfloat16",
        "cpu",
        False,
    )
    args = cfg.engine_args()
    assert (args.max_waiting, args.max_num_seqs, args.block_size, args.validate) == (3, 8, 32, False)


def test_long_prefill_token_threshold_flag(captured):
    result, cfg = captured("/m", "--long-prefill-token-threshold", "64")
    assert result.exit_code == 0, result.output
    assert cfg.engine_args().long_prefill_token_threshold == 64
    _, cfg = captured("/m")
    assert cfg.long_prefill_token_threshold == 0  # no cap unless asked, as in vLLM
    result, _ = captured("/m", "--long-prefill-token-threshold", "-1")
    assert result.exit_code != 0 and "long_prefill_token_threshold" in str(result.exception)


def test_defaults_and_served_name(captured):
    _, cfg = captured("./model-awq")
    assert cfg.model_names == ["./model-awq"] and cfg.port == 8000 and cfg.host == "127.0.0.1"
    assert cfg.api_key is None and cfg.max_queue == 256


def test_api_key_from_environment(captured):
    _, cfg = captured("/m", env={"QSERVE_API_KEY": "k1"})
    assert cfg.api_key == "k1"
    _, cfg = captured("/m", "--api-key", "k2", env={"QSERVE_API_KEY": "k1"})
    assert cfg.api_key == "k2"


def test_empty_api_key_is_refused(captured):
    result, _ = captured("/m", env={"QSERVE_API_KEY": " "})
    assert isinstance(result.exception, ConfigError) and "api_key" in str(result.exception)


def test_config_file_merges_under_explicit_flags(captured, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: /from/config\nport: 9100\nmax_num_seqs: 4\nserved_model_name: cfg-name\n")
    _, cfg = captured("--config", str(path), "--port", "9200")
    assert cfg.model == "/from/config" and cfg.port == 9200 and cfg.max_num_seqs == 4
    assert cfg.model_names == ["cfg-name"]
    path.write_text("serve:\n  model: /nested\n")  # a recipe's serve: section
    assert captured("--config", str(path))[1].model == "/nested"


@pytest.mark.parametrize(
    ("text", "error", "needle"),
    [
        ("prot: 1\n", RecipeError, "prot"),
        ("- 1\n", RecipeError, "mapping"),
        ("port: true\n", ConfigError, "port"),
        ("port: 70000\n", ConfigError, "port"),
        ("dtype: fp8\n", ConfigError, "dtype"),
    ],
)
def test_bad_config_files(captured, tmp_path, text, error, needle):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    result, _ = captured("/m", "--config", str(path))
    assert isinstance(result.exception, error) and needle in str(result.exception)


def test_missing_model_is_a_config_error(captured):
    result, _ = captured()
    assert isinstance(result.exception, ConfigError) and "MODEL" in str(result.exception)


@pytest.mark.parametrize(
    ("text", "value"), [("1073741824", 2**30), ("4GiB", 4 * 2**30), ("512M", 512 * 2**20), ("1.5k", 1536)]
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_nonsense():
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        parse_bytes("lots")


def test_api_key_never_in_to_dict():
    assert "api_key" not in ServeConfig(model="m", api_key="secret").to_dict()


def test_chat_template_inline_or_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert serve_cmd.load_chat_template(str(path)) == "{{ messages }}"
    assert serve_cmd.load_chat_template("{% for m in messages %}{% endfor %}").startswith("{%")
    with pytest.raises(ConfigError, match="chat-template"):
        serve_cmd.load_chat_template(str(tmp_path / "missing.jinja"))


def test_broken_checkpoint_is_refused_with_its_report(tiny_llama_dir, tmp_path, capsys):
    from qserve.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(broken)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "refusing to serve" in err and "LINEAR_NOT_QUANTIZED" in err and "Traceback" not in err


def test_unquantized_checkpoint_passes_the_check(tiny_llama_dir):
    assert "unquantized" in serve_cmd.check_checkpoint(tiny_llama_dir)
