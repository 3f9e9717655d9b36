"""``agriseg models``: list the registered model names."""

from __future__ import annotations

import re
import textwrap

import click


@click.command()
def models() -> None:
    """List models usable with agriseg run --model NAME (bundle paths work too)."""
    from agriseg.models import available_models
    from agriseg.models.neural import runs_as
    from agriseg.models.registry import DEFAULT_MODEL

    for name, desc in available_models().items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        click.echo(f"{name:<20} {desc}{mark}")
    click.echo("\nlearned models (bundles) on this machine, by --engine:")
    for engine in ("auto", "onnx", "torch"):
        click.echo(f"  {engine:<6} {runs_as(engine)}")
    from dataclasses import fields

    from agriseg.models.labelfree import LabelFreeConfig

    defaults = LabelFreeConfig()
    docs = _attribute_docs(LabelFreeConfig.__doc__ or "")
    click.echo("\nlabelfree options (agriseg run --model-option NAME=VALUE), with defaults:")
    for f in fields(LabelFreeConfig):
        click.echo(f"  {f.name}={getattr(defaults, f.name)!r}")
        if f.name in docs:
            click.echo(textwrap.fill(docs[f.name], width=96, initial_indent=" " * 6,
                                     subsequent_indent=" " * 6))


def _attribute_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section, unwrapped."""
    out: dict[str, str] = {}
    lines = doc.split("Attributes:", 1)[-1].splitlines()
    name = None
    for line in lines:
        m = re.match(r"^ {8}(\w+): (.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name and line.startswith(" " * 12):
            out[name] += " " + line.strip()
        elif line.strip():
            name = None
    return out
