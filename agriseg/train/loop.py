"""The training loop: data -> patches -> network -> per-epoch validation -> best bundle.

Everything written is safe to load: the best model is a bundle (safetensors + JSON), and the
resume checkpoint is a safetensors file (model, optimizer moments, torch RNG) whose header holds
the JSON state saved with them (epoch, history, sampler RNG, optimizer hyper-parameters), copied
to last.json for reading. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agriseg import __version__
from agriseg.errors import ConfigError, InputError, ModelError, OutputError, ResumeError
from agriseg.metrics import Scores, confusion, parse_truth_classes
from agriseg.models.arch import (
    SIZE_MULTIPLE,
    build_model,
    count_parameters,
    full_precision_stem,
    make_spec,
)
from agriseg.models.bundle import BundleMeta, load_bundle_model, save_bundle
from agriseg.train.config import TrainConfig, parse_label_colors, parse_name_classes
from agriseg.train.data import (
    IGNORE,
    LabelledImage,
    PatchSampler,
    channel_stats,
    load_pair,
    rasterize_polygons,
    validation_windows,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
#: Header metadata key of last.safetensors that holds the checkpoint's state (JSON).
CHECKPOINT_KEY = "agriseg_checkpoint"
StepCallback = Callable[[int, int, int, float], None]
"""``on_step(epoch, step, steps_per_epoch, loss)``."""


@dataclass(frozen=True, slots=True)
class EpochResult:
    """Loss and validation scores of one epoch."""

    epoch: int
    loss: float
    val: Scores | None
    seconds: float
    best: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form for history.json."""
        return {"epoch": self.epoch, "loss": self.loss, "seconds": round(self.seconds, 2),
                "best": self.best, "val": self.val.to_dict() if self.val else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochResult:
        """Inverse of :meth:`to_dict`."""
        v = d.get("val")
        val = Scores(np.asarray(v["confusion"], np.int64), tuple(v["names"])) if v else None
        return cls(int(d["epoch"]), float(d["loss"]), val, float(d["seconds"]), bool(d["best"]))


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a training run produced."""

    bundle: Path
    history: tuple[EpochResult, ...]
    best_epoch: int
    best_score: float
    out: Path


def tidy_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as it is shown to the user: without ``..`` and ``.`` components.

    Config paths are joined to the config's folder as written (``workflows/../out/x``); the
    identity compares them so, but printed so they were hard to read. Lexical (no symlinks
    resolved, so a path keeps the names the user knows) unless a symlink before a ``..``
    makes that another file; then resolved.
    """
    norm = os.path.normpath(path)
    if os.path.realpath(norm) != os.path.realpath(path):
        return Path(path).resolve()
    return Path(norm)


def checkpoint_progress(out: Path) -> tuple[int, int] | None:
    """``(last saved epoch, best epoch)`` of the training checkpoint in ``out``.

    None when there is none that a resume would continue (it then starts over): last.json
    is what a resume looks for; the state is read from the weights' file, as a resume does
    (last.json, written after it, may be an epoch behind).
    """
    folder = Path(out) / CHECKPOINT_DIR
    if not (folder / "last.json").exists():
        return None
    try:
        meta, _ = _read_checkpoint(folder, weights=False)
        return int(meta["epoch"]), int(meta.get("best_epoch") or 0)
    except (ResumeError, KeyError, TypeError, ValueError):
        return None


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("device: cuda was asked for but no CUDA GPU is visible; use auto")
        return torch.device("cuda")
    return torch.device("cpu")


#: Settings of how a training executes, not of what it trains: a resume may change them.
EXECUTION_ONLY: frozenset[str] = frozenset({"threads", "scheduler", "device"})
#: Version of :func:`_identity`, stored in the checkpoint (absent: :func:`_legacy_identity`).
IDENTITY_VERSION = 2


def _legacy_identity(cfg: TrainConfig) -> dict[str, Any]:
    # What checkpoints of agriseg before identity version 2 stored: all but `epochs`, with
    # absolute paths. Still accepted, so that a training interrupted before an upgrade resumes.
    return json.loads(json.dumps(cfg.model_dump(mode="json", exclude={"epochs"}),
                                 sort_keys=True))


def _identity(cfg: TrainConfig, config_dir: Path | None = None) -> dict[str, Any]:
    """The settings a resumed training must share with the interrupted one.

    Epoch count may grow on resume and execution-only settings (:data:`EXECUTION_ONLY`) may
    change; everything else must match. The settings themselves, not a hash of them, so that
    a refused resume can name the change. Paths inside ``config_dir`` (the config's folder)
    are compared relative to it, so a project folder moved whole (config, data and `out:`
    together) still resumes; paths outside it, written absolute, stay absolute.
    """
    from agriseg.models.registry import available_models

    names = available_models()

    def rel(p: Any) -> Any:
        if not isinstance(p, str) or config_dir is None or p in names:
            return p
        # Lexical, on purpose: "<config dir>/../data/x.tif" (written "../data/x.tif") stays
        # "../data/x.tif", as the user wrote it.
        try:
            return Path(p).relative_to(config_dir).as_posix()
        except ValueError:
            return p

    d = cfg.model_dump(mode="json", exclude={"epochs", *EXECUTION_ONLY})
    for key in ("out", "bundle"):
        d[key] = rel(d[key])
    d["model"]["init_from"] = rel(d["model"]["init_from"])
    for pair in d["data"]:
        for key in ("image", "labels", "polygons"):
            pair[key] = rel(pair[key])
        if pair.get("pseudo"):
            pair["pseudo"]["model"] = rel(pair["pseudo"]["model"])
    return json.loads(json.dumps(d, sort_keys=True))


def _synthetic_pairs(cfg: TrainConfig, reuse: bool = True) -> list[tuple[Path, Path]]:
    """Write (or reuse) the synthetic fields of ``cfg``; ``reuse=False`` writes them anew."""
    import dataclasses

    from agriseg import __version__
    from agriseg.synth import ROLES_RGB, FieldSpec, write_field
    from agriseg.train.pseudo import stamp_matches

    s = cfg.synthetic
    if s is None or not s.count:
        return []
    # A model of red edge or NIR bands gets multispectral fields (they carry all five roles).
    ms = not set(cfg.bands) <= set(ROLES_RGB)
    folder = tidy_path(cfg.out) / ("synthetic-ms" if ms else "synthetic")
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = min(s.gsd), max(s.gsd)
    fields = []
    for i in range(s.count):
        seed = s.seed + i
        gsd = lo if s.count == 1 else lo * (hi / lo) ** (i / (s.count - 1))
        img, truth = folder / f"field-{seed}.tif", folder / f"field-{seed}-truth.tif"
        spec = FieldSpec(size=s.size, seed=seed, gsd=round(gsd, 4), multispectral=ms)
        # The whole spec keys the cached field, not its seed alone: a field of another size
        # or GSD was reused under the same name (and the bundle recorded a wrong GSD range).
        stamp = {"spec": dataclasses.asdict(spec), "agriseg": __version__}
        stamp_file = folder / f"field-{seed}.json"
        cached = reuse and img.exists() and truth.exists() and stamp_matches(stamp_file, stamp)
        fields.append((spec, img, truth, stamp, stamp_file, cached))
    todo = sum(not f[-1] for f in fields)
    if todo:  # seconds per field, before epoch 1: the wait is named
        log.info("writing %d synthetic field(s) of %d px into %s ...", todo, s.size, folder)
    pairs = []
    for spec, img, truth, stamp, stamp_file, cached in fields:
        if not cached:
            stamp_file.unlink(missing_ok=True)  # no stale stamp beside a half-written field
            write_field(spec, img, truth)
            stamp_file.write_text(json.dumps(stamp))
        pairs.append((img, truth))
    return pairs


def load_training_data(
    cfg: TrainConfig, reuse: bool = True
) -> tuple[list[LabelledImage], list[dict[str, Any]]]:
    """Read every pair of the config (and generate synthetic fields) into memory.

    Args:
        cfg: validated training config.
        reuse: reuse synthetic fields and teacher runs cached in ``out:`` when they match;
            False makes them anew (``--overwrite``).

    Returns:
        The labelled images and a JSON summary per image for the bundle.
    """
    from agriseg.raster import open_survey
    from agriseg.train.pseudo import pseudo_labels

    schema = cfg.schema()
    roles = tuple(cfg.bands)
    v = cfg.validation
    images: list[LabelledImage] = []
    summary: list[dict[str, Any]] = []
    jobs: list[tuple[Path, Any, str | None, float | None, dict[str, Any]]] = []
    codes: dict[int, dict[int, int]] = {}  # job -> label value -> class value
    colours: dict[int, dict[tuple[int, int, int], int]] = {}  # job -> colour -> class value
    for img, truth in _synthetic_pairs(cfg, reuse):
        jobs.append((img, truth, None, None, {"source": "synthetic"}))
    surveys = sum(pair.pseudo is not None for pair in cfg.data)
    if surveys:
        # A teacher's run takes seconds to minutes per survey (cached in `out:` for the next
        # training): said before it, not after a silent wait.
        log.info("preparing pseudo-labels from %d survey(s) ...", surveys)
    for pair in cfg.data:
        if pair.labels is not None:
            if pair.label_classes:
                codes[len(jobs)] = parse_truth_classes(pair.label_classes, schema)
            if pair.label_colors:
                colours[len(jobs)] = parse_label_colors(pair.label_colors, schema)
            jobs.append((pair.image, pair.labels, pair.bands, pair.gsd,
                         {"source": "raster labels"}))
        elif pair.polygons is not None:
            grid = open_survey(pair.image, pair.bands).grid
            names = (parse_name_classes(pair.label_classes, schema) if pair.label_classes
                     else None)
            lab = rasterize_polygons(tidy_path(pair.polygons), pair.class_column, pair.layer,
                                     grid, schema, names)
            jobs.append((pair.image, lab, pair.bands, None,
                         {"source": "polygons", "polygons": pair.polygons.name}))
        elif pair.pseudo is not None:
            lab, info = pseudo_labels(pair.image, tidy_path(cfg.out) / "pseudo",
                                      pair.pseudo.model, pair.pseudo.min_confidence,
                                      pair.bands or pair.pseudo.bands, cfg.scheduler, pair.gsd,
                                      reuse)
            extra = np.unique(lab[(lab != IGNORE) & (lab >= len(schema))])
            if extra.size:  # a bundle teacher of more classes (loss_fn: IndexError)
                raise InputError(
                    f"{pair.image}: the teacher {pair.pseudo.model} labels class values "
                    f"{extra.tolist()}, which the {len(schema)} classes of this training "
                    f"({', '.join(schema.names)}) lack; use a teacher of these classes")
            jobs.append((pair.image, lab, pair.bands, pair.gsd,
                         {"source": "pseudo-labels", **info}))
    log.info("reading %d training image(s) and their labels ...", len(jobs))
    for n, (img, lab, bands, gsd, info) in enumerate(jobs):
        # Paths tidied for the messages about them (the files are the same).
        im = load_pair(tidy_path(img), lab if isinstance(lab, np.ndarray) else tidy_path(lab),
                       roles, schema, v.block_size, v.fraction, v.seed + n, bands, gsd,
                       codes.get(n), colours.get(n))
        images.append(im)
        summary.append({"image": im.name, "gsd_m": round(im.gsd_m, 4), **info,
                        "train_pixels": dict(zip(schema.names, im.class_counts(len(schema)),
                                                 strict=True)),
                        "val_pixels": dict(zip(schema.names,
                                               im.class_counts(len(schema), "val"),
                                               strict=True))})
    return images, summary


def _lr_at(step: int, total: int, base: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: list[LabelledImage],
    windows: list[tuple[int, int, int]],
    block: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    k: int,
    names: tuple[str, ...],
    margin: int = 32,
) -> Scores | None:
    """Confusion over the validation blocks (each predicted with ``margin`` px of context)."""
    if not windows:
        return None
    model.eval()
    conf = np.zeros((k, k), np.int64)
    for i, y, x in windows:
        im = images[i]
        h, w = im.labels.shape
        y0, x0 = max(0, y - margin), max(0, x - margin)
        y1, x1 = min(h, y + block + margin), min(w, x + block + margin)
        arr = im.pixels[:, y0:y1, x0:x1]
        ph = math.ceil(arr.shape[1] / SIZE_MULTIPLE) * SIZE_MULTIPLE - arr.shape[1]
        pw = math.ceil(arr.shape[2] / SIZE_MULTIPLE) * SIZE_MULTIPLE - arr.shape[2]
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw)), mode="symmetric")
        t = (torch.from_numpy(np.ascontiguousarray(arr))[None].to(device) - mean) / std
        pred = model(t)[0].argmax(0).cpu().numpy().astype(np.uint8)
        sl = (slice(y, min(y + block, h)), slice(x, min(x + block, w)))
        p = pred[sl[0].start - y0 : sl[0].stop - y0, sl[1].start - x0 : sl[1].stop - x0]
        truth = np.where(im.val[sl], im.labels[sl], IGNORE)
        conf += confusion(truth, p, k, IGNORE)
    return Scores(conf, names)


