"""Writing a run's report: run_report.json, run_report.md and a per-layer error plot (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

from qserve.recipe_run import RunReport


def report_dir(output: str | Path) -> Path:
    """Reports live beside the checkpoint (`<output>.report/`), so the checkpoint stays a pure checkpoint."""
    out = Path(output).expanduser()
    return out.with_name(out.name + ".report")


def _quant_blocks(output: Path) -> list[dict]:
    from qserve.quantize.report import REPORT_FILE

    f = output / REPORT_FILE
    if not f.is_file():
        return []
    return json.loads(f.read_text()).get("blocks", [])


def plot_layer_errors(blocks: list[dict], path: Path, title: str) -> Path | None:
    """Block output relative error across the network (one point per decoder block); None without data."""
    points = [(b["block"], b["out_rel_err"]) for b in blocks if "out_rel_err" in b]
    if not points:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=120)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def markdown(report: RunReport, plot_name: str | None) -> str:
    c = report.quant_config
    lines = [
        f"# qserve run: {Path(report.recipe).name}",
        "",
        f"- model: `{report.model}`",
        f"- checkpoint: `{report.output}`",
        f"- method: {c['method']} w{c['bits']} g{c['group_size']} {'sym' if c['sym'] else 'asym'} "
        f"({c['format']} layout); calibration {c['n_samples']} x {c['seqlen']} tokens of `{c['calib']}`, seed {c['seed']}",
        f"- result: **{'PASS' if report.ok else 'FAIL'}** in {report.wall_seconds:.1f}s",
        "",
        "## Stages",
        "",
        "| stage | status | seconds | peak RSS | note |",
        "|---|---|---:|---:|---|",
    ]
    for s in report.stages:
        note = s.error or ""
        if s.name == "validate" and s.status == "ok":
            note = f"{len(s.detail.get('findings', []))} finding(s), none of error severity"
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {_fmt_bytes(s.peak_rss_bytes)} | {note} |")
    ev = next((s for s in report.stages if s.name == "eval"), None)
    if ev and ev.status == "ok":
        lines += [
            "",
            "## Perplexity (same windows for every row)",
            "",
            "| dataset | windows x seqlen | original | RTN, same grid | quantized | change | below RTN |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for ds, row in ev.detail["ppl"].items():
            o, q = row["original"], row["quantized"]
            rtn = f"{row['rtn']['ppl']:.3f}" if "rtn" in row else "-"
            gain = f"{row['gain_over_rtn']:+.1%}" if "gain_over_rtn" in row else "-"
            lines.append(
                f"| {ds} | {q['windows']} x {q['seqlen']} | {o['ppl']:.3f} | {rtn} | {q['ppl']:.3f} "
                f"| {row['increase']:+.1%} | {gain} |"
            )
    if report.gates:
        lines += ["", "## Gates", "", "| gate | limit | value | result |", "|---|---:|---:|---|"]
        for g in report.gates:
            lines.append(
                f"| {g['gate']} | {g['limit']:.4g} | {g['value']:.4g} | {'pass' if g['passed'] else 'FAIL'} |"
            )
    sm = next((s for s in report.stages if s.name == "serve_smoke"), None)
    if sm and sm.detail.get("answers"):
        lines += ["", "## Serve smoke test", ""]
        lines += [
            f"- {a['prompt']!r} -> {a['answer']!r} ({a['finish_reason']})" for a in sm.detail["answers"]
        ]
    if plot_name:
        lines += ["", "## Per-layer quantization error", "", f"![per-layer error]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_reports(report: RunReport) -> Path:
    out_dir = report_dir(report.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = report.quant_config
    plot = plot_layer_errors(
        _quant_blocks(Path(report.output).expanduser()),
        out_dir / "layer_error.png",
        f"{Path(report.model).name}: {c['method']} w{c['bits']} g{c['group_size']} per-block output error",
    )
    (out_dir / "run_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out_dir / "run_report.md").write_text(markdown(report, plot.name if plot else None))
    return out_dir
