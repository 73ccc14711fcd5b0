"""``edgequant targets`` and ``edgequant check``: target profiles and their validators."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def targets(ctx) -> None:
    """List the target profiles (``targets show NAME`` prints one's rules)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from edgequant.cli.render import out
    from edgequant.targets import PROFILES

    t = Table("target", "vendor", "rules")
    for p in PROFILES.values():
        t.add_row(p.name, p.vendor, p.description)
    out.print(t)


@targets.command()
@click.argument("name")
def show(name: str) -> None:
    """Print the rules of target NAME."""
    from rich.table import Table

    from edgequant.cli.render import out
    from edgequant.targets import get_target

    p = get_target(name)
    t = Table(show_header=False, box=None, title=f"{p.name} ({p.vendor}): {p.description}")
    t.add_column(style="bold")
    t.add_column()
    for k, v in p.rules():
        t.add_row(k, v)
    out.print(t)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="Target profile (edgequant targets lists them).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def check(model: Path, target: str, debug: bool) -> None:
    """Check that a QDQ MODEL obeys a target's rules; exit 1 and list what it breaks."""
    from edgequant.cli.render import out
    from edgequant.ir.model import load_model
    from edgequant.targets import check_model, get_target

    profile = get_target(target)
    problems = check_model(load_model(model), profile)
    for v in problems[:50]:
        out.print(f"  {v}", soft_wrap=True)
    if problems:
        out.print(f"{len(problems)} violations of {profile.name}" + (" (first 50 shown)" if len(problems) > 50 else ""))
        sys.exit(1)
    out.print(f"{model} obeys {profile.name}")
