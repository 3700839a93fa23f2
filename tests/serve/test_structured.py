"""Structured outputs in the engine: grammar compilation and caching, the sampler's token mask, and
outputs of a tiny random model that always satisfy their JSON schema, regex or choice.

A random model produces garbage, so every schema here is bounded (strings have maxLength, arrays
maxItems, numbers bounds, bounded nesting) and max_tokens is generous: each generation must reach the
grammar's end (finish_reason "stop"), which the tests assert before validating.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_checkpoints import single_thread, varied_model  # noqa: F401  (autouse fixture: one thread)

pytest.importorskip("xgrammar", reason="structured outputs need the 'structured' extra (xgrammar)")

from qserve.serve.llm import LLM
from qserve.serve.sampler import Sampler, SamplingState
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.sequence import Sequence, StopCriteria
from qserve.serve.structured import (
    StructuredOutputCompiler,
    StructuredOutputsParams,
    UnsupportedSchemaError,
    check_json_schema,
    choice_grammar,
)
from qserve.testing import make_tiny_tokenizer

MAX_TOKENS = 400
# Two layers x (K, V) x 4 slots x 2 kv heads x 16 dims x 4 bytes: one block of the tiny model.
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return varied_model(tmp_path_factory.mktemp("structured") / "m", "llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_model_len=512, validate=False)


@pytest.fixture(scope="module")
def compiler():
    return StructuredOutputCompiler(make_tiny_tokenizer(), 384, [2])


# ---- a structural JSON-schema validator for the subset generated below (jsonschema is not a dependency)


def validate(value, schema: dict, path: str = "$") -> None:
    """Raise AssertionError naming the path where `value` breaks `schema`."""
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                validate(value, sub, path)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{path}: no anyOf branch matches {value!r}: {errors}")
    if "enum" in schema:
        assert value in schema["enum"] and type(value) in {type(e) for e in schema["enum"]}, (path, value)
    if "const" in schema:
        assert value == schema["const"], (path, value)
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind is not None:
        assert checks[kind](value), f"{path}: expected {kind}, got {value!r}"
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{path}: required property {name!r} missing in {value!r}"
        for name, item in value.items():
            if name in props:
                validate(item, props[name], f"{path}.{name}")
            else:
                assert schema.get("additionalProperties", True) is not False, (
                    f"{path}: extra property {name!r}"
                )
    if kind == "array":
        assert len(value) >= schema.get("minItems", 0), (path, value)
        assert len(value) <= schema.get("maxItems", len(value)), (path, value)
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{path}[{i}]")
    if kind == "string":
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)), (path, value)
    if kind in ("integer", "number"):
        assert value >= schema.get("minimum", value) and value <= schema.get("maximum", value), (path, value)


def test_validator_catches_violations():
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}}, "required": ["a"],
              "additionalProperties": False}  # fmt: skip
    validate({"a": 3}, schema)
    for bad in ({"a": 4}, {}, {"a": 1, "b": 2}, {"a": True}, [1]):
        with pytest.raises(AssertionError):
            validate(bad, schema)


# ---- schema strategy: objects, arrays, enums, nesting, bounded numbers, required / optional ----------

NAMES = st.sampled_from(["id", "name", "tags", "ok", "score", "kind", "x", "y_2"])


@st.composite
def integer_schema(draw):
    lo = draw(st.integers(-1000, 1000))
    return {"type": "integer", "minimum": lo, "maximum": lo + draw(st.integers(0, 500))}


@st.composite
def number_schema(draw):
    lo = draw(st.integers(-50, 50))
    return {"type": "number", "minimum": lo, "maximum": lo + draw(st.integers(1, 100))}


@st.composite
def string_schema(draw):
    hi = draw(st.integers(0, 8))
    return {"type": "string", "minLength": draw(st.integers(0, hi)), "maxLength": hi}


LEAVES = st.one_of(
    integer_schema(),
    number_schema(),
    string_schema(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text("abcxyz_-", min_size=1, max_size=6), min_size=1, max_size=4, unique=True).map(
        lambda e: {"enum": e}
    ),
    st.lists(st.integers(-9, 99), min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
)


@st.composite
def object_schema(draw, children):
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    props = {n: draw(children) for n in names}
    required = [n for n in names if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@st.composite
def array_schema(draw, children):
    hi = draw(st.integers(0, 3))
    return {"type": "array", "items": draw(children), "minItems": draw(st.integers(0, hi)), "maxItems": hi}


SCHEMAS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        object_schema(children),
        array_schema(children),
        st.lists(children, min_size=2, max_size=2).map(lambda s: {"anyOf": s}),
    ),
    max_leaves=5,
)
TOP_SCHEMAS = st.one_of(object_schema(SCHEMAS), array_schema(SCHEMAS))


def _texts(llm, prompt: str, spec: StructuredOutputsParams, **kwargs) -> list:
    params = SamplingParams(max_tokens=MAX_TOKENS, structured_outputs=spec, **kwargs)
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    return out.outputs


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=TOP_SCHEMAS, seed=st.integers(0, 2**16), prompt=st.sampled_from(["The capital of", "0123 {"]))
def test_json_schema_outputs_always_validate(llm, schema, seed, prompt):
    outputs = _texts(llm, prompt, StructuredOutputsParams(json=schema), n=2, temperature=1.0, seed=seed)
    for c in outputs:
        assert c.finish_reason == "stop", f"grammar did not finish within {MAX_TOKENS} tokens: {c.text!r}"
        validate(json.loads(c.text), schema)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pattern=st.sampled_from(
        [
            r"[a-c]{2}\d{1,4}-(yes|no)",
            r"(\+|-)?[0-9]{1,3}\.[0-9]{2}",
            r"[A-Z][a-z]{0,5}( [a-z]{1,4}){0,2}\.",
            r"\d{4}-\d{2}-\d{2}",
            r"(true|false|null)",
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_regex_outputs_always_match(llm, pattern, seed):
    for c in _texts(llm, "Héllo", StructuredOutputsParams(regex=pattern), n=3, temperature=1.0, seed=seed):
        assert c.finish_reason == "stop"
        assert re.fullmatch(pattern, c.text), (pattern, c.text)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    choices=st.lists(
        st.text(min_size=1, max_size=8).filter(lambda s: s.strip(" ") == s),
        min_size=1,
        max_size=5,
        unique=True,
    ),
    seed=st.integers(0, 2**16),
)
def test_choice_outputs_are_one_of_the_choices(llm, choices, seed):
    for c in _texts(llm, "Pick:", StructuredOutputsParams(choice=choices), n=2, temperature=1.0, seed=seed):
        assert c.finish_reason == "stop"
        assert c.text in choices, (choices, c.text)


def test_json_object_is_an_object_or_a_valid_prefix(llm):
    """json_object leaves strings unbounded, so a random model may be cut off by max_tokens; then the
    text must still be a prefix that the grammar accepts (checked with a fresh matcher on its tokens)."""
    import xgrammar as xgr

    outputs = _texts(llm, "{", StructuredOutputsParams(json_object=True), n=4, temperature=1.0, seed=5)
    finished = [c for c in outputs if c.finish_reason == "stop"]
    assert finished, "no json_object output finished"
    for c in finished:
        assert isinstance(json.loads(c.text), dict)
    compiled = llm.engine.structured.compile(StructuredOutputsParams(json_object=True))
    for c in outputs:
        if c.finish_reason == "length":
            matcher = xgr.GrammarMatcher(compiled)
            assert all(matcher.accept_token(t) for t in c.token_ids), c.text


def test_greedy_structured_output_survives_preemption(model_dir, llm):
    """A cache too small for the batch preempts (recomputes) sequences mid-grammar; their matchers
    stay in step, so the outputs equal an unpreempted run's and still validate."""
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer", "minimum": 0,
              "maximum": 99999}, "minItems": 3, "maxItems": 3}, "b": {"type": "string", "maxLength": 4}},
              "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    prompts = ["The capital of France is", "0123", "Quantization maps", "A paged key", "Héllo wörld"]
    params = SamplingParams(
        temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=schema)
    )
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    small = LLM(str(model_dir), max_model_len=96, max_num_seqs=5, max_num_batched_tokens=16, block_size=4,
                kv_cache_memory=24 * BLOCK_BYTES, device="cpu", validate=False)  # fmt: skip
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0, "the cache was big enough: no preemption exercised"
    assert [o.outputs[0].token_ids for o in outs] == reference
    for o in outs:
        validate(json.loads(o.outputs[0].text), schema)


