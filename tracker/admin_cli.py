"""`p2p-tracker admin ...` (being written)."""

from __future__ import annotations

import typer

admin_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Administer a running tracker over its HTTP admin API."
)


@admin_app.command()
def stats() -> None:
    """Counters of a tracker."""
    typer.echo("not implemented yet", err=True)
    raise typer.Exit(1)
