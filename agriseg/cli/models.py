"""``agriseg models``: list the registered model names, or describe one model bundle."""

from __future__ import annotations

import re
import textwrap
from collections import Counter

import click


@click.command()
@click.argument("bundle", required=False, metavar="[BUNDLE]")
def models(bundle: str | None) -> None:
    """List models usable with agriseg run --model NAME (bundle paths work too).

    With BUNDLE (a bundle path or a learned model's name, e.g. unet-default), show what it
    was trained for: classes and their roles, bands, GSD range, architecture and validation
    scores.
    """
    if bundle is not None:
        _show_bundle(bundle)
        return
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

    from agriseg.models import labelfree_config
    from agriseg.models.labelfree_config import LabelFreeConfig

    defaults = LabelFreeConfig()
    docs = _attribute_docs(LabelFreeConfig.__doc__ or "", labelfree_config)
    click.echo("\nlabelfree options (agriseg run --model-option NAME=VALUE), with defaults:")
    for f in fields(LabelFreeConfig):
        click.echo(f"  {f.name}={getattr(defaults, f.name)!r}")
        if f.name in docs:
            click.echo(textwrap.fill(docs[f.name], width=96, initial_indent=" " * 6,
                                     subsequent_indent=" " * 6))


def _attribute_docs(doc: str, module: object = None) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section, as terminal text.

    Unwrapped; Sphinx markup is for the API docs: a ``:data:`NAME``` of ``module`` becomes
    its value, other roles their target's last name, double backticks nothing.
    """
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
    return {k: _plain(v, module) for k, v in out.items()}


def _plain(text: str, module: object) -> str:
    def role(m: re.Match[str]) -> str:
        kind, target = m.group(1), m.group(2).lstrip("~")
        if kind == "data" and hasattr(module, target):
            return repr(getattr(module, target))
        return target.rsplit(".", 1)[-1] if kind in ("func", "meth", "class", "attr") \
            else target
    return re.sub(r":(\w+):`([^`]+)`", role, text).replace("``", "")


def _show_bundle(bundle: str) -> None:
    """Print a bundle's metadata (read from its header: no weights, nothing unpickled)."""
    from agriseg.models.bundle import read_bundle_meta
    from agriseg.models.registry import bundle_path

    path = bundle_path(bundle, "describe")
    meta = read_bundle_meta(path)
    a = meta.arch
    opts = "".join(f", {k}={v}" for k, v in a.options)
    lo_hi = (f"{meta.gsd_range_m[0]:g}-{meta.gsd_range_m[1]:g} m" if meta.gsd_range_m
             else "not recorded")
    click.echo(f"bundle:       {path}")
    click.echo(f"name:         {meta.name}"
               + (f" (created {meta.created})" if meta.created else ""))
    click.echo(f"architecture: {a.arch}/{a.encoder}, depth {a.depth}{opts}")
    click.echo(f"bands:        {', '.join(meta.roles)}")
    click.echo(f"GSD range:    {lo_hi} (trained on)")
    click.echo(f"patch, halo:  {meta.patch_size} px, {meta.halo} px")
    val = meta.metrics.get("val") if isinstance(meta.metrics.get("val"), dict) else None
    iou = val.get("iou", {}) if val else {}
    rows = [(str(c.value), c.name, (c.role or "-") + (", at risk" if c.at_risk else ""),
             _num(iou.get(c.name)))
            for c in meta.schema.classes]
    rows.insert(0, ("value", "class", "role", "val. IoU"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    click.echo("classes:")
    for r in rows:
        click.echo(f"  {r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  "
                   f"{r[3]:>{widths[3]}}")
    if val:
        epochs = meta.training.get("epochs")
        click.echo(f"validation:   mIoU {_num(val.get('miou'))}, accuracy "
                   f"{_num(val.get('accuracy'))} at epoch "
                   f"{meta.metrics.get('epoch', '?')}{f' of {epochs}' if epochs else ''}")
    elif meta.metrics:
        click.echo("validation:   none (no validation pixels; best epoch by training loss "
                   f"{_num(meta.metrics.get('train_loss'), 4)})")
    else:
        click.echo("validation:   no metrics stored")
    images = meta.training.get("images")
    if isinstance(images, list) and images:
        sources = Counter(str(i.get("source", "?")) for i in images if isinstance(i, dict))
        click.echo(f"training:     {len(images)} image(s) ("
                   + ", ".join(f"{n} {s}" for s, n in sources.items()) + ")"
                   + (f", agriseg {meta.training['agriseg']}"
                      if meta.training.get("agriseg") else ""))


def _num(value: object, digits: int = 3) -> str:
    """A stored score, or "-" where there is none (null: a class absent from validation)."""
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"