def test_stop_string_cuts_structured_output(llm):
    spec = StructuredOutputsParams(regex=r"ab(cd)+ef")
    (c,) = _texts(llm, "x", spec, temperature=0.0, stop=["cd"])
    assert c.text == "ab" and c.finish_reason == "stop" and c.stop_reason == "cd"


def test_unconstrained_rows_are_untouched_by_the_mask(compiler):
    """The sampler masks only grammar rows: a batch with one constrained and one free row."""
    spec = StructuredOutputsParams(choice=["Paris"])
    state = compiler.new_state(spec)
    stop = StopCriteria(max_tokens=8, eos_token_ids={2})
    rows = [SamplingState(Sequence(0, [5], stop), SamplingParams(temperature=0.0, structured_outputs=spec),
                          grammar=state),
            SamplingState(Sequence(1, [5], stop), SamplingParams(temperature=0.0))]  # fmt: skip
    logits = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    free_choice = int(logits[1].argmax())
    tokens, _ = Sampler(torch.device("cpu"))(logits.clone(), rows)
    assert tokens[1] == free_choice
    tok = make_tiny_tokenizer()
    assert "Paris".startswith(tok.decode([tokens[0]])), tok.decode([tokens[0]])
    assert state.accepted == [tokens[0]]


def test_matcher_rolls_back_and_catches_up(compiler):
    tok = make_tiny_tokenizer()
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"k": {"type": "string"}},
                                         "required": ["k"]})  # fmt: skip
    ids = tok.encode('{"k": "abc"}', add_special_tokens=False)
    state = compiler.new_state(spec)
    state.sync(ids[:4])
    state.sync(ids[:2])  # tokens dropped (rollback)
    state.sync(ids)
    assert state.accepted == ids and state.rejected is None and state.matcher.is_completed()
    state.sync(ids[:3] + tok.encode("}}}", add_special_tokens=False))  # a token the grammar refuses
    assert state.rejected is not None
    bitmask = torch.zeros(1, (384 + 31) // 32, dtype=torch.int32)
    state.fill(bitmask, 0)  # a broken matcher allows only the stop token
    allowed = [t for t in range(384) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]
    assert allowed == [2]


# ---- compilation, caching, refusals -------------------------------------------------------------


def test_grammars_are_cached_by_key(compiler):
    a = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    b = StructuredOutputsParams(json='{"type": "object",\n "properties": {"a": {"type": "integer"}}}')
    assert a == b and hash(a) == hash(b)  # spacing does not matter (key order does: it is output order)
    hits = compiler.hits
    first = compiler.compile(a)
    assert compiler.compile(b) is first and compiler.hits == hits + 1
    prepared = compiler.prepare(a)
    assert prepared.compiled is first and prepared == a


def test_choice_grammar_escapes_quotes_backslashes_and_unicode(compiler):
    choices = ['say "hi"', "back\\slash", "東京\n", "a|b"]
    assert choice_grammar(choices).startswith("root ::= ")
    import xgrammar as xgr

    compiled = compiler.compile(StructuredOutputsParams(choice=choices))
    for c in choices:
        m = xgr.GrammarMatcher(compiled)
        assert m.accept_string(c) and m.is_completed(), c
    m = xgr.GrammarMatcher(compiled)
    assert not (m.accept_string("a") and m.is_completed())


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "number", "multipleOf": 3}, "multipleOf"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "string", "format": "email"}, "format"),
        ({"allOf": [{"type": "integer"}]}, "allOf"),
        ({"$ref": "https://example.com/s.json"}, "$ref"),
        ({"type": "array", "items": {"type": "object", "minProperties": 1}}, "minProperties"),
        ({"anyOf": [{"type": "integer"}, {"if": {}}]}, "if"),
    ],
)
def test_unsupported_keywords_are_refused_by_name(schema, keyword):
    with pytest.raises(UnsupportedSchemaError, match=re.escape(f"'{keyword}'")) as info:
        StructuredOutputsParams(json=schema)
    assert info.value.keyword == keyword


