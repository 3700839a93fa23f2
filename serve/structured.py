"""Structured outputs: grammar-constrained decoding with xgrammar.

A request asks for a JSON schema, any JSON object, a regular expression, a choice among strings or an
EBNF grammar (`StructuredOutputsParams`). `StructuredOutputCompiler` turns that into an xgrammar
`CompiledGrammar` (cached by the request's key, thread-safe, so the API layer compiles in a worker
thread before the request reaches the engine loop). Each output sequence then owns a `GrammarState`:
a matcher that the sampler asks for a token bitmask every step (disallowed tokens get -inf logits) and
that accepts each sampled token. When the grammar is complete only the stop (EOS) tokens stay allowed,
so the sequence ends on EOS. `GrammarMasker` applies the masks where the logits are: on CPU in place,
on CUDA with xgrammar's Triton kernel after one non-blocking copy of the step's bitmask.

The matcher is kept in step with the sequence's output tokens, not with the sampler's calls: before a
mask is filled it catches up on outputs it has not seen and rolls back any it accepted that the
sequence no longer has. A sequence preempted by recompute keeps its outputs, so its matcher stays valid.

xgrammar skips some JSON-schema keywords without enforcing them; `check_json_schema` refuses those so
a request never gets a silently unconstrained answer. xgrammar 0.2.9's token masks also let a token
carrying a raw control byte (< 0x20) into a JSON string, which `json.loads` rejects; JSON grammars are
compact (no free whitespace), so for them such tokens are masked out as well (`_json_safe_mask`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from qserve.errors import ConfigError

log = logging.getLogger("qserve.serve.structured")

INSTALL_HINT = "structured outputs need the xgrammar package: pip install 'qserve[structured]'"

# Keywords xgrammar 0.2 accepts but does not enforce (checked by generating against each one).
UNSUPPORTED_KEYWORDS = frozenset({
    "allOf", "not", "if", "then", "else", "multipleOf", "uniqueItems", "contains", "minContains",
    "maxContains", "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
    "dependencies", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})  # fmt: skip
# String formats xgrammar turns into a grammar; any other `format` would be ignored.
SUPPORTED_FORMATS = frozenset({"date", "date-time", "time", "duration", "uuid", "ipv4", "ipv6"})
# Keywords whose value is one subschema / a list of subschemas / a name -> subschema mapping.
_SCHEMA_VALUED = ("items", "additionalProperties", "propertyNames", "additionalItems")
_LIST_VALUED = ("anyOf", "oneOf", "prefixItems")
_MAP_VALUED = ("properties", "patternProperties", "$defs", "definitions")


class UnsupportedSchemaError(ValueError):
    """A JSON schema uses a keyword the grammar engine cannot enforce; `keyword` names it."""

    def __init__(self, keyword: str, path: str, detail: str = "") -> None:
        where = f" at {path}" if path else ""
        super().__init__(
            f"JSON schema keyword '{keyword}'{where} is not supported by structured outputs{detail}; "
            "remove it from the schema (it would not be enforced)"
        )
        self.keyword = keyword
        self.path = path


def check_json_schema(schema: Any, path: str = "") -> None:
    """Raise UnsupportedSchemaError for the first keyword that would not be enforced, ValueError for a
    schema that is not a JSON object (or boolean)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(
            f"JSON schema{' at ' + path if path else ''} must be an object, got {type(schema).__name__}"
        )
    for key, value in schema.items():
        here = f"{path}.{key}" if path else key
        if key in UNSUPPORTED_KEYWORDS:
            raise UnsupportedSchemaError(key, path)
        if key == "format" and value not in SUPPORTED_FORMATS:
            raise UnsupportedSchemaError(
                "format", path, f" for format {value!r} (supported: {', '.join(sorted(SUPPORTED_FORMATS))})"
            )
        if key in ("$ref", "$dynamicRef") and not (isinstance(value, str) and value.startswith("#")):
            raise UnsupportedSchemaError(key, path, f" for a reference outside the schema ({value!r})")
        if key in _SCHEMA_VALUED:
            check_json_schema(value, here)
        elif key in _LIST_VALUED:
            if not isinstance(value, list):
                raise ValueError(f"JSON schema '{here}' must be a list of schemas")
            for i, sub in enumerate(value):
                check_json_schema(sub, f"{here}[{i}]")
        elif key in _MAP_VALUED:
            if not isinstance(value, dict):
                raise ValueError(f"JSON schema '{here}' must be an object mapping names to schemas")
            for name, sub in value.items():
                check_json_schema(sub, f"{here}.{name}")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint: `json` (a JSON schema, dict or JSON text), `json_object`, `regex`,
    `choice` (the output is one of these strings) or `grammar` (xgrammar's EBNF).

    `compiled` carries the CompiledGrammar once `StructuredOutputCompiler.prepare` has run; it takes
    no part in equality or hashing."""

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    compiled: Any = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "StructuredOutputsParams: give exactly one of json, json_object, regex, choice, grammar; "
                f"got {given or 'none'}"
            )
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise ValueError(f"StructuredOutputsParams.json is not valid JSON: {exc}") from None
            check_json_schema(schema)
            # Compact text as the cache key. Key order is kept: it is the order properties are generated in.
            object.__setattr__(self, "json", json.dumps(schema, separators=(",", ":")))
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("StructuredOutputsParams.choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        for k in ("json", "regex", "choice", "grammar"):
            if getattr(self, k) is not None:
                return k
        return "json_object"

    @property
    def key(self) -> tuple[str, Any]:
        return self.kind, getattr(self, self.kind)


def choice_grammar(choices: Iterable[str]) -> str:
    """EBNF whose language is exactly `choices` (JSON string escapes are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; caches by key; safe to call from any thread.

    xgrammar is imported and the tokenizer's vocabulary scanned on the first compile, so an engine that
    never sees a structured request does not pay for (or need) it."""

    def __init__(
        self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = 512
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, Any], Any] = OrderedDict()
        self._compiler = None
        self._json_safe: torch.Tensor | None = None
        self.hits = 0
        self.misses = 0
        self.compile_seconds = 0.0

    def _xgr_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = import_xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
                self._json_safe = _json_safe_mask(info.decoded_vocab, self.vocab_size)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams):
        """The CompiledGrammar of `spec`; ValueError naming the problem for a bad regex/grammar/schema."""
        if spec.compiled is not None:
            return spec.compiled
        key = spec.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        compiler = self._xgr_compiler()
        start = time.perf_counter()
        try:
            if spec.kind == "json":
                compiled = compiler.compile_json_schema(spec.json, any_whitespace=False)
            elif spec.kind == "json_object":
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.regex)
            elif spec.kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(spec.choice))
            else:
                compiled = compiler.compile_grammar(spec.grammar)
        except RuntimeError as exc:  # xgrammar reports parse errors as RuntimeError with a C++ prefix
            message = str(exc).split("\n")[0]
            message = message.split(": ", 2)[-1] if message.startswith("[") else message
            raise ValueError(f"cannot compile the {spec.kind} constraint: {message}") from None
        elapsed = time.perf_counter() - start
        with self._lock:
            self.misses += 1
            self.compile_seconds += elapsed
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def prepare(self, spec: StructuredOutputsParams) -> StructuredOutputsParams:
        """`spec` with its grammar compiled and attached (call it off the engine loop)."""
        return spec if spec.compiled is not None else replace(spec, compiled=self.compile(spec))

    def new_state(self, spec: StructuredOutputsParams) -> GrammarState:
        compiled = self.compile(spec)
        json_kind = spec.kind in ("json", "json_object")
        return GrammarState(compiled, self.vocab_size, self._json_safe if json_kind else None)


def _json_safe_mask(decoded_vocab: list[bytes], vocab_size: int) -> torch.Tensor:
    """int32 bitmask words with the bit of every token whose bytes contain no control byte (< 0x20)."""
    allowed = torch.zeros(((vocab_size + 31) // 32) * 32, dtype=torch.bool)
    for token_id, raw in enumerate(decoded_vocab[:vocab_size]):
        allowed[token_id] = not any(b < 0x20 for b in raw)
    bits = allowed.view(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    words = bits.sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


class GrammarState:
    """One sequence's grammar matcher, kept in step with its output tokens (see the module docstring)."""

    def __init__(self, compiled, vocab_size: int, extra_mask: torch.Tensor | None = None) -> None:
        self._compiled = compiled
        self.vocab_size = vocab_size
        self.extra_mask = extra_mask  # int32 words ANDed into every mask (JSON: no raw control bytes)
        self.matcher = import_xgrammar().GrammarMatcher(compiled)
        self.accepted: list[int] = []
        self.rejected: int | None = None  # a token the grammar refused (never sampled under the mask)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def sync(self, output_token_ids: list[int]) -> None:
        """Make the matcher's history equal `output_token_ids` (roll back, then accept what is new)."""
        common = 0
        limit = min(len(self.accepted), len(output_token_ids))
        while common < limit and self.accepted[common] == output_token_ids[common]:
            common += 1
        if common < len(self.accepted):
            self.matcher.rollback(len(self.accepted) - common)
            del self.accepted[common:]
            self.rejected = None
        for token in output_token_ids[common:]:
            self.accept(token)

    def accept(self, token: int) -> None:
        if self.rejected is not None:
            return
        if self.matcher.is_terminated():
            # Accepting the stop token ended the grammar; a later token (ignore_eos) cannot be checked.
            self.accepted.append(token)
            self.rejected = token
            return
        if not self.matcher.accept_token(int(token)):
            log.warning("grammar rejected token %d; the sequence may only stop from here", token)
            self.rejected = token
        self.accepted.append(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this step's allowed tokens into `bitmask[row]` (only stop tokens once done or broken)."""
        if self.rejected is not None:
            bitmask[row].zero_()
            for t in self.matcher.stop_token_ids:
                bit = 1 << (t % 32)
                bitmask[row, t // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 words
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.extra_mask is not None and not self.matcher.is_terminated():
            bitmask[row] &= self.extra_mask


class GrammarMasker:
    """Masks the structured rows of each step's logits on the logits' device.

    The matchers run on the host, so each step's bitmask is filled there, into a buffer kept from step
    to step. On CPU it is applied in place (`_apply_on_cpu`). On an accelerator the filled rows and
    their row numbers go to the device in one non-blocking copy each (from pinned memory on CUDA), into
    device buffers also kept, and xgrammar's kernel masks the logits there (Triton on CUDA): nothing is
    read back and the host does not wait for the device. Before the host buffers are refilled, a CUDA
    event makes sure the previous step's copies out of them have finished (normally they have: the
    sampler reads its tokens back in between).

    `kernel` (xgrammar's backend name) defaults from the logits' device: cpu, triton on CUDA,
    torch_native elsewhere. Any kernel but "cpu" takes the device path, whatever the logits' device
    (the tests run it on CPU tensors, with Triton's interpreter for the CUDA kernel)."""

    def __init__(self, kernel: str | None = None) -> None:
        self.kernel = kernel
        self._host: torch.Tensor | None = None  # int32 [rows, words]; pinned for CUDA
        self._host_rows: torch.Tensor | None = None  # int32 [rows]: the constrained rows' numbers
        self._device: torch.Tensor | None = None
        self._device_rows: torch.Tensor | None = None
        self._copied = None  # CUDA event recorded after the last copies out of the host buffers

    def __call__(self, logits: torch.Tensor, rows: list[tuple[int, GrammarState, list[int]]]) -> None:
        """Mask `logits` in place: `rows` is (logits row, grammar state, that sequence's output tokens)."""
        if not rows:
            return
        vocab = rows[0][1].vocab_size
        n = logits.shape[0]
        host = self._host_buffers(n, (vocab + 31) // 32, logits.device.type == "cuda")
        for row, state, outputs in rows:
            state.sync(outputs)
            state.fill(host, row)
        width = min(vocab, logits.shape[1])
        indices = [r for r, _, _ in rows]
        kernel = self.kernel or {"cpu": "cpu", "cuda": "triton"}.get(logits.device.type, "torch_native")
        if kernel == "cpu":
            _apply_on_cpu(logits, host[:n], indices, width)
        else:
            self._apply_on_device(logits, n, indices, width, kernel)

    def _host_buffers(self, n: int, words: int, pin: bool) -> torch.Tensor:
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()  # the previous step's copies still read these buffers
        host = self._host
        if host is None or host.shape[0] < n or host.shape[1] != words or host.is_pinned() != pin:
            rows = max(n, 2 * host.shape[0] if host is not None and host.shape[1] == words else n)
            self._host = torch.full((rows, words), -1, dtype=torch.int32, pin_memory=pin)
            self._host_rows = torch.zeros(rows, dtype=torch.int32, pin_memory=pin)
            self._device = self._device_rows = None
        return self._host

    def _apply_on_device(
        self, logits: torch.Tensor, n: int, indices: list[int], width: int, kernel: str
    ) -> None:
        host, host_rows = self._host, self._host_rows
        if self._device is None or self._device.device != logits.device:
            self._device = torch.empty(host.shape, dtype=torch.int32, device=logits.device)
            self._device_rows = torch.empty(host_rows.shape, dtype=torch.int32, device=logits.device)
        bitmask = self._device[:n]
        bitmask.copy_(host[:n], non_blocking=True)
        rows = None  # every row is constrained
        if len(indices) < n:
            host_rows[: len(indices)] = torch.tensor(indices, dtype=torch.int32)
            rows = self._device_rows[: len(indices)]
            rows.copy_(host_rows[: len(indices)], non_blocking=True)
        if logits.device.type == "cuda":
            self._copied = self._copied or torch.cuda.Event()
            self._copied.record()
        import_xgrammar().apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=width, indices=rows, backend=kernel
        )


def apply_grammar_masks(logits: torch.Tensor, rows: list[tuple[int, GrammarState, list[int]]]) -> None:
    """One step's masks with a masker of its own (the sampler keeps one, with its buffers)."""
    GrammarMasker()(logits, rows)


def _apply_on_cpu(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int], width: int) -> None:
    """On CPU xgrammar's kernel costs about one write per disallowed token: cheap for a mostly-open mask
    (inside a string), several times the unpack of `_apply_unpacked` for a mostly-closed one (a number,
    a key). Each row goes to the cheaper one."""
    xgr = import_xgrammar()
    open_words = (bitmask[indices].numpy() == -1).mean(axis=1).tolist()
    mostly_open = [r for r, share in zip(indices, open_words, strict=True) if share >= 0.5]
    mostly_closed = [r for r, share in zip(indices, open_words, strict=True) if share < 0.5]
    if mostly_open:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=width, indices=mostly_open, backend="cpu")
    if mostly_closed:
        _apply_unpacked(logits, bitmask, mostly_closed, width)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


def _apply_unpacked(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], width: int) -> None:
    """-inf where a row's bit is 0: the int32 words read as little-endian bytes (token t is bit t % 8 of
    byte t // 8), unpacked. numpy does it on the calling thread: on a loaded CPU torch's multi-threaded
    elementwise ops wait tens of milliseconds at their OpenMP barriers (measured: 103 ms vs 18 ms for
    32 rows of SmolLM2's vocabulary with 2 threads)."""
    if logits.dtype not in _NUMPY_DTYPES:  # bfloat16: no numpy view
        packed = bitmask[rows].view(torch.uint8)
        allowed = ((packed.unsqueeze(-1) >> _BIT_SHIFTS) & 1).view(len(rows), -1)[:, :width].bool()
        idx = torch.tensor(rows)
        logits[idx, :width] = logits[idx, :width].masked_fill(~allowed, float("-inf"))
        return
    packed = bitmask[rows].numpy().view(np.uint8)
    disallowed = np.unpackbits(packed, axis=1, count=width, bitorder="little") == 0
    out = logits.numpy()
    if rows == list(range(out.shape[0])):
        np.copyto(out[:, :width], -np.inf, where=disallowed)
        return
    sub = out[rows, :width]  # a copy (fancy indexing), written back
    np.copyto(sub, -np.inf, where=disallowed)
    out[rows, :width] = sub


_XGR = None


def import_xgrammar():
    global _XGR
    if _XGR is None:
        try:
            import xgrammar
        except ImportError as exc:
            raise ConfigError(INSTALL_HINT) from exc
        _XGR = xgrammar
    return _XGR


def available() -> bool:
    try:
        import_xgrammar()
    except ConfigError:
        return False
    return True
