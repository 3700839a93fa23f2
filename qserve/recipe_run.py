"""`qserve run RECIPE`: quantize -> validate -> eval -> serve smoke test, one report.

Each stage records its status, seconds and the process's peak memory so far. A stage that fails stops
the run (later stages are marked skipped); a gate that fails does not stop the remaining stages but
makes the exit code non-zero. The quantize stage resumes an interrupted run of the same recipe, and
reuses a finished checkpoint whose recorded config matches the recipe.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qserve.errors import QserveError
from qserve.recipe import Recipe

STAGES = ("quantize", "validate", "eval", "serve_smoke")


@dataclass
class StageResult:
    name: str
    status: str = "skipped"  # ok | failed | skipped | reused
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunReport:
    recipe: str
    model: str
    output: str
    quant_config: dict[str, Any]
    stages: list[StageResult]
    gates: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s.status in ("ok", "reused", "skipped") for s in self.stages) and all(
            g["passed"] for g in self.gates
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _peak_rss() -> int:
    from qserve.quantize.report import peak_rss_bytes

    return peak_rss_bytes()


def _finished_checkpoint_matches(output: Path, cfg) -> bool:
    """A complete checkpoint from an earlier run of the same recipe (same quantization fields)."""
    from qserve.quantize.report import REPORT_FILE

    report = output / REPORT_FILE
    if not report.is_file():
        return False
    try:
        saved = json.loads(report.read_text())["config"]
    except (ValueError, KeyError):
        return False
    from qserve.quantize.config import QuantConfig

    if not isinstance(saved, dict) or any(k not in saved for k in cfg.fingerprint_dict()):
        return False  # written by a qserve with other quantization fields
    # Compare resolved fingerprints (method defaults such as first_token_weight=None -> 1.0), not raw fields.
    try:
        known = {k: v for k, v in saved.items() if k in cfg.to_dict()}
        return QuantConfig.from_dict(known).fingerprint_dict() == cfg.fingerprint_dict()
    except QserveError:
        return False


def _stage_quantize(recipe: Recipe, progress: bool, log) -> dict:
    from qserve.quantize.config import QuantConfig
    from qserve.quantize.pipeline import quantize_model, resolve_config
    from qserve.quantize.resume import partial_dir

    output = Path(recipe.output).expanduser()
    probe = recipe.quant_config()
    # An automatic group size is compared as the size it resolves to for this model.
    if output.exists():
        resolved = resolve_config(probe)
        if _finished_checkpoint_matches(output, resolved):
            return {"reused": True, "checkpoint": str(output), **_resolved_grid(resolved.to_dict())}
    resume = partial_dir(output).exists()
    cfg: QuantConfig = recipe.quant_config(eval=False, resume=resume, quiet=not progress)
    report = quantize_model(cfg, log=log)
    return {
        "reused": False,
        "resumed_from_block": report.resumed_from_block,
        "checkpoint": str(output),
        **_resolved_grid(report.config),
    }


# The automatic choices a quantize run resolves against the model's layers (group size; GPTQ's sym and,
# with it, mse, gptaq and the symmetric scale), recorded in the run report as resolved.
RESOLVED_KEYS = ("group_size", "sym", "mse", "gptaq", "sym_scale")


def _resolved_grid(config: dict) -> dict:
    return {k: config[k] for k in RESOLVED_KEYS if k in config}


def _stage_validate(recipe: Recipe, log) -> dict:
    from qserve.validate import validate_checkpoint

    rep = validate_checkpoint(recipe.output, deep=recipe.validate.deep, strict=recipe.validate.strict)
    log(rep.format_text())
    findings = [asdict(f) if hasattr(f, "__dataclass_fields__") else dict(f) for f in rep.findings]
    if not rep.ok:
        raise QserveError(f"validation failed with {len(findings)} finding(s); see the report above")
    return {"ok": rep.ok, "findings": findings}


def _stage_eval(recipe: Recipe, progress: bool, log) -> dict:
    from qserve.evaluate import evaluate_ppl, original_ppl
    from qserve.hub import resolve_model

    original_dir = resolve_model(recipe.model, progress=progress)
    st = recipe.eval
    table = {}
    for ds in st.datasets:
        kw = dict(
            dataset=ds, seqlen=st.seqlen, max_windows=st.windows, batch_size=st.batch_size, progress=progress
        )
        orig = original_ppl(original_dir, log=log, **kw)  # cached: same files and settings, same number
        quant = evaluate_ppl(recipe.output, **kw)
        table[ds] = {
            "original": orig.to_dict(),
            "quantized": quant.to_dict(),
            "increase": quant.ppl / orig.ppl - 1.0,
        }
        log(
            f"eval {ds}: {orig.ppl:.3f} -> {quant.ppl:.3f} ({quant.ppl / orig.ppl - 1:+.1%}) "
            f"on {quant.windows} windows x {quant.seqlen}"
        )
    if st.gates.min_gain_over_rtn is not None:
        _rtn_baseline(recipe, original_dir, table, progress, log)
    return {"ppl": table}


def _rtn_baseline(recipe: Recipe, original_dir, table: dict, progress: bool, log) -> None:
    """Round-to-nearest on the recipe's own grid (bits, group size, zero points, layout), made from the
    original model and scored on the same windows as the quantized checkpoint: the baseline of the
    min_gain_over_rtn gate. The RTN checkpoint lives in a temporary directory and is removed."""
    import shutil
    import tempfile

    from qserve.evaluate import evaluate_ppl
    from qserve.quantize.config import QuantConfig
    from qserve.quantize.pipeline import quantize_model, resolve_config

    cfg = resolve_config(recipe.quant_config())
    st = recipe.eval
    tmp = Path(tempfile.mkdtemp(prefix="qserve-rtn-baseline-"))
    try:
        rtn_cfg = QuantConfig(
            model=str(original_dir), output=str(tmp / "rtn"), method="rtn", bits=cfg.bits,
            group_size=cfg.group_size, sym=cfg.sym, format=cfg.format, device=cfg.device, dtype=cfg.dtype,
            eval=False, quiet=True,
        )  # fmt: skip
        log(f"eval: RTN baseline on the same grid ({cfg.format}, {cfg.bits}-bit, group {cfg.group_size}, "
            f"{'symmetric' if cfg.sym else 'zero points'}) for the min_gain_over_rtn gate")  # fmt: skip
        quantize_model(rtn_cfg, log=lambda _m: None)
        for ds, row in table.items():
            rtn = evaluate_ppl(
                tmp / "rtn", dataset=ds, seqlen=st.seqlen, max_windows=st.windows,
                batch_size=st.batch_size, progress=progress,
            )  # fmt: skip
            q = row["quantized"]["ppl"]
            row["rtn"] = rtn.to_dict()
            row["gain_over_rtn"] = 1.0 - q / rtn.ppl
            log(f"eval {ds}: RTN {rtn.ppl:.3f}, quantized {q:.3f} ({row['gain_over_rtn']:+.1%} below RTN)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stage_smoke(recipe: Recipe, log) -> dict:
    from qserve import LLM, SamplingParams

    sm = recipe.serve_smoke
    llm = LLM(recipe.output, max_model_len=sm.max_model_len, max_num_seqs=max(1, len(sm.prompts)),
              tensor_parallel_size=sm.tensor_parallel_size)
    params = SamplingParams(temperature=sm.temperature, max_tokens=sm.max_tokens, stop=list(sm.stop))
    with llm:  # stops tensor-parallel workers, if any
        if sm.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in sm.prompts], params)
        else:
            outs = llm.generate(list(sm.prompts), params)
    answers, problems = [], []
    for prompt, out in zip(sm.prompts, outs, strict=True):
        text = out.outputs[0].text
        answers.append({"prompt": prompt, "answer": text, "finish_reason": out.outputs[0].finish_reason})
        log(f"smoke: {prompt!r} -> {text!r}")
        if sm.expect_nonempty and not text.strip():
            problems.append(f"empty answer to {prompt!r}")
        problems += [
            f"answer to {prompt!r} lacks {w!r}" for w in sm.expect_contains if w.lower() not in text.lower()
        ]
        if sm.stop and any(s in text for s in sm.stop):
            problems.append(f"answer to {prompt!r} contains a stop string")
    if problems:
        raise QserveError("serve smoke test failed: " + "; ".join(problems))
    return {"answers": answers}


def _gates(recipe: Recipe, eval_detail: dict) -> list[dict[str, Any]]:
    g = recipe.eval.gates
    gates = []
    for ds, row in eval_detail.get("ppl", {}).items():
        q = row["quantized"]["ppl"]
        if g.max_ppl_increase is not None:
            gates.append(
                {
                    "gate": f"{ds}.max_ppl_increase",
                    "limit": g.max_ppl_increase,
                    "value": row["increase"],
                    "passed": row["increase"] <= g.max_ppl_increase,
                }
            )
        if g.max_ppl is not None:
            gates.append({"gate": f"{ds}.max_ppl", "limit": g.max_ppl, "value": q, "passed": q <= g.max_ppl})
        if g.min_gain_over_rtn is not None:
            gain = row.get("gain_over_rtn")
            gates.append(
                {
                    "gate": f"{ds}.min_gain_over_rtn",
                    "limit": g.min_gain_over_rtn,
                    "value": gain,
                    "passed": gain is not None and gain >= g.min_gain_over_rtn,
                }
            )
    return gates


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_recipe(recipe: Recipe, progress: bool = True, log: Callable[[str], None] = print) -> RunReport:
    """Runs the stages in order. With `progress`, a line before and after each stage says which one runs
    and how long it took; no overall ETA, since the stages differ in cost by orders of magnitude (quantize
    takes minutes, validate seconds) and a per-stage average would extrapolate the first one's time."""
    start = time.perf_counter()
    report = RunReport(
        str(recipe.path),
        recipe.model,
        recipe.output,
        recipe.quant_config().to_dict(),
        [StageResult(n) for n in STAGES],
    )
    enabled = {
        "quantize": True,
        "validate": recipe.validate.enabled,
        "eval": recipe.eval.enabled,
        "serve_smoke": recipe.serve_smoke.enabled,
    }
    actions = {
        "quantize": lambda: _stage_quantize(recipe, progress, log),
        "validate": lambda: _stage_validate(recipe, log),
        "eval": lambda: _stage_eval(recipe, progress, log),
        "serve_smoke": lambda: _stage_smoke(recipe, log),
    }
    failed = False
    for number, stage in enumerate(report.stages, 1):
        if failed or not enabled[stage.name]:
            continue
        if progress:
            log(
                f"[run {number}/{len(STAGES)}] {stage.name} (run elapsed {_duration(time.perf_counter() - start)})"
            )
        t0 = time.perf_counter()
        try:
            stage.detail = actions[stage.name]()
            stage.status = "reused" if stage.detail.get("reused") else "ok"
        except QserveError as exc:
            stage.status, stage.error, failed = "failed", str(exc), True
            log(f"{stage.name}: {exc}")
        stage.seconds = time.perf_counter() - t0
        stage.peak_rss_bytes = _peak_rss()
        if progress:
            log(f"[run {number}/{len(STAGES)}] {stage.name} {stage.status} in {_duration(stage.seconds)}")
        if stage.name == "quantize" and stage.detail.get("group_size") is not None:
            # automatic choices, resolved (group size; GPTQ's sym, mse, gptaq)
            report.quant_config.update(_resolved_grid(stage.detail))
        if stage.name == "eval" and stage.status == "ok":
            report.gates = _gates(recipe, stage.detail)
    report.wall_seconds = time.perf_counter() - start
    return report