def test_property_names_that_look_like_keywords_are_fine():
    check_json_schema({"type": "object", "properties": {"not": {"type": "string", "format": "date"},
                                                        "allOf": {"$ref": "#/$defs/x"}},
                       "$defs": {"x": {"type": "integer"}}})  # fmt: skip


def test_bad_specs_are_value_errors(compiler):
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{")
    with pytest.raises(ValueError, match="non-empty"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="cannot compile the regex"):
        compiler.compile(StructuredOutputsParams(regex="(unclosed"))
    spec = StructuredOutputsParams(regex="a+")
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, max_tokens=4, structured_outputs=spec)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs=spec)


def test_json_masks_never_allow_raw_control_bytes(compiler):
    """Inside a JSON string xgrammar would allow a token holding a raw control byte (invalid JSON);
    the JSON-only extra mask removes every such token, while a regex may still use them."""
    tok = make_tiny_tokenizer()
    control = [t for t in range(len(tok)) if any(ord(ch) < 0x20 for ch in tok.decode([t]))]
    assert control, "the tiny vocabulary has no control-byte token to test with"
    bitmask = torch.zeros(1, (384 + 31) // 32, dtype=torch.int32)

    def allowed(state) -> set[int]:
        state.fill(bitmask, 0)
        return {t for t in range(384) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1}

    json_state = compiler.new_state(StructuredOutputsParams(json={"type": "string"}))
    json_state.sync(tok.encode('"a', add_special_tokens=False))
    inside = allowed(json_state)
    assert inside and not inside & set(control)
    regex_state = compiler.new_state(StructuredOutputsParams(regex="[\\x00-\\x1f]+"))
    assert allowed(regex_state) & set(control)


def test_prepared_grammar_is_not_compiled_again(compiler):
    """The server compiles in its worker thread (`prepare`); the engine's `new_state` then only builds
    a matcher from the attached grammar: no compile, no cache lookup on the engine loop."""
    spec = compiler.prepare(StructuredOutputsParams(regex="[0-9]{3}x"))
    hits, misses = compiler.hits, compiler.misses
    state = compiler.new_state(spec)
    assert (compiler.hits, compiler.misses) == (hits, misses)
    assert state.matcher.accept_string("123x") and state.matcher.is_completed()


@pytest.mark.parametrize("open_share", [0.0, 0.3, 0.7, 1.0])
def test_cpu_mask_paths_equal_xgrammars_kernel(open_share):
    """The sampler masks mostly-closed rows with its own unpacking and mostly-open ones with xgrammar's
    kernel: on random masks of every openness both give exactly xgrammar's result."""
    import xgrammar as xgr

    from qserve.serve.structured import apply_grammar_masks

    gen = torch.Generator().manual_seed(int(open_share * 10))
    vocab, rows = 1000, 6
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=gen, dtype=torch.int32)
    full = torch.rand(rows, words, generator=gen) < open_share
    bitmask[full] = -1

    class Fixed:  # a GrammarState stand-in with a fixed mask
        vocab_size = vocab

        def __init__(self, row):
            self.row = row

        def sync(self, outputs):
            pass

        def fill(self, out, row):
            out[row] = bitmask[self.row]

    logits = torch.randn(rows + 1, vocab, generator=gen)
    chosen = [0, 2, 3, 5, 6]  # row 1 and row 4 unconstrained
    expected = logits.clone()
    full_mask = torch.full((rows + 1, words), -1, dtype=torch.int32)
    for r in chosen:
        full_mask[r] = bitmask[r % rows]
    xgr.apply_token_bitmask_inplace(expected, full_mask, vocab_size=vocab, indices=chosen, backend="cpu")
    apply_grammar_masks(logits, [(r, Fixed(r % rows), []) for r in chosen])
    assert torch.equal(logits, expected)


