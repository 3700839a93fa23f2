"""Structured outputs on SmolLM2: validity over distinct JSON schemas, and decode throughput with a
grammar vs unconstrained at one batch size.

Validity: `--num-schemas` distinct bounded schemas (objects, arrays, enums, nested objects, bounded
integers and numbers, required and optional properties; seeded), one chat request each, all in one
batch; every output must parse and validate (a structural check of the generated keywords).

Throughput: `--batch` requests decoding `--max-tokens` tokens each, side by side in one process,
interleaved `--repeats` times: unconstrained (ignore_eos), a JSON array of integers and a JSON array
of objects with free strings. The schemas ask for more items than `--max-tokens` can hold, so every
row decodes exactly `--max-tokens` tokens and the rates compare the same work.

    python bench/structured.py --out bench/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A bounded object schema: every property's value has a bounded length."""
    names = rng.sample(["name", "age", "city", "tags", "score", "active", "kind", "id", "level", "note"],
                       rng.randint(1, 4))  # fmt: skip
    props = {}
    for name in names:
        kind = rng.choice(
            ["integer", "number", "string", "enum", "boolean", "array"] + (["object"] if depth < 1 else [])
        )
        if kind == "integer":
            lo = rng.randint(-100, 100)
            props[name] = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
        elif kind == "number":
            lo = rng.randint(-10, 10)
            props[name] = {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 100)}
        elif kind == "string":
            props[name] = {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 16)}
        elif kind == "enum":
            props[name] = {
                "enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no"], rng.randint(1, 4))
            }
        elif kind == "boolean":
            props[name] = {"type": "boolean"}
        elif kind == "array":
            props[name] = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                           "maxItems": rng.randint(0, 4)}  # fmt: skip
        else:
            props[name] = random_schema(rng, depth + 1)
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def validate(value, schema: dict, path: str = "$") -> str | None:
    """The first violation of `schema` (the keywords random_schema uses), or None."""
    if "enum" in schema:
        return None if value in schema["enum"] else f"{path}: {value!r} not in enum"
    kind = schema["type"]
    ok = {
        "object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
        "boolean": isinstance(value, bool), "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]  # fmt: skip
    if not ok:
        return f"{path}: expected {kind}, got {value!r}"
    if kind == "object":
        for name in schema["required"]:
            if name not in value:
                return f"{path}: missing {name}"
        for name, item in value.items():
            if name not in schema["properties"]:
                return f"{path}: extra property {name}"
            err = validate(item, schema["properties"][name], f"{path}.{name}")
            if err:
                return err
    if kind == "array":
        if len(value) > schema.get("maxItems", len(value)):
            return f"{path}: too many items"
        for i, item in enumerate(value):
            err = validate(item, schema["items"], f"{path}[{i}]")
            if err:
                return err
    if kind == "string" and not schema.get("minLength", 0) <= len(value) <= schema.get(
        "maxLength", len(value)
    ):
        return f"{path}: length {len(value)}"
    if kind in ("integer", "number") and not schema["minimum"] <= value <= schema["maximum"]:
        return f"{path}: {value} out of bounds"
    return None


def chat_prompt(tokenizer, schema: dict) -> list[int]:
    messages = [{"role": "user", "content": "Answer in JSON following this schema: " + json.dumps(schema)}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def validity(llm, num: int, seed: int, max_tokens: int) -> dict:
    from qserve.serve.sampling_params import SamplingParams
    from qserve.serve.structured import StructuredOutputsParams

    rng = random.Random(seed)
    schemas: list[dict] = []
    seen: set[str] = set()
    while len(schemas) < num:
        s = random_schema(rng)
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            schemas.append(s)
    tok = llm.get_tokenizer()
    prompts = [chat_prompt(tok, s) for s in schemas]
    params = [SamplingParams(temperature=0.7, seed=seed + i, max_tokens=max_tokens,
                             structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(schemas)]  # fmt: skip
    compiler = llm.engine.structured
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    failures, finished, tokens = [], 0, 0
    for schema, out in zip(schemas, outs, strict=True):
        c = out.outputs[0]
        tokens += len(c.token_ids)
        finished += c.finish_reason == "stop"
        try:
            err = validate(json.loads(c.text), schema)
        except ValueError as exc:
            err = f"not JSON ({exc}): {c.text[:80]!r}"
        if err:
            failures.append(
                {"schema": schema, "text": c.text, "finish_reason": c.finish_reason, "error": err}
            )
    return {
        "num_schemas": num, "distinct": len(seen), "valid": num - len(failures), "finished": finished,
        "output_tokens": tokens, "seconds": seconds, "grammar_compiles": compiler.misses,
        "grammar_compile_seconds": compiler.compile_seconds, "failures": failures[:5],
        "example": {"schema": schemas[0], "text": outs[0].outputs[0].text},
    }  # fmt: skip


THROUGHPUT_SCHEMAS = {
    "json_int_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                       "minItems": 200, "maxItems": 200},
    "json_object_array": {"type": "array", "minItems": 200, "maxItems": 200, "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                                         "age": {"type": "integer"}},
        "required": ["name", "city", "age"], "additionalProperties": False}},
}  # fmt: skip


def throughput(llm, batch: int, max_tokens: int, repeats: int) -> dict:
    from qserve.serve.sampling_params import SamplingParams
    from qserve.serve.structured import StructuredOutputsParams

    tok = llm.get_tokenizer()
    prompts = [chat_prompt(tok, {"type": "array", "note": f"list number {i}"}) for i in range(batch)]
    variants = {
        "unconstrained": SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens, ignore_eos=True)
    }
    for name, schema in THROUGHPUT_SCHEMAS.items():
        variants[name] = SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens,
                                        structured_outputs=StructuredOutputsParams(json=schema))  # fmt: skip
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    runs: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(repeats):  # interleaved, order rotated: load drift on the shared machine hits all
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            params = variants[name]
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            assert tokens == batch * max_tokens, f"{name}: {tokens} tokens, expected {batch * max_tokens}"
            runs[name].append(tokens / seconds)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "batch": batch, "max_tokens": max_tokens, "repeats": repeats, "tok_s_runs": runs, "tok_s": med,
        "ratio_vs_unconstrained": {k: med[k] / med["unconstrained"] for k in THROUGHPUT_SCHEMAS},
    }  # fmt: skip


