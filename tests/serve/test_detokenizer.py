"""Incremental detokenization (multi-byte characters, special tokens) and stop-string cutting."""

from __future__ import annotations

import pytest

from qserve.serve.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback
from qserve.testing import make_tiny_tokenizer

TEXT = "Héllo wörld, naïve café, 東京 🙂 and the quick brown fox"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def stream(tok, prompt_ids, ids, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
    pieces = [detok.step([t]) for t in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


def test_streamed_pieces_rebuild_the_text_and_never_split_a_character(tok):
    prompt = tok("The capital of France").input_ids
    ids = tok(TEXT).input_ids
    # The byte-level tokenizer splits multi-byte characters: some tokens alone are not valid UTF-8.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    pieces = stream(tok, prompt, ids)
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # text was held back while a character was incomplete


def test_held_back_bytes_are_emitted_at_the_end(tok):
    ids = tok("🙂").input_ids
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [], True)
    assert detok.step(ids[:1]) == ""
    # A sequence that stops mid-character (max_tokens) ends with what decoding all tokens gives.
    assert detok.flush() == tok.decode(ids[:1])


def test_special_tokens_are_skipped_or_kept(tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [*tok("Paris.").input_ids, eos]
    assert "".join(stream(tok, [], ids, skip_special_tokens=True)) == "Paris."
    assert "".join(stream(tok, [], ids, skip_special_tokens=False)) == "Paris.<|im_end|>"


def test_find_stop_string_cuts_at_the_earliest_match_in_the_new_text():
    text = "abc STOP def END"
    assert find_stop_string(text, 3, ["END", "STOP"], include_stop=False) == ("END", 13)
    assert find_stop_string(text, 3, ["END"], include_stop=True) == ("END", 16)
    # Both end inside the new text: the earlier one wins.
    assert find_stop_string(text, 12, ["END", "STOP"], include_stop=False) == ("STOP", 4)
    # A match entirely inside old text was already checked on an earlier step.
    assert find_stop_string(text, 3, ["STOP"], include_stop=False) is None
    # A match that straddles the boundary between old and new text is found.
    assert find_stop_string("abc ST", 2, ["ST"], include_stop=False) == ("ST", 4)
    assert find_stop_string("abc STOP", 2, ["STOP"], include_stop=False) == ("STOP", 4)


def test_stop_holdback_is_longest_stop_minus_one():
    assert stop_holdback(()) == 0
    assert stop_holdback(("ab", "abcd")) == 3