class _FixedMask:
    """A GrammarState stand-in whose mask is one fixed row of bitmask words."""

    def __init__(self, words: torch.Tensor, vocab: int):
        self.words, self.vocab_size = words, vocab

    def sync(self, outputs):
        pass

    def fill(self, out, row):
        out[row] = self.words


def _masked_pair(seed: int, batch: int, chosen: list[int], vocab: int = 1000):
    """(logits, rows for a masker, the logits xgrammar's CPU kernel masks) for random masks of mixed
    openness on the `chosen` rows of a batch."""
    import xgrammar as xgr

    gen = torch.Generator().manual_seed(seed)
    words = (vocab + 31) // 32
    masks = torch.randint(-(2**31), 2**31 - 1, (batch, words), generator=gen, dtype=torch.int32)
    masks[torch.rand(batch, words, generator=gen) < 0.5] = -1
    logits = torch.randn(batch, vocab, generator=gen)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, masks, vocab_size=vocab, indices=chosen, backend="cpu")
    return logits, [(r, _FixedMask(masks[r], vocab), []) for r in chosen], expected


def test_device_mask_path_on_cpu_tensors_equals_the_cpu_path():
    """The path CUDA logits take (host buffers kept between steps, one copy of the bitmask and one of
    the row numbers to the device buffers, xgrammar's kernel there) run on CPU tensors with xgrammar's
    torch kernel: the same logits as xgrammar's CPU kernel, over steps that reuse and grow the buffers,
    with some rows unconstrained and with all constrained."""
    from qserve.serve.structured import GrammarMasker

    masker = GrammarMasker(kernel="torch_native")
    for step, (batch, chosen) in enumerate([(3, [0, 2]), (3, [1]), (7, [0, 1, 2, 3, 4, 5, 6]), (5, [4, 0])]):
        logits, rows, expected = _masked_pair(step, batch, chosen)
        masker(logits, rows)
        assert torch.equal(logits, expected), step
        assert masker._device is not masker._host and masker._device.shape[0] >= batch


