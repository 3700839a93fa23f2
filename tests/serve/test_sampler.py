"""The sampler on hand-made logits: filters, penalties, seeds, logprobs (no model involved)."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import single_thread  # noqa: F401  (autouse fixture: one torch thread)

from qserve.kernels import cpu_ext
from qserve.serve import sampler as sampler_module
from qserve.serve.sampler import Sampler, SamplingState, apply_penalties
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.sequence import Sequence, StopCriteria

CPU = torch.device("cpu")
VOCAB = 12


@pytest.fixture(params=["fused", "torch"])
def sample_path(request, monkeypatch):
    """Every test through both draws: the C++ pass (`cpu_ext.sample_rows`, where the kernels are built;
    asserted to have run) and torch's exponential race (the CUDA path)."""
    if request.param == "torch":
        monkeypatch.setattr(sampler_module.cpu_ext, "usable", lambda *t: False)
        yield request.param
        return
    if cpu_ext.required():
        assert cpu_ext.available(), cpu_ext.unavailable_reason()
    elif not cpu_ext.available():
        pytest.skip(f"qserve's C++ CPU kernels are unavailable: {cpu_ext.unavailable_reason()}")
    calls = []
    real = cpu_ext.sample_rows
    monkeypatch.setattr(sampler_module.cpu_ext, "sample_rows", lambda *a: calls.append(1) or real(*a))
    yield request.param
    assert calls, "the sampler did not take the C++ pass"


def state(params: SamplingParams, prompt=(1, 2), output=(), seed=None, eos=frozenset({0})) -> SamplingState:
    stop = StopCriteria(100, params.min_tokens, eos, frozenset(params.stop_token_ids), params.ignore_eos)
    seq = Sequence(0, list(prompt), stop)
    for t in output:
        seq.append_token(t)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingState(seq, params, gen)


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


LOGITS = [0.5, 2.0, -1.0, 1.5, 0.0, -0.5, 3.0, 1.0, -2.0, 0.2, 0.1, -3.0]


@pytest.mark.usefixtures("sample_path")
def test_greedy_is_argmax_and_zero_temperature_ignores_filters():
    params = SamplingParams(temperature=0.0, top_k=2, top_p=0.1, min_p=0.5)
    tokens, logprobs = Sampler(CPU)(logits_of(LOGITS, list(reversed(LOGITS))), [state(params), state(params)])
    assert tokens == [6, VOCAB - 1 - 6] and logprobs == [None, None]


def _draw(params: SamplingParams, n: int = 4000, logits=LOGITS) -> torch.Tensor:
    """`n` independent samples (one batch of n identical rows), as a histogram over the vocab."""
    tokens, _ = Sampler(CPU, seed=0)(logits_of(*[logits] * n), [state(params) for _ in range(n)])
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / n


@pytest.mark.usefixtures("sample_path")
def test_sampling_follows_softmax_of_tempered_logits():
    freq = _draw(SamplingParams(temperature=0.7))
    expected = torch.softmax(torch.tensor(LOGITS) / 0.7, dim=-1)
    # 4000 draws: the standard error of each frequency is at most 0.008; 0.03 is ~4 sigma.
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


@pytest.mark.usefixtures("sample_path")
def test_top_k_top_p_min_p_restrict_the_support():
    order = torch.tensor(LOGITS).argsort(descending=True).tolist()  # 6, 1, 3, 7, 0, ...
    assert set(torch.nonzero(_draw(SamplingParams(top_k=3))).flatten().tolist()) == set(order[:3])
    probs = torch.softmax(torch.tensor(LOGITS), dim=-1)
    # top_p 0.8: the smallest set of most likely tokens whose mass reaches 0.8.
    mass = probs[order].cumsum(0)
    keep = order[: int((mass < 0.8).sum()) + 1]
    assert set(torch.nonzero(_draw(SamplingParams(top_p=0.8))).flatten().tolist()) == set(keep)
    # min_p 0.3: tokens with at least 0.3 x the top probability.
    kept = {i for i in range(VOCAB) if probs[i] >= 0.3 * probs.max()}
    assert set(torch.nonzero(_draw(SamplingParams(min_p=0.3))).flatten().tolist()) == kept
    assert torch.nonzero(_draw(SamplingParams(top_k=1, temperature=5.0))).flatten().tolist() == [order[0]]


