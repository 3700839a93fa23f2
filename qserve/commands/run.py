"""`qserve run RECIPE.yaml`: the whole pipeline a recipe describes, with one report."""

from __future__ import annotations

import click


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key, e.g. --set quantize.n_samples=16 --set eval.windows=2 (repeatable).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(recipe: str, overrides: tuple[str, ...], quiet: bool) -> None:
    """Quantize -> validate -> eval -> serve smoke test, as RECIPE describes.

    Writes run_report.json, run_report.md and layer_error.png into OUTPUT.report/ next to the checkpoint.
    Exits 1 when a stage fails or a gate is not met. Rerunning after an interruption resumes quantization.
    """
    from qserve.recipe import load_recipe, parse_overrides
    from qserve.recipe_run import run_recipe
    from qserve.run_report import write_reports

    r = load_recipe(recipe, parse_overrides(overrides))
    report = run_recipe(r, progress=not quiet, log=click.echo)
    out_dir = write_reports(report)
    for s in report.stages:
        click.echo(f"  {s.name:<12} {s.status:<8} {s.seconds:7.1f}s" + (f"  {s.error}" if s.error else ""))
    for g in report.gates:
        click.echo(
            f"  gate {g['gate']}: {g['value']:.4g} (limit {g['limit']:.4g}) {'pass' if g['passed'] else 'FAIL'}"
        )
    click.echo(f"{'PASS' if report.ok else 'FAIL'}: reports in {out_dir}")
    if not report.ok:
        raise click.exceptions.Exit(1)
