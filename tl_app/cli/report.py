"""tl-app report: one HTML page for a run."""

from __future__ import annotations
import click

from tl_app.cli.common import load_api


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="HTML file (default RUN_DIR/report.html).")
@click.option("--explanations", type=int, default=3, show_default=True, help="How many images to explain.")
@click.option("--no-evaluate", is_flag=True, help="Do not evaluate the run when it has no evaluation yet.")
def report(run_dir, out, explanations, no_evaluate):
    """One self-contained HTML report of a run (images embedded): open it in any browser.

    \b
    Example:
      tl-app report runs/flowers && xdg-open runs/flowers/report.html
    """
    api = load_api()

    api.build_report(run_dir, out, evaluate_missing=not no_evaluate, explanations=explanations, echo=click.echo)


COMMANDS = [report]