def test_cuda_mask_kernel_under_the_triton_interpreter():
    """The kernel CUDA logits get (xgrammar's Triton kernel, through GrammarMasker's device path) run by
    Triton's interpreter on CPU tensors: the same logits as xgrammar's CPU kernel."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    script = """
import types, torch
# The interpreter runs the kernel on CPU tensors; the launcher only asks the GPU for its SM count.
torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=4, gcnArchName="")
import sys
sys.path.insert(0, "tests/serve")
from test_structured import _masked_pair
from qserve.serve.structured import GrammarMasker
masker = GrammarMasker(kernel="triton")
for step, (batch, chosen) in enumerate([(4, [0, 1, 2, 3]), (4, [0, 3]), (6, [5, 1])]):
    logits, rows, expected = _masked_pair(step, batch, chosen, vocab=5000)
    masker(logits, rows)
    assert torch.equal(logits, expected), step
print("triton-interpreted masks equal")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and "masks equal" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
def test_cuda_masks_stay_on_the_device(compiler):
    """On CUDA: the sampler's masks equal the CPU path's, the host bitmask is pinned and reused, and a
    masked step makes no synchronizing CUDA call (no read-back, no blocking copy)."""
    from qserve.serve.structured import GrammarMasker

    masker = GrammarMasker()
    for step, (batch, chosen) in enumerate([(8, [0, 3, 5]), (8, list(range(8))), (32, [31, 2])]):
        logits, rows, expected = _masked_pair(step, batch, chosen, vocab=49152)
        on_gpu = logits.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            masker(on_gpu, rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(on_gpu.cpu(), expected), step
        assert masker._host.is_pinned() and masker._device.is_cuda
    spec = compiler.prepare(StructuredOutputsParams(regex="[0-9]{2}"))
    logits = torch.randn(2, 384, device="cuda")
    masker(logits, [(1, compiler.new_state(spec), [])])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    tok = make_tiny_tokenizer()
    assert allowed and all(tok.decode([t]).isdigit() for t in allowed)
    assert torch.isfinite(logits[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_mask_of_every_row_with_a_padded_vocabulary(dtype):
    """All rows constrained, logits wider than the tokenizer's vocabulary (padded embedding): the CPU path
    masks exactly as xgrammar's kernel and leaves the padding columns alone; bfloat16 logits too."""
    import xgrammar as xgr

    from qserve.serve.structured import GrammarMasker

    for step in range(2):  # mostly-closed masks, then mostly-open ones
        logits, rows, _ = _masked_pair(step, 4, [0, 1, 2, 3], vocab=1000)
        for _, state, _ in rows:
            state.words = state.words if step else state.words & 0x0F0F0F0F
        logits = torch.cat([logits, torch.randn(4, 24)], dim=1).to(dtype)
        expected = logits.float()
        masks = torch.stack([state.words for _, state, _ in rows])
        xgr.apply_token_bitmask_inplace(expected, masks, vocab_size=1000, backend="cpu")
        GrammarMasker()(logits, rows)
        assert torch.equal(logits.float(), expected), step