@pytest.mark.usefixtures("sample_path")
def test_penalties_follow_vllm_semantics():
    logits = logits_of(LOGITS)
    # prompt has token 1 (positive logit) and 2 (negative); output has token 6 twice and 3 once.
    params = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    sampler = Sampler(CPU)
    got = apply_penalties(logits.clone(), [state(params, prompt=(1, 2), output=(6, 3, 6))])[0]
    expected = torch.tensor(LOGITS)
    expected[1] = 2.0 / 2.0  # repetition: positive logits divided (prompt tokens count)
    expected[2] = -1.0 * 2.0  # negative ones multiplied
    expected[6] = 3.0 / 2.0 - 0.5 * 2 - 0.25  # output token twice: frequency x count, presence once
    expected[3] = 1.5 / 2.0 - 0.5 * 1 - 0.25
    torch.testing.assert_close(got, expected)
    assert sampler(logits.clone(), [state(params, output=(6, 3, 6))])[0] == [int(expected.argmax())]


@pytest.mark.usefixtures("sample_path")
def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    eos_first = [5.0] + [0.0] * (VOCAB - 1)
    eos_first[4] = 4.0  # a stop token id, next most likely
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    st = state(params, eos=frozenset({0}))
    assert Sampler(CPU)(logits_of(eos_first), [st])[0] == [1]  # first token that is neither
    st.seq.append_token(7)
    assert Sampler(CPU)(logits_of(eos_first), [st])[0] == [1]
    st.seq.append_token(7)
    assert Sampler(CPU)(logits_of(eos_first), [st])[0] == [0]
    # ignore_eos: EOS is an ordinary token, so min_tokens leaves it alone (only stop ids are masked)
    st = state(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=True))
    assert Sampler(CPU)(logits_of(eos_first), [st])[0] == [0]


@pytest.mark.usefixtures("sample_path")
def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=1.0)
    seq_alone, seq_mixed = [], []
    s1, s2 = state(params, seed=42), state(params, seed=42)
    for step in range(30):
        seq_alone += Sampler(CPU, seed=step)(logits_of(LOGITS), [s1])[0]
        mixed = Sampler(CPU, seed=1000 + step)(
            logits_of(LOGITS, LOGITS, LOGITS), [state(other), s2, state(other)]
        )
        seq_mixed.append(mixed[0][1])
    assert seq_alone == seq_mixed
    assert len(set(seq_alone)) > 2  # it really sampled


@pytest.mark.usefixtures("sample_path")
def test_logprobs_are_raw_log_softmax_with_rank_and_top_k():
    params = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5)
    tokens, lps = Sampler(CPU)(logits_of(LOGITS), [state(params, prompt=(6,))])
    raw = torch.log_softmax(torch.tensor(LOGITS), dim=-1)
    # the penalty moved the argmax off token 6, but logprobs describe the model's raw distribution
    assert tokens == [1]
    lp = lps[0]
    assert lp.logprob == pytest.approx(raw[1].item()) and lp.rank == 2
    assert [t for t, _ in lp.top] == raw.topk(3).indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(raw.topk(3).values.tolist())


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("n", 0), ("max_tokens", 0),
     ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("logprobs", -1), ("stop", [""])],
)  # fmt: skip
def test_sampling_params_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_and_give_siblings_their_own_seed():
    p = SamplingParams(stop="###", stop_token_ids=[3], seed=10, n=3)
    assert p.stop == ("###",) and p.stop_token_ids == (3,)
    assert [p.for_sibling(i).seed for i in range(3)] == [10, 11, 12]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


@pytest.mark.usefixtures("sample_path")
def test_more_rows_than_a_vector_and_a_ragged_vocab_follow_softmax():
    """A 1000-token vocabulary (vector body plus an 8-token tail in the C++ pass) at 3 temperatures,
    with -inf entries: chi-square of 6000 draws against softmax(logits / T)."""
    gen = torch.Generator().manual_seed(7)
    vocab = 1000
    logits = torch.randn(vocab, generator=gen) * 3
    logits[[5, 500, 998]] = float("-inf")
    for temperature in (0.3, 1.0, 2.5):
        n = 6000
        tokens, _ = Sampler(CPU, seed=3)(
            logits.expand(n, vocab).contiguous(),
            [state(SamplingParams(temperature=temperature)) for _ in range(n)],
        )
        counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
        assert counts[[5, 500, 998]].sum() == 0
        expected = torch.softmax(logits.double() / temperature, dim=-1) * n
        # tokens expected fewer than 5 times pooled into one cell, as the test requires
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        dof = len(obs) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, (temperature, chi2, dof)  # ~5 sigma above the mean


@pytest.mark.usefixtures("sample_path")
def test_greedy_rows_take_the_first_of_equal_maxima():
    logits = torch.zeros(3, 40)
    logits[0, [7, 30]] = 1.0  # a tie across vector lanes
    logits[1, [33, 38]] = 2.0  # a tie in the tail
    logits[2, [17, 33]] = 5.0  # lane 1 of the second vector and the tail
    params = SamplingParams(temperature=0.0)
    assert Sampler(CPU)(logits, [state(params) for _ in range(3)])[0] == [7, 33, 17]
