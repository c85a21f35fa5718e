"""tl-app runs list|compare: every run folder at a glance, and several side by side."""

from __future__ import annotations

import click

from tl_app.cli.common import echo_json


@click.group()
def runs():
    """List the runs under a folder, or compare some of them."""


@runs.command("list")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(), help="Where run folders are.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout, for scripts.")
def runs_list(runs_dir, as_json):
    """Name, status (finished, running, interrupted, failed), strategy, backbone, weights, best
    validation accuracy, epochs, age and size of every run.

    \b
    Examples:
      tl-app runs list
      tl-app runs list --runs-dir experiments/ --json | jq '.[] | select(.status == "failed")'
    """
    from tl_app.insight import runs as listing  # lazy: imported only when a command runs

    rows = listing.list_runs(runs_dir)
    if as_json:
        echo_json(rows)
    else:
        click.echo(listing.format_runs(rows))


@runs.command("compare")
@click.argument("run_dirs", metavar="RUN RUN...", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write one HTML page (metrics, differing settings, curves).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout, for scripts.")
def runs_compare(run_dirs, out, as_json):
    """Metrics, the settings that differ, and (with --out) the curves of two or more runs.

    \b
    Examples:
      tl-app runs compare runs/a runs/b
      tl-app runs compare runs/a runs/b runs/c --out compare.html
    """
    from tl_app.insight import runs as listing  # lazy: imported only when a command runs

    result = listing.compare_runs(list(run_dirs))
    if out:
        from tl_app.insight.runs_page import write_comparison_page  # lazy: matplotlib only for the page

        result["out"] = str(write_comparison_page(result, out))
    if as_json:
        echo_json(result)
    else:
        click.echo(listing.format_comparison(result))


COMMANDS = [runs]
