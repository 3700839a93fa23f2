"""Calibration samples as token tensors, deterministic for a seed.

Two document-boundary policies, as the reference implementations do it:
  - "concat" (AWQ): documents in a seeded shuffled order are tokenized and concatenated, then cut into
    `seqlen` blocks (the remainder dropped);
  - "windows" (GPTQ): each sample is a random `seqlen` window from a random document longer than
    `seqlen` tokens (documents drawn with replacement, as GPTQ's `get_c4` does).
"""

from __future__ import annotations

import random

from qserve.calib_data.sources import load_documents
from qserve.errors import DataSourceError

MODES = ("concat", "windows")


def _tokenize(tokenizer, text: str) -> list[int]:
    # No BOS/EOS: calibration blocks are cut from running text, not from whole prompts.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def get_calib_samples(
    source: str,
    tokenizer,
    n_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    mode: str = "concat",
    text_field: str = "text",
):
    """LongTensor [n_samples, seqlen] of calibration tokens from `source`."""
    import torch

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got n_samples={n_samples}, seqlen={seqlen}")
    docs = load_documents(source, text_field)
    rng = random.Random(seed)
    if mode == "concat":
        rows = _concat_blocks(docs, tokenizer, n_samples, seqlen, rng, source)
    else:
        rows = _random_windows(docs, tokenizer, n_samples, seqlen, rng, source)
    return torch.tensor(rows, dtype=torch.long)


def _concat_blocks(docs, tokenizer, n_samples, seqlen, rng, source) -> list[list[int]]:
    order = list(range(len(docs)))
    rng.shuffle(order)
    need = n_samples * seqlen
    ids: list[int] = []
    for i in order:
        ids += _tokenize(tokenizer, docs[i])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataSourceError(
            f"text source {source!r} has {len(ids)} tokens; {n_samples} samples x {seqlen} tokens need {need}. "
            "Use fewer --n-samples, a shorter --seqlen, or a larger source."
        )
    return [ids[k * seqlen : (k + 1) * seqlen] for k in range(n_samples)]


def _random_windows(docs, tokenizer, n_samples, seqlen, rng, source) -> list[list[int]]:
    # Tokenize lazily in a seeded order and keep the long-enough documents; drawing windows only
    # from those keeps the result a function of (source, tokenizer, seed) alone.
    order = list(range(len(docs)))
    rng.shuffle(order)
    long_docs: list[list[int]] = []
    for i in order:
        ids = _tokenize(tokenizer, docs[i])
        if len(ids) > seqlen:
            long_docs.append(ids)
        if len(long_docs) >= 4 * n_samples:  # enough variety; avoid tokenizing a huge corpus
            break
    if not long_docs:
        raise DataSourceError(
            f"no document in {source!r} is longer than seqlen={seqlen} tokens, which GPTQ-style window sampling "
            "needs. Use a shorter --seqlen or the 'concat' calibration mode."
        )
    rows = []
    for _ in range(n_samples):
        ids = long_docs[rng.randrange(len(long_docs))]
        start = rng.randrange(len(ids) - seqlen)
        rows.append(ids[start : start + seqlen])
    return rows
