import json

import pytest

from qserve.calib_data import check_source, get_calib_samples, load_documents, load_eval_rows
from qserve.errors import DataSourceError
from qserve.testing import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture()
def corpus(tmp_path):
    docs = [f"Document {i}: " + " ".join(f"word{j}" for j in range(40 + 7 * i)) for i in range(12)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    return path, docs


@pytest.mark.parametrize("mode", ["concat", "windows"])
def test_deterministic_and_shaped(tok, corpus, mode):
    path, _ = corpus
    a = get_calib_samples(str(path), tok, n_samples=5, seqlen=24, seed=3, mode=mode, text_field="body")
    b = get_calib_samples(str(path), tok, n_samples=5, seqlen=24, seed=3, mode=mode, text_field="body")
    c = get_calib_samples(str(path), tok, n_samples=5, seqlen=24, seed=4, mode=mode, text_field="body")
    assert a.shape == (5, 24) and a.dtype.is_floating_point is False
    assert (a == b).all()
    assert not (a == c).all(), "a different seed must give different samples"


def test_concat_blocks_are_contiguous_text(tok, corpus):
    path, docs = corpus
    x = get_calib_samples(str(path), tok, n_samples=3, seqlen=16, seed=0, mode="concat", text_field="body")
    # Consecutive blocks continue the same token stream: decoding them back gives text from the corpus.
    text = tok.decode(x.flatten().tolist())
    assert "word" in text and any(text[:30].strip()[:10] in d for d in docs)


def test_windows_come_from_one_document(tok, corpus):
    path, docs = corpus
    x = get_calib_samples(str(path), tok, n_samples=4, seqlen=20, seed=1, mode="windows", text_field="body")
    doc_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    for row in x.tolist():
        assert any(any(ids[s : s + 20] == row for s in range(len(ids) - 19)) for ids in doc_ids), (
            "each window must be a contiguous slice of a single document"
        )


def test_too_short_source(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("only a few words here")
    with pytest.raises(DataSourceError, match="need"):
        get_calib_samples(str(p), tok, n_samples=4, seqlen=64, mode="concat")
    with pytest.raises(DataSourceError, match="longer than seqlen"):
        get_calib_samples(str(p), tok, n_samples=4, seqlen=64, mode="windows")


def test_missing_source_names_places(tmp_path, monkeypatch):
    monkeypatch.setenv("QSERVE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataSourceError) as exc:
        check_source(str(tmp_path / "missing.jsonl"))
    assert "missing.jsonl" in str(exc.value) and "Presets" in str(exc.value)
    with pytest.raises(DataSourceError) as exc:
        check_source("c4")
    msg = str(exc.value)
    assert "nowhere" in msg and ("datasets" in msg or "allenai/c4" in msg)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_missing_preset_fails_up_front(tmp_path, monkeypatch, var):
    # With `datasets` installed a missing preset would fall back to the hub and fail only at load
    # time; offline, the error must come before any model work and say why the hub was not tried.
    import qserve.calib_data.sources as sources

    monkeypatch.setenv("QSERVE_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(sources, "_datasets_available", lambda: True)
    monkeypatch.setenv(var, "1")
    with pytest.raises(DataSourceError) as exc:
        check_source("c4")
    assert var in str(exc.value) and "nowhere" in str(exc.value)
    monkeypatch.delenv(var)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert check_source("c4").hub is not None  # online with datasets: the hub is the fallback


def test_file_kinds_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "json one"}, "json two"]))
    (tmp_path / "c.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two"}\n')
    docs = load_documents(str(tmp_path))
    assert docs == [
        "first paragraph\nstill first",
        "second paragraph",
        "json one",
        "json two",
        "line one",
        "line two",
    ]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(DataSourceError, match=r"bad\.jsonl:1"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_presets_resolve_to_shared_data():
    # The repository's sibling ../shared/data holds the presets on this machine and in CI.
    assert check_source("c4").paths[0].name.startswith("c4_en_train")
    rows = load_eval_rows("wikitext2")
    assert len(rows) == 4358 and rows[0] == "" and rows[1].startswith(" = Robert Boulter")
