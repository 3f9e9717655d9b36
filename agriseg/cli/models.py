"""``agriseg models``: list the registered model names."""

from __future__ import annotations

import click


@click.command()
def models() -> None:
    """List models usable with ``agriseg run --model NAME`` (bundle paths work too)."""
    from agriseg.models import available_models
    from agriseg.models.registry import DEFAULT_MODEL

    for name, desc in available_models().items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        click.echo(f"{name:<20} {desc}{mark}")
