"""``agriseg train``: train a learned segmenter from a YAML config."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from agriseg.cli import StopRequest, stop_signals

if TYPE_CHECKING:
    from agriseg.train.config import TrainConfig
    from agriseg.train.loop import EpochResult

#: Options that change the training configuration (repeated by the printed resume command).
_CONFIG_OPTIONS = ("epochs", "pseudo", "pseudo_model", "min_confidence", "scheduler")


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint after an interruption.")
@click.option("--overwrite", is_flag=True,
              help="Start over in an `out:` folder that holds an earlier training.")
@click.option("--epochs", type=int, help="Override `epochs` (may grow on --resume).")
@click.option("--pseudo-labels", "pseudo", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Survey raster to self-train on: the teacher's confident pixels become "
                   "labels (repeatable).")
@click.option("--pseudo-model", default="labelfree", show_default=True,
              help="Teacher for --pseudo-labels: registered name or bundle path.")
@click.option("--min-confidence", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Teacher confidence below which pixels are ignored.")
@click.option("--scheduler", help="Dask scheduler address for the pseudo-labelling runs.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [on when stderr is a terminal].")
def train(config: Path, resume: bool, overwrite: bool, epochs: int | None,
          pseudo: tuple[Path, ...], pseudo_model: str, min_confidence: float,
          scheduler: str | None, progress: bool | None) -> None:
    """Train a segmentation model from CONFIG (YAML; see workflows/train-default.yaml).

    Writes the best model as a bundle (default OUT/model.safetensors), the resume
    checkpoint, history.json and curves.png into the config's `out:` folder. Use the bundle
    with `agriseg run SURVEY --model BUNDLE`.
    """
    import distributed  # noqa: F401  (imported first so its logging setup can be quietened)

    from agriseg.cli import quiet_third_party
    from agriseg.config import load_yaml
    from agriseg.train.config import build_train_config, resolve_paths
    from agriseg.train.loop import tidy_path
    from agriseg.train.loop import train as run_training

    # Pseudo-labelling runs surveys on a Dask cluster: its INFO lines flooded the epochs.
    quiet_third_party((click.get_current_context().find_root().obj or {}).get("verbose", 0))

    values: dict[str, Any] = resolve_paths(load_yaml(config), config.resolve().parent)
    if epochs is not None:
        values["epochs"] = epochs
    if scheduler:
        values["scheduler"] = scheduler
    data = values.get("data")
    if pseudo and isinstance(data, list | None):  # anything else: for the config check to name
        values["data"] = [*(data or []), *(
            {"image": str(p), "pseudo": {"model": pseudo_model, "min_confidence": min_confidence}}
            for p in pseudo
        )]
    cfg = build_train_config(str(config), **values)
    # Tidied as the training tidies it: "work/../run" with no folder work is the folder run.
    out = tidy_path(cfg.out)
    history = out / "history.json"
    if history.exists() and not (resume or overwrite):
        # Hours of training (and its best bundle) must not be replaced by a command rerun.
        from agriseg.errors import OutputError

        raise OutputError(
            f"{out}: holds an earlier training (its history.json); --resume continues it, "
            "--overwrite starts over, or set another `out:` in the config"
        )
    show = sys.stderr.isatty() if progress is None else progress
    # What of this command changed the configuration: the command printed on an interruption
    # repeats it (a resume without the run's --pseudo-labels was refused as another config).
    ctx = click.get_current_context()
    given = {name: ctx.params[name] for name in _CONFIG_OPTIONS
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    options = config_options(**given)

    def on_epoch(r: EpochResult) -> None:
        val = f"  val mIoU {r.val.miou:.3f}  " + "  ".join(
            f"{n} {v:.2f}" for n, v in r.val.iou.items()) if r.val else ""
        click.echo(f"epoch {r.epoch}/{cfg.epochs}: loss {r.loss:.4f}{val}"
                   f"{'  *best' if r.best else ''}", err=True)

    kw: dict[str, Any] = {"resume": resume, "on_epoch": on_epoch, "overwrite": overwrite,
                          "config_dir": config.resolve().parent}
    # Ctrl-C keeps Python's own handler here; SIGTERM takes its path.
    with stop_signals(ctrl_c=False) as stop:
        try:
            if show:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

                bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                               MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                               transient=True)
                task = bar.add_task("steps", total=cfg.steps_per_epoch, epoch=1, loss="-")

                def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
                    bar.update(task, completed=step, epoch=epoch, loss=f"{loss:.4f}")

                with bar:
                    result = run_training(cfg, on_step=on_step, **kw)
            else:
                result = run_training(cfg, **kw)
        except KeyboardInterrupt:
            _interrupted(cfg, config, options, overwrite, stop)
        except Exception:
            # A SIGTERM inside a library's own handler (Dask's, during pseudo-labelling) can
            # come out as another error; it was still a stop request.
            if not stop.requested:
                raise
            _interrupted(cfg, config, options, overwrite, stop)
    # The score is the validation mIoU, or minus the training loss without validation pixels.
    score = (f"validation mIoU {result.best_score:.4f}" if result.best_score >= 0 else
             f"training loss {-result.best_score:.4f}, no validation pixels")
    click.echo(f"Best epoch {result.best_epoch} ({score}); model bundle: {result.bundle}")
    click.echo(f"Curves: {result.out / 'curves.png'}")
    click.echo(f"Use it: agriseg run SURVEY.tif --model {result.bundle} --out results/")


def config_options(
    epochs: int | None = None, pseudo: tuple[Path, ...] = (), pseudo_model: str | None = None,
    min_confidence: float | None = None, scheduler: str | None = None,
) -> list[str]:
    """The command-line options of ``agriseg train`` that set these configuration values.

    Args:
        epochs: ``--epochs``, or None when not given.
        pseudo: the ``--pseudo-labels`` surveys, in order (each is a data item).
        pseudo_model: ``--pseudo-model`` when given; repeated with ``pseudo`` only, as it
            only configures their items.
        min_confidence: ``--min-confidence`` when given; as ``pseudo_model``.
        scheduler: ``--scheduler`` when given.

    Returns:
        The arguments, paths as they were given (the resume check compares them so), for
        :func:`shlex.join`.
    """
    args: list[str] = []
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    for survey in pseudo:
        args += ["--pseudo-labels", str(survey)]
    if pseudo and pseudo_model is not None:
        args += ["--pseudo-model", pseudo_model]
    if pseudo and min_confidence is not None:
        args += ["--min-confidence", repr(float(min_confidence))]
    if scheduler:
        args += ["--scheduler", scheduler]
    return args


def interrupted_message(cfg: TrainConfig, config: Path, options: list[str],
                        overwrite: bool) -> str:
    """What an interrupted training left and the command that goes on from there.

    Args:
        cfg: the training's configuration.
        config: the config file, as given on the command line.
        options: :func:`config_options` of the interrupted command: the command printed
            repeats them, so that it resumes the same configuration.
        overwrite: whether the interrupted command had ``--overwrite``.
    """
    from agriseg.train.loop import checkpoint_progress, tidy_path

    cmd = shlex.join(["agriseg", "train", str(config)])
    more = f" {shlex.join(options)}" if options else ""
    saved = checkpoint_progress(tidy_path(cfg.out))
    bundle = tidy_path(cfg.bundle_path)
    if saved is not None:
        # From the checkpoint, which is what --resume continues: epochs of an earlier run
        # count, and an epoch whose line was printed but not saved does not.
        done, best = saved
        # The bundle of the best epoch so far has its final name: say that it is partial.
        what = (f"{bundle} holds the best of its first {done} epoch(s) (epoch {best}); continue"
                if best else "Continue")
        return (f"Interrupted after epoch {done} of {cfg.epochs}. {what} with:\n"
                f"  {cmd} --resume{more}")
    # No checkpoint (an --overwrite run removed the previous one): --resume would only start
    # over, so say that. --overwrite again, as an earlier bundle may still be there (or this
    # run's, written in the moment before its first checkpoint).
    again = " --overwrite" if overwrite or bundle.exists() else ""
    return (f"Interrupted before epoch 1 of {cfg.epochs} finished: no epoch was saved. Start "
            f"again with:\n  {cmd}{again}{more}")


def _interrupted(cfg: TrainConfig, config: Path, options: list[str],
                 overwrite: bool, stop: StopRequest) -> NoReturn:
    """Say what an interrupted training left and how to go on, then exit 130 (143: SIGTERM)."""
    click.echo(interrupted_message(cfg, config, options, overwrite), err=True)
    raise SystemExit(stop.exit_code)
