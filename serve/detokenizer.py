"""Incremental detokenization and stop strings, one `IncrementalDetokenizer` per output sequence.

Decoding token by token is wrong in two ways: byte-level BPE splits a multi-byte character over
several tokens (each alone decodes to U+FFFD), and SentencePiece drops the leading space of a word
decoded without its left neighbour. So, as vLLM's `detokenize_incrementally` does, each step decodes
a short window `ids[prefix_offset:]` and emits only what it adds beyond `ids[prefix_offset:read_offset]`,
and holds text back while the window still ends in U+FFFD (an unfinished character).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"
# Context tokens taken from the prompt so the first output token decodes as it would mid-text.
INITIAL_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decode window (context only)
        self.read_offset = len(self.ids)  # tokens before this have been emitted as text
        self.text = ""  # output text so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Append tokens and return the text they complete (possibly '' while a character is split)."""
        self.ids.extend(new_token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        new_text = window_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # Only the decode window is needed from here on; drop the rest so memory stays O(window).
        if self.prefix_offset > 0:
            del self.ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """At the end of the sequence, emit text still held back (an incomplete character decodes as
        U+FFFD, exactly as decoding the whole output at once would)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset :])
        new_text = window_text[len(prefix_text) :] if len(window_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += new_text
        return new_text


def find_stop_string(
    text: str, num_new_chars: int, stops: Sequence[str], include_stop: bool
) -> tuple[str, int] | None:
    """The first stop string that appears in the text ending with the latest `num_new_chars`
    characters, and the length to cut `text` to (after the stop string when `include_stop`)."""
    best: tuple[str, int, int] | None = None
    for stop in stops:
        # A match must end inside the new text, so only search from where such a match could start.
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop, index, index + len(stop) if include_stop else index)
    return None if best is None else (best[0], best[2])


def stop_holdback(stops: Sequence[str]) -> int:
    """Characters to withhold from a stream: the longest proper prefix of a stop string that could
    still turn into a full match and be cut from the text."""
    return max((len(s) - 1 for s in stops), default=0)
