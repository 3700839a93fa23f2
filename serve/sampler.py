"""Turn the step's logits into one token per sampling row, vectorised over the batch.

Order follows vLLM: logprobs are taken from the raw model logits; then the min_tokens mask, the
repetition / presence / frequency penalties, the grammar bitmask of structured-output rows (applied
on the logits' device by a GrammarMasker; the rows accept their sampled token afterwards), and for
non-greedy rows temperature, min-p, top-k and top-p. Sampling uses the exponential-race form of the
categorical draw, argmax(p / q) with q ~ Exp(1), one noise vector per row and token, so a seeded
request's tokens do not depend on which other requests share the batch.

On the CPU (the C++ kernels built) the draw is one fused pass per row, `cpu_ext.sample_rows`: the same
race in log form (Gumbel-max) with noise from a counter-based hash of a per-row, per-token 64-bit key;
a seeded request takes its key from its own `torch.Generator`, the others from the engine's. torch's
sequential generator costs ~34 ns per element for `exponential_` on one thread, which at a 49k
vocabulary made temperature sampling of 40 rows cost 65 ms per step, more than the model's forward.
Elsewhere (CUDA, no C++ kernels) each row draws its vector q with `exponential_` from its generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qserve.kernels import cpu_ext
from qserve.serve.outputs import TokenLogprobs
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.sequence import Sequence
from qserve.serve.structured import GrammarMasker, GrammarState


@dataclass
class SamplingState:
    """What the sampler needs of one sequence: its params, token history and private generator."""

    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None = None  # set for seeded requests
    grammar: GrammarState | None = None  # set for structured-output requests


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        # Unseeded requests share this stream: reproducible per engine run, not per request.
        self.generator = torch.Generator(device).manual_seed(seed)
        self.grammar_masker = GrammarMasker()  # keeps its bitmask buffers from step to step

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingState]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [len(rows), vocab] float32 -> (token id per row, logprobs per row or None)."""
        params = [r.params for r in rows]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = _mask_stop_tokens_before_min(logits, rows)
        if any(p.uses_penalties for p in params):
            logits = apply_penalties(logits, rows)
        constrained = [(i, r.grammar, r.seq.output_token_ids) for i, r in enumerate(rows) if r.grammar]
        self.grammar_masker(logits, constrained)  # disallowed tokens -> -inf, before any filtering
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if cpu_ext.usable(logits) and logits.dim() == 2:
            token_list = self._sample_fused(logits, rows, random_rows)
        else:
            token_list = self._sample_torch(logits, rows, random_rows)
        for i, grammar, _ in constrained:
            grammar.accept(token_list[i])
        if raw_logprobs is None:
            return token_list, [None] * len(rows)
        return token_list, _gather_logprobs(raw_logprobs, token_list, params)

    def _sample_fused(
        self, logits: torch.Tensor, rows: list[SamplingState], random_rows: list[int]
    ) -> list[int]:
        """Greedy and random rows in one C++ pass (`cpu_ext.sample_rows`); filtered rows are tempered and
        masked here first."""
        n = len(rows)
        inv_temp = torch.zeros(n)
        seeds = torch.zeros(n, dtype=torch.int64)
        if random_rows:
            params = [rows[i].params for i in random_rows]
            filtered = [j for j, p in enumerate(params) if p.min_p > 0 or p.uses_top_k or p.top_p < 1.0]
            if filtered:  # temperature and filters applied here: those rows then sample at inv_temp 1
                logits = logits.clone()
                idx = torch.tensor([random_rows[j] for j in filtered])
                logits[idx] = self._filtered_logits(logits[idx], [params[j] for j in filtered])
            done = set(filtered)
            inv_temp[random_rows] = torch.tensor(
                [1.0 if j in done else 1.0 / p.temperature for j, p in enumerate(params)]
            )
            keys = torch.randint(-(2**63), 2**63 - 1, (len(random_rows),), generator=self.generator)
            for j, i in enumerate(random_rows):
                gen = rows[i].generator
                if gen is not None:  # a seeded row's key comes from its own stream: batch-independent
                    keys[j] = torch.randint(-(2**63), 2**63 - 1, (1,), generator=gen)
            seeds[random_rows] = keys
        return cpu_ext.sample_rows(logits.contiguous(), inv_temp, seeds).tolist()

    def _sample_torch(
        self, logits: torch.Tensor, rows: list[SamplingState], random_rows: list[int]
    ) -> list[int]:
        tokens = logits.argmax(dim=-1)
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            chosen = [rows[i] for i in random_rows]
            probs = self._probs(logits[idx], [r.params for r in chosen])
            q = self._exponentials(chosen, probs.shape[1], probs.device)
            tokens[idx] = (probs / q).argmax(dim=-1)
        return tokens.tolist()

    def _probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then min-p, top-k, top-p filtering; returns probabilities [rows, vocab]."""
        return torch.softmax(self._filtered_logits(logits, params), dim=-1)

    def _filtered_logits(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """logits / temperature with the tokens min-p, top-k and top-p exclude set to -inf."""
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        if any(p.min_p > 0 for p in params):
            probs = torch.softmax(logits, dim=-1)
            min_p = torch.tensor([p.min_p for p in params], device=device)
            threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if any(p.uses_top_k or p.top_p < 1.0 for p in params):
            logits = _top_k_top_p(logits, params)
        return logits

    def _exponentials(self, rows: list[SamplingState], vocab: int, device: torch.device) -> torch.Tensor:
        q = torch.empty(len(rows), vocab, device=device)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_(
                generator=self.generator
            )
        for i, r in enumerate(rows):
            if r.generator is not None:
                q[i].exponential_(generator=r.generator)
        return q


def _mask_stop_tokens_before_min(logits: torch.Tensor, rows: list[SamplingState]) -> torch.Tensor:
    """Forbid EOS and stop tokens until min_tokens outputs exist (the scheduler would not stop on
    them, so sampling one would put an end marker in the middle of the text)."""
    for i, r in enumerate(rows):
        if r.seq.num_output_tokens < r.params.min_tokens:
            stop = set(r.seq.stop.stop_token_ids)
            if not r.seq.stop.ignore_eos:
                stop |= r.seq.stop.eos_token_ids
            ids = [t for t in stop if t < logits.shape[1]]
            if ids:
                logits[i, ids] = float("-inf")
    return logits


def _histogram(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Counts [rows, vocab] of each token id per row (ids padded with an extra `vocab` bin, dropped)."""
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), max(width, 1)), vocab, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        padded[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones_like(padded, dtype=counts.dtype, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingState]) -> torch.Tensor:
    """vLLM semantics: repetition over prompt + output tokens (divide positive logits, multiply
    negative ones), frequency per output occurrence, presence once per distinct output token."""
    which = [i for i, r in enumerate(rows) if r.params.uses_penalties]
    idx = torch.tensor(which, device=logits.device)
    vocab, device = logits.shape[1], logits.device
    out_counts = _histogram([rows[i].seq.output_token_ids for i in which], vocab, device)
    in_prompt = _histogram([rows[i].seq.prompt_token_ids for i in which], vocab, device) > 0
    params = [rows[i].params for i in which]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    sub = logits[idx]
    seen = in_prompt | (out_counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * out_counts - pres * (out_counts > 0).float()
    logits[idx] = sub
    return logits


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Per-row top-k (k <= 0: off) and top-p (nucleus; the most likely token always survives)."""
    vocab, device = logits.shape[1], logits.device
    ascending, order = logits.sort(dim=-1)
    k = torch.tensor([p.top_k if p.uses_top_k else vocab for p in params], device=device).clamp(max=vocab)
    kth_largest = ascending.gather(1, (vocab - k)[:, None])  # ties with the k-th value are kept
    ascending = ascending.masked_fill(ascending < kth_largest, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    cumulative = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p  # the low tail whose mass is at most 1 - p
    drop[:, -1] = False
    ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending)


def _gather_logprobs(
    raw_logprobs: torch.Tensor, tokens: list[int], params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    idx = torch.tensor(rows)
    lp = raw_logprobs[idx]  # [m, vocab]
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows])[:, None].to(lp.device))  # [m, 1]
    ranks = (lp > chosen).sum(dim=-1) + 1
    k = max(params[i].logprobs for i in rows)
    top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    out: list[TokenLogprobs | None] = [None] * len(params)
    chosen_l, ranks_l, vals_l, ids_l = (
        chosen[:, 0].tolist(),
        ranks.tolist(),
        top_vals.tolist(),
        top_ids.tolist(),
    )
    for j, i in enumerate(rows):
        n = params[i].logprobs
        top = tuple(zip(ids_l[j][:n], vals_l[j][:n], strict=True))
        out[i] = TokenLogprobs(logprob=chosen_l[j], top=top, rank=ranks_l[j])
    return out