def _save_checkpoint(
    folder: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone()
               for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in osd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt/{pid}/{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}/{key}"] = val
    tensors["rng/torch"] = torch.get_rng_state()
    meta = json.dumps({**state, "param_groups": osd["param_groups"], "opt_scalars": scalars})
    # The state goes into the weights' file, replaced in one step: replacing last.safetensors
    # and last.json one after the other, a SIGTERM between them paired the weights of epoch N
    # with the state of epoch N-1. last.json is a readable copy, written after.
    tmp = folder / ".last.safetensors.partial"
    save_file(tensors, str(tmp), metadata={CHECKPOINT_KEY: meta})
    os.replace(tmp, folder / "last.safetensors")
    (folder / ".last.json.partial").write_text(meta)
    os.replace(folder / ".last.json.partial", folder / "last.json")


def _read_checkpoint(
    folder: Path, weights: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The state saved in ``folder`` and, with ``weights``, its tensors (else none read).

    Raises:
        ResumeError: the checkpoint cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / "last.safetensors"), framework="pt") as f:
            stored = (f.metadata() or {}).get(CHECKPOINT_KEY)
            tensors = ({key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
                       if weights else {})
        # The state saved with these weights; a checkpoint of an agriseg before it was stored
        # there has it in last.json only.
        meta = json.loads(stored if stored is not None else (folder / "last.json").read_text())
    except (OSError, ValueError, SafetensorError) as exc:
        raise ResumeError(
            f"{folder}: the training checkpoint is unreadable ({exc}); start again without "
            "--resume"
        ) from exc
    return meta, tensors


def _check_identity(
    folder: Path, meta: dict[str, Any], identity: dict[str, Any],
    legacy: dict[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint saved under another configuration, naming what changed.

    Raises:
        ResumeError: the checkpoint's identity differs from ``identity`` (or ``legacy``, for
            a checkpoint of an agriseg before identity version 2).
    """
    if "identity_version" not in meta and legacy is not None:
        identity = legacy  # a checkpoint of an older agriseg: compared as it was written
    if meta.get("identity") == identity:
        return
    from agriseg.predict import describe_changes

    old = meta.get("identity") or {}
    restore = "restore the original config"
    if isinstance(old, dict):  # a hash in checkpoints of agriseg before 2026-11-27
        what = "; ".join(describe_changes(k, old.get(k), identity.get(k))
                         for k in sorted(set(old) | set(identity))
                         if old.get(k) != identity.get(k))
        if old.get("data") != identity.get("data"):
            # The usual cause: a resume typed without the --pseudo-labels of the run it
            # continues, whose surveys are data items like those of the config.
            restore = ("restore the original config and give the interrupted run's "
                       "--pseudo-labels (each one), --pseudo-model and --min-confidence again "
                       "(they add items to `data`, so they are part of the configuration; "
                       "the command printed when it stopped repeats them)")
    else:
        what = "the configuration"
    raise ResumeError(
        f"{folder}: the checkpoint belongs to a different training configuration ({what}; "
        "only `epochs`, `threads`, `device` and `--scheduler` may change on resume); "
        f"{restore}, or start again with --overwrite (or in a new `out:` folder)"
    )


def _load_checkpoint(
    folder: Path, model: nn.Module, opt: torch.optim.Optimizer, identity: dict[str, Any],
    legacy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta, tensors = _read_checkpoint(folder)
    _check_identity(folder, meta, identity, legacy)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("opt/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = val
    for key, val in meta.get("opt_scalars", {}).items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    return meta


def check_bundle_destination(path: Path) -> bool:
    """Check, before any training, that the bundle can be written to ``path``.

    Args:
        path: the config's `bundle:` (or ``OUT/model.safetensors``).

    Returns:
        Whether a model bundle is there already (which the training would replace).

    Raises:
        OutputError: ``path`` holds something that is not a model bundle, or its folder
            cannot be created or written.
    """
    from agriseg.models.bundle import read_bundle_meta

    p = Path(path)
    what = ("a bundle is a .safetensors file or a folder of weights.safetensors and "
            "metadata.json")
    exists = False
    if p.is_dir():
        if any(p.iterdir()):
            try:
                read_bundle_meta(p)
            except ModelError as exc:
                raise OutputError(
                    f"{p}: is a folder that is not a model bundle ({exc}); the bundle would be "
                    f"written into it ({what}); set `bundle:` in the training config to a new "
                    "path") from exc
            exists = True
    elif p.exists() or p.is_symlink():
        if p.suffix != ".safetensors":
            raise OutputError(
                f"{p}: exists and is not a model bundle ({what}); set `bundle:` in the training "
                "config to a new .safetensors path, or remove the file")
        try:
            read_bundle_meta(p)
        except ModelError as exc:
            raise OutputError(
                f"{p}: exists and is not an agriseg model bundle ({exc}); training would "
                "overwrite it; set `bundle:` in the training config to another path, or "
                "remove the file") from exc
        exists = True
    folder = p if p.is_dir() else p.parent
    # The nearest folder that exists: creating the bundle's folders now would leave them
    # behind, empty, when the training then fails on its data.
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a folder")
        # Writing is the only sure test (permission bits say little to root or on network
        # mounts); the epoch-1 save failed with a traceback otherwise.
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".agriseg-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"{p}: cannot write the model bundle into {folder} ({exc.strerror or exc}); set "
            "`bundle:` in the training config to a path in a writable folder") from exc
    return exists


def bundle_name(cfg: TrainConfig) -> str:
    """The bundle's name when the config gives none: the bundle file's, or the `out:` folder's.

    Every bundle at the default path is "model" (OUT/model.safetensors), which `agriseg run`
    printed as "model: model"; the training folder's name tells bundles apart.
    """
    stem = Path(cfg.bundle_path).stem
    if cfg.bundle is not None and stem != "model":
        return stem  # a file name the user chose
    return Path(cfg.out).resolve().name or stem


def _init_bundle(init_from: Path) -> Path:
    """The bundle file of `model.init_from`: a path, or a registered learned model's name.

    Raises:
        ConfigError: a registered model without weights (a rule-based one).
    """
    from agriseg.models.registry import available_models, bundle_path

    name = str(init_from)
    if name not in available_models():
        return init_from  # a path; checked where the bundle is read
    try:
        return bundle_path(name, "start from")
    except ModelError as exc:
        raise ConfigError(f"model.init_from: {exc}") from exc


def write_curves(history: list[EpochResult], path: Path) -> None:
    """Training-curve PNG: loss and validation IoU per class over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agriseg.quicklook import plain_text

    ep = [h.epoch for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    a.plot(ep, [h.loss for h in history], "o-", color="k")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.grid(alpha=0.3)
    vals = [h for h in history if h.val is not None]
    if vals:
        names = vals[0].val.names  # type: ignore[union-attr]
        for n in names:
            b.plot([h.epoch for h in vals], [h.val.iou[n] for h in vals], ".-",  # type: ignore[union-attr]
                   label=plain_text(n))
        b.plot([h.epoch for h in vals], [h.val.miou for h in vals], "o-", color="k", lw=2,  # type: ignore[union-attr]
               label="mean IoU")
        b.legend(fontsize=8)
    b.set_xlabel("epoch")
    b.set_ylabel("validation IoU")
    b.set_ylim(0, 1)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(
    cfg: TrainConfig,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    overwrite: bool = False,
    config_dir: Path | None = None,
) -> TrainResult:
    """Train a model as configured and write the best bundle.

    Args:
        cfg: validated training config.
        resume: continue from ``OUT/checkpoint`` when it exists.
        on_step: called after every optimisation step (progress bars).
        on_epoch: called after every epoch's validation.
        overwrite: start from nothing: the previous training's checkpoint and history in
            ``out:`` are removed first, cached synthetic fields and teacher runs are made
            anew, and an existing bundle at the bundle path may be replaced.
        config_dir: the config file's folder; paths inside it are compared relative to it
            when a resume checks the checkpoint's configuration (see :func:`_identity`).

    Raises:
        OutputError: ``out:`` or the bundle path is unusable, or a bundle is there already
            (without ``overwrite``, and not this training's on ``resume``).
        AgrisegError: unusable data, a checkpoint of another config, bad architecture.
    """
    t_start = time.perf_counter()
    if overwrite and resume:
        raise ConfigError("--resume continues a training, --overwrite starts over: give one")
    # Normalised for the messages and logs ("workflows/../out/x" read badly); the same files.
    out, bundle_path = tidy_path(cfg.out), tidy_path(cfg.bundle_path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; set `out:` in the training "
                          "config to a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the training folder ({exc.strerror or exc}); "
                          "set `out:` in the training config to a writable folder") from exc
    ckpt_dir = out / CHECKPOINT_DIR
    # The destination is checked before hours of training, not when epoch 1 saves to it.
    bundle_there = check_bundle_destination(bundle_path)
    ours = resume and (ckpt_dir / "last.json").exists()  # the bundle of the run resumed
    if bundle_there and not (overwrite or ours):
        raise OutputError(
            f"{bundle_path}: holds a model bundle already (of an earlier training); "
            "--overwrite replaces it, or set another `bundle:` in the training config")
    if overwrite:
        # Nothing of the previous training may outlive the start of this one: its checkpoint
        # was offered to --resume when this run was interrupted in its first epoch.
        for name in ("last.json", "last.safetensors"):
            (ckpt_dir / name).unlink(missing_ok=True)
        for name in ("history.json", "curves.png"):
            (out / name).unlink(missing_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg)
    schema = cfg.schema()
    k = len(schema)
    identity = _identity(cfg, config_dir)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    if resume and (ckpt_dir / "last.json").exists():
        # Checked before the data is read, not after: pseudo-labels and synthetic fields take
        # minutes, and a refused resume (typed without the run's --pseudo-labels) waited them.
        _check_identity(ckpt_dir, _read_checkpoint(ckpt_dir, weights=False)[0], identity,
                        _legacy_identity(cfg))

    images, data_summary = load_training_data(cfg, reuse=not overwrite)
    taught = np.sum([im.class_counts(k) for im in images], axis=0)
    unlabelled = [n for n, c in zip(schema.names, taught, strict=True) if c == 0]
    if unlabelled:
        # The model cannot learn them; their validation IoU then reads 0 (or nothing).
        log.warning("class(es) %s have no labelled training pixel: the model cannot learn "
                    "them; label some, or train with the classes your labels hold",
                    ", ".join(unlabelled))
    spec = make_spec(cfg.model.arch, cfg.model.encoder, len(cfg.bands), k, cfg.model.depth,
                     **cfg.model.options)
    model = build_model(spec)
    if cfg.model.init_from:
        _, init = load_bundle_model(_init_bundle(cfg.model.init_from))
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as exc:
            raise ModelError(
                f"{cfg.model.init_from}: cannot start from this bundle: its architecture differs "
                f"from model: {spec.arch}/{spec.encoder} in the config"
            ) from exc
    # Channels-last: oneDNN's and cuDNN's fast convolution layout (a training step of the
    # small U-Net on CPU: 121 instead of 177 ms, benchmarks/RESULTS.md).
    model.to(device).to(memory_format=torch.channels_last)
    # Mixed precision on GPUs only. bf16 on a CPU that computes it natively trained the
    # default model 1.4x faster still, but to a lower weed IoU (0.494 against 0.524 on the
    # held-out fields, one run each; benchmarks/RESULTS.md). The first convolution stays
    # float32, as when the bundle runs (see full_precision_stem).
    amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    if amp:
        full_precision_stem(model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    mean_t, std_t = channel_stats(images)
    mean = torch.tensor(mean_t, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std_t, device=device).view(1, -1, 1, 1)
    sampler = PatchSampler(images, cfg.patch_size, k, cfg.sampler, cfg.augment, cfg.seed)
    windows = validation_windows(images, cfg.validation.block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)

    history: list[EpochResult] = []
    start_epoch, best_score, best_epoch = 1, -math.inf, 0
    if resume and (ckpt_dir / "last.json").exists():
        meta = _load_checkpoint(ckpt_dir, model, opt, identity, _legacy_identity(cfg))
        history = [EpochResult.from_dict(h) for h in meta["history"]]
        sampler.set_state(meta["sampler"])
        start_epoch = int(meta["epoch"]) + 1
        best_score, best_epoch = float(meta["best_score"]), int(meta["best_epoch"])
        log.info("resuming after epoch %d (best %.4f at epoch %d)", start_epoch - 1, best_score,
                 best_epoch)
    elif resume:
        log.warning("%s: no checkpoint to resume from; training from the start", ckpt_dir)
    log.info("training %s/%s (%d parameters) on %d image(s), %d validation block(s), %s, %s; "
             "%d epoch(s) of %d steps to go", spec.arch, spec.encoder, count_parameters(model),
             len(images), len(windows), device,
             str(amp_dtype).removeprefix("torch.") if amp else "float32",
             max(0, cfg.epochs - start_epoch + 1), cfg.steps_per_epoch)
    if not windows and cfg.validation.fraction > 0:
        # Validation blocks are chosen among the blocks that hold labels, and training keeps
        # one of them at least: only labels within one block per image leave none.
        log.warning("no validation block: the labels of each image lie within one block of %d "
                    "px, which training keeps; the best epoch is the one of lowest training "
                    "loss; lower validation.block_size (or label a larger area) to validate",
                    cfg.validation.block_size)

    total = cfg.epochs * cfg.steps_per_epoch
    gsds = [im.gsd_m for im in images]
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        losses = []
        for step in range(cfg.steps_per_epoch):
            lr = _lr_at((epoch - 1) * cfg.steps_per_epoch + step, total, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = sampler.batch(cfg.batch_size)
            x = ((x.to(device, non_blocking=True) - mean) / std).contiguous(
                memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                try:
                    logits = model(x)
                except ValueError as exc:
                    if "more than 1 value per channel" not in str(exc):
                        raise
                    # A batch of one pooled to 1 x 1 (DeepLabV3+'s image pooling, or a patch
                    # no larger than the encoder's stride) leaves BatchNorm a single value per
                    # channel: a traceback at the first step.
                    raise ConfigError(
                        f"batch_size {cfg.batch_size} with patch_size {cfg.patch_size} is too "
                        f"small for {cfg.model.arch}: a batch-norm layer sees one value per "
                        "channel; use batch_size 2 or more (or a larger patch_size)") from exc
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
            if on_step:
                on_step(epoch, step + 1, cfg.steps_per_epoch, losses[-1])
        scores = evaluate(model, images, windows, cfg.validation.block_size, mean, std, device,
                          k, schema.names, max(cfg.halo, 32))
        mean_loss = float(np.mean(losses))
        score = scores.miou if scores is not None else -mean_loss
        if math.isnan(score):
            score = -mean_loss
        is_best = score > best_score
        res = EpochResult(epoch, mean_loss, scores, time.perf_counter() - t0, is_best)
        history.append(res)
        # The epoch's line comes first, then what was written for it ("wrote model bundle"
        # was logged above the line of the epoch it belongs to). The CLI prints its own epoch
        # line through on_epoch; one line per epoch is enough.
        (log.debug if on_epoch else log.info)("epoch %d: loss %.4f%s%s", epoch, mean_loss,
                 f", val mIoU {scores.miou:.4f}" if scores else "", " (best)" if is_best else "")
        if on_epoch:
            on_epoch(res)
        if is_best:
            best_score, best_epoch = score, epoch
            meta_b = BundleMeta(
                arch=spec, schema=schema, roles=tuple(cfg.bands), mean=mean_t, std=std_t,
                patch_size=cfg.patch_size, halo=cfg.halo,
                gsd_range_m=(round(min(gsds), 4), round(max(gsds), 4)),
                name=cfg.name or bundle_name(cfg),
                metrics={"epoch": epoch, "val": scores.to_dict() if scores else None,
                         "train_loss": mean_loss},
                training={"images": data_summary, "epochs": cfg.epochs,
                          "steps_per_epoch": cfg.steps_per_epoch, "batch_size": cfg.batch_size,
                          "patch_size": cfg.patch_size, "sampler": cfg.sampler, "lr": cfg.lr,
                          "seed": cfg.seed, "agriseg": __version__,
                          "init_from": str(cfg.model.init_from) if cfg.model.init_from else None},
            )
            save_bundle({k_: v.cpu() for k_, v in model.state_dict().items()}, meta_b,
                        bundle_path)
        _save_checkpoint(ckpt_dir, model, opt, {
            "identity": identity, "identity_version": IDENTITY_VERSION, "epoch": epoch,
            "best_score": best_score, "best_epoch": best_epoch, "sampler": sampler.state(),
            "history": [h.to_dict() for h in history],
        })
        (out / "history.json").write_text(json.dumps([h.to_dict() for h in history], indent=1))
        write_curves(history, out / "curves.png")
    log.info("training done in %.0f s; best epoch %d -> %s", time.perf_counter() - t_start,
             best_epoch, bundle_path)
    return TrainResult(bundle_path, tuple(history), best_epoch, best_score, out)