def mask_cost(llm, batch: int, steps: int) -> dict:
    """Milliseconds per decode step that the grammar masks of `batch` rows cost (fill + apply, on the
    engine's device, with the sampler's kept buffers), in a mostly-closed state (inside a number) and a
    mostly-open one (inside a free string)."""
    from qserve.serve.structured import GrammarMasker, StructuredOutputsParams

    tok, compiler = llm.get_tokenizer(), llm.engine.structured
    vocab = llm.engine.model_config.vocab_size
    device = torch.device(llm.engine.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = {"json_int_array (in a number)": ("json_int_array", "[12, 7"),
             "json_object_array (in a string)": ("json_object_array", '[{"name": "Paris is a')}  # fmt: skip
    out = {}
    for label, (schema_name, prefix) in cases.items():
        spec = compiler.prepare(StructuredOutputsParams(json=THROUGHPUT_SCHEMAS[schema_name]))
        ids = tok.encode(prefix, add_special_tokens=False)
        rows = []
        for i in range(batch):
            state = compiler.new_state(spec)
            state.sync(ids)
            rows.append((i, state, ids))
        logits = torch.randn(batch, vocab, device=device)
        masker = GrammarMasker()
        masker(logits, rows)
        times = []
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            masker(logits, rows)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        out[label] = statistics.median(times)
    return {"batch": batch, "steps": steps, "device": str(device), "ms_per_step_median": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda")
    ap.add_argument("--num-schemas", type=int, default=100, help="0: skip the validity part")
    ap.add_argument("--validity-max-tokens", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32, help="0: skip the throughput part")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="0: skip the decode-throughput part")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mask-steps", type=int, default=20, help="timed mask-only steps (0: skip that part)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "structured.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qserve import LLM
    from qserve.hub import resolve_model
    from qserve.provenance import describe_run

    llm = LLM(
        str(resolve_model(args.model)),
        max_num_seqs=max(args.batch, args.num_schemas, 1),
        max_model_len=2048,
        device=args.device,
    )
    device = str(llm.engine.device)
    note = "absolute rates depend on the machine's load; the ratios come from interleaved runs"
    result = {"model": args.model, "device": device, "threads": args.threads, "provenance": describe_run(),
              "command": "python bench/structured.py " + " ".join(sys.argv[1:]), "note": note}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.num_schemas:
        v = result["validity"] = validity(llm, args.num_schemas, args.seed, args.validity_max_tokens)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))  # kept if the next part dies
        print(f"validity: {v['valid']}/{v['num_schemas']} valid, {v['finished']} finished, "
              f"{v['grammar_compiles']} compiles in {v['grammar_compile_seconds']:.2f} s", flush=True)  # fmt: skip
    if args.batch and args.mask_steps:
        m = result["mask_cost"] = mask_cost(llm, args.batch, args.mask_steps)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"grammar masks at batch {args.batch}: " + ", ".join(
            f"{k} {v:.2f} ms/step" for k, v in m["ms_per_step_median"].items()), flush=True)  # fmt: skip
    if args.batch and args.repeats:
        t = result["throughput"] = throughput(llm, args.batch, args.max_tokens, args.repeats)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        rates = ", ".join(f"{k} {r:.1f} tok/s" for k, r in t["tok_s"].items())
        print(f"throughput at batch {t['batch']}: {rates}")
        print(
            "ratio vs unconstrained: "
            + ", ".join(f"{k} {r:.3f}" for k, r in t["ratio_vs_unconstrained"].items())
        )


if __name__ == "__main__":
    main()
