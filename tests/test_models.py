"""Learned models: every architecture, safe bundles, engines, and a survey run with a bundle."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner

from agriseg.classes import DEFAULT_CLASSES
from agriseg.cli import main
from agriseg.config import build_run_config
from agriseg.errors import BandError, ConfigError, ModelError
from agriseg.grid import auto_tile_size, block_size_for
from agriseg.models import load_segmenter
from agriseg.models.arch import (
    ARCHITECTURES,
    Float32Conv2d,
    bfloat16_model,
    build_model,
    count_parameters,
    fold_batch_norms,
    full_precision_stem,
    ieee_float32_convolutions,
    make_spec,
)
from agriseg.models.base import TileContext
from agriseg.models.bundle import (
    BundleMeta,
    bundle_digest,
    load_bundle_model,
    read_bundle,
    save_bundle,
)
from agriseg.models.neural import (
    CPU_BLOCK_INPUT,
    NeuralParams,
    NeuralSegmenter,
    _block_interior,
    cpu_bf16_native,
    cuda_possible,
    export_onnx,
    get_runner,
    load_neural,
    onnx_cache_path,
    runs_as,
    uses_onnx,
)
from agriseg.raster import open_survey
from agriseg.survey import process_survey
from tests.conftest import LAMBERTON

ROLES = ("red", "green", "blue")


def _cpu_bf16_forced(monkeypatch: pytest.MonkeyPatch, on: bool) -> Iterator[None]:
    monkeypatch.setenv("AGRISEG_CPU_BF16", "1" if on else "0")
    cpu_bf16_native.cache_clear()
    yield
    cpu_bf16_native.cache_clear()


@pytest.fixture
def cpu_fp32(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """PyTorch on CPU in float32, whatever the CPU offers."""
    yield from _cpu_bf16_forced(monkeypatch, on=False)


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """PyTorch on CPU in bf16 (emulated, slowly, where the CPU has no native bf16)."""
    yield from _cpu_bf16_forced(monkeypatch, on=True)


def _mixed_precision() -> bool:
    """Whether PyTorch runs bf16 here (a GPU, or a CPU with native bf16)."""
    return cuda_possible() or cpu_bf16_native()


def _tiny_bundle(path: Path, arch: str = "unet", seed: int = 0, **meta_kw: object) -> Path:
    torch.manual_seed(seed)
    spec = make_spec(arch, "tiny", 3, 4)
    model = build_model(spec).eval()
    meta = BundleMeta(spec, DEFAULT_CLASSES, ROLES, (0.4, 0.45, 0.3), (0.2, 0.2, 0.15),
                      patch_size=64, halo=32, gsd_range_m=(0.01, 0.05), name="tiny", **meta_kw)
    return save_bundle(model, meta, path)


def _toy_batch(n: int = 4, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blobs of four colours: a task every architecture can memorise."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 4, (n, size // 16, size // 16), generator=g)
    lab = lab.repeat_interleave(16, 1).repeat_interleave(16, 2)
    colours = torch.tensor([[0.6, 0.4, 0.3], [0.2, 0.6, 0.2], [0.7, 0.7, 0.1], [0.5, 0.2, 0.2]])
    x = colours[lab].permute(0, 3, 1, 2) + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return x, lab


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_arch_builds_and_overfits(arch: str) -> None:
    torch.manual_seed(0)
    # depth 3 keeps a 4x4 bottleneck on 32 px patches (smp's FPN needs all 5 stages)
    model = build_model(make_spec(arch, "tiny", 3, 4, depth=5 if arch == "fpn" else 3))
    assert count_parameters(model) < 100_000
    x, y = _toy_batch(2, 32)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85, f"{arch} reached only {acc:.2f} pixel accuracy on a memorisable set"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("encoder", ["tiny", "small"])
def test_every_arch_takes_multispectral_input(arch: str, encoder: str) -> None:
    # smp builds registered encoders for RGB and then resets their input channels: the light
    # encoders once ignored that and failed on 5-band data at the first training step.
    model = build_model(make_spec(arch, encoder, 5, 4)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 5, 64, 64)).shape == (1, 4, 64, 64)


def test_unknown_names_list_choices() -> None:
    with pytest.raises(ConfigError, match="valid choices: unet, unetplusplus"):
        make_spec("transformer9000")
    with pytest.raises(ConfigError, match="valid choices: tiny, small"):
        make_spec("unet", "resnet9000")
    with pytest.raises(ConfigError, match="vgg16"):
        make_spec("segnet", "resnet18")


@pytest.mark.parametrize("name", ["one.safetensors", "folder"])
def test_bundle_round_trip_bit_exact(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    spec = make_spec("unet", "tiny", 3, 4)
    model = build_model(spec)
    meta = BundleMeta(spec, DEFAULT_CLASSES, ROLES, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5),
                      metrics={"miou": 0.5}, training={"images": ["a.tif"]})
    save_bundle(model, meta, tmp_path / name)
    meta2, model2 = load_bundle_model(tmp_path / name)
    assert replace(meta2, created="") == meta
    assert meta2.schema.classes[2].color == (255, 215, 0)
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


class _Boom:
    """Unpickling this would create a file: proof that nothing was unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pickle_refused(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / f"model{suffix}"
    evil.write_bytes(pickle.dumps(_Boom(marker), protocol=4))
    with pytest.raises(ModelError, match="pickled"):
        load_segmenter(str(evil))
    torch.save({"w": torch.zeros(2)}, tmp_path / "ckpt.pth")
    with pytest.raises(ModelError, match="never unpickles"):
        read_bundle(tmp_path / "ckpt.pth")
    assert not marker.exists()


def test_truncated_and_corrupt_refused(tmp_path: Path) -> None:
    good = _tiny_bundle(tmp_path / "m.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match="truncated"):
        load_segmenter(str(cut))
    cut.write_bytes(data[:5])
    with pytest.raises(ModelError, match="truncated"):
        read_bundle(cut)


def test_foreign_and_broken_bundles_refused(tmp_path: Path) -> None:
    """Files users mistake for bundles get one clear line each, never a deep traceback."""
    from safetensors.torch import save_file

    plain = tmp_path / "hub.safetensors"  # e.g. weights downloaded from a model hub
    save_file({"w": torch.zeros(2)}, str(plain))
    folder = _tiny_bundle(tmp_path / "b")
    meta = json.loads((folder / "metadata.json").read_text())
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    (lacking / "weights.safetensors").write_bytes((folder / "weights.safetensors").read_bytes())
    header = tmp_path / "header.safetensors"
    header.write_bytes((12).to_bytes(8, "little") + b"{not json!!}")
    cases = {
        plain: "without agriseg metadata",
        lacking: "lacks metadata.json",
        tmp_path / "nowhere.safetensors": "no such file",
        header: "corrupt safetensors header",
    }
    for path, needle in cases.items():
        with pytest.raises(ModelError, match=needle):
            load_segmenter(str(path))
    schema = meta["schema"]
    classes = schema["classes"]
    model = meta["model"]
    for bad, needle in [({**meta, "format": "other-tool"}, "not an agriseg model bundle"),
                        ({**meta, "normalization": {**meta["normalization"],
                                                    "std": [0.2, 0.0, 0.15]}},
                         "std finite and positive"),
                        ({**meta, "normalization": {**meta["normalization"],
                                                    "mean": [float("nan"), 0.4, 0.3]}},
                         "mean must be finite"),
                        # files from elsewhere: a class name wrote outside --out, an encoder
                        # name went online, an option had timm torch.load any file
                        ({**meta, "schema": {**schema, "classes": [
                            *classes[:2], {**classes[2], "name": "weed\nx"}, *classes[3:]]}},
                         "without control characters"),
                        ({**meta, "schema": {**schema, "classes": [
                            *classes[:2], {**classes[2], "name": "x/y"},
                            {**classes[3], "name": "x_y"}]}},
                         "with '/' and"),
                        ({**meta, "schema": {**schema, "nodata": 1}}, "nodata class value 1"),
                        ({**meta, "model": {**model, "encoder": "tu-hf-hub:timm/resnet18"}},
                         "never a hub"),
                        ({**meta, "model": {**model, "options": {"checkpoint_path": "/x.pt"}}},
                         "not allowed"),
                        ({**meta, "model": {**model, "options": {"decoder_channels": [10**6]}}},
                         "a number up to"),
                        ({**meta, "model": {**model, "in_channels": 3_000_000}},
                         "input band"),
                        ({**meta, "halo": -100}, "halo -100"),
                        ({**meta, "roles": ["red", "red", "blue"]}, "distinct band roles")]:
        (folder / "metadata.json").write_text(json.dumps(bad))
        with pytest.raises((ModelError, ConfigError), match=needle):
            load_segmenter(str(folder))
    for text in ("{", "[" * 100_000 + "]" * 100_000, json.dumps({**meta, "pad": "x" * 5 * 2**20})):
        (folder / "metadata.json").write_text(text)
        with pytest.raises(ModelError, match="unreadable bundle metadata"):
            load_segmenter(str(folder))
    r = CliRunner().invoke(main, ["run", str(LAMBERTON), "--out", str(tmp_path / "o"),
                                  "--model", str(plain)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: {plain}: ") and "save_bundle" in last


def test_unknown_version_and_mismatch_refused(tmp_path: Path) -> None:
    folder = _tiny_bundle(tmp_path / "b")
    meta_file = folder / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelError, match="version 99 is not supported"):
        load_segmenter(str(folder))
    meta_file.write_text(json.dumps({**meta, "model": {**meta["model"], "encoder": "small"}}))
    with pytest.raises(ModelError, match="do not match the declared architecture"):
        load_segmenter(str(folder))
    schema3 = {**meta["schema"], "classes": meta["schema"]["classes"][:3]}
    meta_file.write_text(json.dumps({**meta, "schema": schema3}))
    with pytest.raises(ModelError, match="class schema has 3 classes"):
        load_segmenter(str(folder))


def test_onnx_matches_torch_and_is_cached(tmp_path: Path, cpu_fp32: None) -> None:
    bundle = _tiny_bundle(tmp_path / "m.safetensors", seed=3)
    x = np.random.default_rng(0).random((2, 3, 150, 130), np.float32)
    meta, _ = read_bundle(bundle)
    outs = {}
    for engine in ("torch", "onnx"):
        seg = NeuralSegmenter(str(bundle), meta, engine)
        outs[engine] = seg.predict(x, np.ones((2, 150, 130), bool), NeuralParams(32), [])
    assert outs["onnx"].shape == (2, 4, 150, 130)
    np.testing.assert_allclose(outs["onnx"].sum(1), 1.0, atol=1e-5)
    assert np.abs(outs["onnx"] - outs["torch"]).max() < 1e-4
    (cached,) = tmp_path.glob("m-*.onnx")  # the ONNX export is cached beside the bundle
    umask = os.umask(0o022)
    os.umask(umask)
    # as readable as any file written here: workers of other users read a shared bundle's
    assert cached.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*partial"))
    r = CliRunner().invoke(main, ["export", str(bundle), "--onnx", "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.onnx").exists() and "max |onnx - torch|" in r.output
    import onnxruntime as ort

    # the export carries what other tools need: classes, normalisation, bands (Deepness keys)
    props = ort.InferenceSession(str(tmp_path / "x.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == {"0": "soil", "1": "crop", "2": "weed",
                                                 "3": "disease"}
    assert json.loads(props["standardization_mean"]) == list(meta.mean)
    assert json.loads(props["model_type"]) == "Segmentor"
    assert json.loads(props["tiles_overlap"]) * 512 / 100 >= 2 * meta.halo
    assert json.loads(props["agriseg_bundle"])["roles"] == list(meta.roles)
    r = CliRunner().invoke(main, ["export", str(bundle), "--onnx", "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    # the export is no bundle: said so, not "not a safetensors file or truncated"
    with pytest.raises(ModelError, match="is an ONNX model, not an agriseg model bundle"):
        load_segmenter(str(tmp_path / "x.onnx"))
    r = CliRunner().invoke(main, ["export", "labelfree", "--onnx", "-o", str(tmp_path / "y.onnx")])
    assert r.exit_code == 2 and "without a bundle to export" in r.output
    (tmp_path / "afile").write_text("")
    r = CliRunner().invoke(main, ["export", str(bundle), "--onnx", "-o",
                                  str(tmp_path / "afile" / "x.onnx")])
    assert r.exit_code == 2 and "cannot write the ONNX file there" in r.output
    r = CliRunner().invoke(main, ["export", str(bundle), "--onnx", "-o",
                                  str(tmp_path / "nope" / "x.onnx")])
    assert r.exit_code == 2 and "folder does not exist" in r.output
    before = bundle.read_bytes()  # --overwrite must not replace the bundle by its export
    r = CliRunner().invoke(main, ["export", str(bundle), "--onnx", "-o", str(bundle),
                                  "--overwrite"])
    assert r.exit_code == 2 and "is the bundle being exported" in r.output
    assert bundle.read_bytes() == before


def test_bundle_warns_when_the_survey_looks_unlike_its_training_data() -> None:
    """unet-default (8-bit camera RGB) on reflectance gave poor classes without a word."""
    from agriseg.models import load_segmenter

    seg = load_segmenter("unet-default")
    samples = Path(__file__).resolve().parents[1] / "sample_tiles"
    far = seg.prepare(open_survey(str(samples / "synthetic" / "field_ms.tif"))).warnings
    assert any("far from what the model 'unet-default' was trained on" in w for w in far)
    near = seg.prepare(open_survey(str(samples / "synthetic" / "field_rgb.tif"))).warnings
    assert not any("far from what" in w for w in near)


@pytest.mark.parametrize("arch", ["pspnet", "segnet"])
def test_architectures_without_onnx_export_run_on_torch_quietly(
        tmp_path: Path, cpu_fp32: None, capfd: pytest.CaptureFixture[str], arch: str) -> None:
    """`auto` on a CPU without bf16 tried the ONNX export of every PSPNet and SegNet bundle
    on every run: the exporter dumped its whole graph (~140 lines) to the terminal, and
    run.json said "ONNX Runtime" over a run that fell back to PyTorch."""
    bundle = _tiny_bundle(tmp_path / f"{arch}.safetensors", arch)
    meta, _ = read_bundle(bundle)
    assert not uses_onnx("auto", cuda=False, arch=arch) and uses_onnx("auto", cuda=False)
    assert runs_as("auto", arch).startswith("PyTorch")
    seg = NeuralSegmenter(str(bundle), meta, "auto")
    x = np.random.default_rng(0).random((1, 3, 96, 96), np.float32)
    probs = seg.predict(x, np.ones((1, 96, 96), bool), NeuralParams(32), [])
    assert probs.shape == (1, 4, 96, 96)
    assert seg.describe()["runs_as"].startswith("PyTorch")
    with pytest.raises(ModelError, match="Deepness QGIS plugin"):
        export_onnx(str(bundle))
    out, err = capfd.readouterr()
    assert "graph" not in out + err
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.skipif(cuda_possible(), reason="a GPU may be present: PyTorch is then needed")
def test_cached_onnx_runs_without_importing_torch(tmp_path: Path) -> None:
    """With a verified ONNX export cached, neither the client nor a worker imports PyTorch."""
    import subprocess
    import sys

    bundle = _tiny_bundle(tmp_path / "m.safetensors", seed=4)
    export_onnx(bundle, onnx_cache_path(bundle, bundle_digest(bundle)))
    code = (
        "import sys, numpy as np\n"
        "from agriseg.models.bundle import load_bundle_segmenter\n"
        "from agriseg.models.neural import NeuralParams\n"
        f"seg = load_bundle_segmenter({str(bundle)!r}, 'auto')\n"
        "x = np.random.default_rng(0).random((1, 3, 96, 96), np.float32)\n"
        "p = seg.predict(x, np.ones((1, 96, 96), bool), NeuralParams(32), [])\n"
        "assert abs(float(p.sum(1).mean()) - 1) < 1e-5\n"
        "print('torch' in sys.modules)\n"
    )
    # A CPU with native bf16 runs `auto` through PyTorch; this test is about the other CPUs.
    env = {**os.environ, "AGRISEG_CPU_BF16": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_class_mask_run_imports_no_vector_stack(tmp_path: Path, rgba_tif: Path) -> None:
    """A run to the class mask alone works without GeoPandas, Shapely, pyogrio and pyproj.

    The GPU benchmark's machines carry only what the tiles need (benchmarks/gpu.sh); a
    ground-area helper that imported GeoPandas at the end of every run cost one of them
    nine minutes of device time (2026-11-27).
    """
    import subprocess
    import sys

    bundle = _tiny_bundle(tmp_path / "m.safetensors", seed=5)
    blocked = ("geopandas", "shapely", "pyogrio", "pyproj")
    code = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['agriseg', 'run', *sys.argv[1:]]\n"
        "runpy.run_module('agriseg', run_name='__main__')\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", code, str(rgba_tif), "--out", str(out), "--model", str(bundle),
           "--engine", "torch", "--no-indices", "--no-progress", "-q",
           "--skip", "quicklook,zones,fields,report,project"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "classes.tif").exists()


def test_segmenter_pickles_small_and_checks_bands_and_gsd(tmp_path: Path, rgba_tif: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "m.safetensors")
    seg = load_segmenter(str(bundle), engine="torch")
    assert len(pickle.dumps(seg)) < 5000  # weights stay out of the Dask graph
    prepared = seg.prepare(open_survey(rgba_tif))
    assert prepared.halo == 32 and not prepared.warnings
    if not cuda_possible():
        # CPU: tiles run as blocks of at most 704 px inputs (640 px interior + 2 x 32 margin).
        assert prepared.tile_multiple == 640
        assert seg.model_pixels(1280, 1280) == (2 * 704) ** 2
        assert seg.model_pixels(1024, 100) == (2 * 576) * (128 + 64)
        assert seg.resources is None
    else:
        # GPU: whole tiles of up to 2048 px per model input, and tasks ask for a GPU slot.
        assert prepared.tile_multiple == 2048 and seg.resources == {"GPU": 1}
    far = _tiny_bundle(tmp_path / "far.safetensors")
    meta, _ = read_bundle(far)
    seg_far = NeuralSegmenter(str(far), replace(meta, gsd_range_m=(5.0, 10.0)))
    assert "far outside" in seg_far.prepare(open_survey(rgba_tif)).warnings[0]
    nir = replace(meta, roles=("red", "green", "nir"))
    with pytest.raises(BandError, match="nir"):
        NeuralSegmenter(str(far), nir).prepare(open_survey(rgba_tif))


def test_predict_classes_matches_probabilities(tmp_path: Path) -> None:
    """PyTorch's reduction of the scores gives what the pipeline derives from probabilities."""
    from agriseg.predict import scores_to_outputs

    bundle = _tiny_bundle(tmp_path / "m.safetensors")
    pixels = np.random.default_rng(1).random((2, 3, 200, 170), dtype=np.float32)
    valid = np.ones((2, 200, 170), bool)
    assert load_segmenter(str(bundle), engine="onnx").predict_classes(
        pixels, valid, NeuralParams(32), []) is None
    seg = load_segmenter(str(bundle), engine="torch")
    probs = seg.predict(pixels, valid, NeuralParams(32), [])
    reduced = seg.predict_classes(pixels, valid, NeuralParams(32), [])
    assert reduced is not None
    for i in range(2):
        want = scores_to_outputs(probs[i], valid[i])
        if _mixed_precision():  # bf16: near-ties may flip
            assert (reduced[0][i] == want[0]).mean() > 0.99
        else:
            assert np.array_equal(reduced[0][i], want[0])
            assert np.array_equal(reduced[1][i], want[1])
    # smaller than its own context ring: reflect-padded, same shapes out
    tiny = seg.predict_classes(pixels[:, :, :40, :50], valid[:, :40, :50], NeuralParams(32), [])
    assert tiny is not None and tiny[0].shape == tiny[1].shape == (2, 40, 50)
    if not _mixed_precision():
        want = scores_to_outputs(seg.predict(pixels[:1, :, :40, :50], valid[:1, :40, :50],
                                             NeuralParams(32), [])[0], valid[0, :40, :50])
        assert np.array_equal(tiny[0][0], want[0])


@pytest.mark.parametrize("gpu_layout", [False, True])
def test_predict_classes_of_raw_bands_equal_scaled_inputs(
    tmp_path: Path, rgba_tif: Path, gpu_layout: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8-bit bands with their scale give the classes of the float32 inputs, on any engine.

    ``gpu_layout``: the blocks laid out and batched as on a GPU (stacked uint8 views), run on
    whatever device PyTorch has here.
    """
    from agriseg.models import neural
    from agriseg.predict import raw_band_scale

    if gpu_layout:
        monkeypatch.setattr(neural, "_on_gpu", lambda runner: True)
    bundle = _tiny_bundle(tmp_path / "m.safetensors")
    raw = np.random.default_rng(2).integers(0, 256, (2, 3, 150, 170)).astype(np.uint8)
    raw[:, :, :20] = 0
    valid = np.ones((2, 150, 170), bool)
    valid[:, :20] = False
    scale = 1 / 255
    scaled = np.multiply(raw, np.float32(scale), dtype=np.float32)
    seg = load_segmenter(str(bundle), engine="torch")
    want = seg.predict_classes(scaled, valid, NeuralParams(32), [])
    got = seg.predict_classes(raw, valid, NeuralParams(32), [], scale=scale)
    assert want is not None and got is not None
    for a, b in zip(got, want, strict=True):
        if torch.cuda.is_available():  # autotuned kernels per CUDA graph: near-ties may flip
            assert (a == b).mean() > 0.999, f"agree on {(a == b).mean():.5f}"
        else:
            np.testing.assert_array_equal(a, b)
    assert load_segmenter(str(bundle), engine="onnx").predict_classes(
        raw, valid, NeuralParams(32), [], scale=scale) is None
    survey = open_survey(str(rgba_tif))
    assert raw_band_scale(survey, seg) == survey.scale
    assert raw_band_scale(survey, seg, (("weed", 2),)) is None  # probabilities: predict


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_full_precision_stem_keeps_the_first_convolution_in_float32(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(make_spec(arch, "tiny", 3, 4)).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 64, 64)
    seen: list[torch.dtype] = []
    with torch.inference_mode():
        want = model(x)
        full_precision_stem(full_precision_stem(model))  # idempotent
        swapped = [m for m in model.modules() if isinstance(m, Float32Conv2d)]
        assert swapped == [first]
        assert model.state_dict().keys() == state.keys()  # bundles save as before
        torch.testing.assert_close(model(x), want)  # same float32 result outside autocast
        first.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).shape == want.shape
    assert seen[-1] == torch.float32


def test_blocks_without_valid_pixels_are_not_run(tmp_path: Path) -> None:
    seg = load_neural(_tiny_bundle(tmp_path / "t.safetensors"), engine="torch")
    runner = get_runner(seg.path, seg.engine, seg.meta)
    m, side = seg.margin, 2 * _block_interior(seg.margin, gpu=False)
    x = np.random.default_rng(0).random((1, 3, side + 2 * m, side + 2 * m), dtype=np.float32)
    valid = np.zeros((1, side + 2 * m, side + 2 * m), bool)
    valid[0, m + 5 : m + 9, m + 7 : m + 11] = True  # data in the first of 2 x 2 blocks only
    shapes: list[tuple[int, ...]] = []

    def call(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return runner.classes(batch)

    ctx = [TileContext(0, 0, 0.02, margin=m)]
    every = seg._run_blocks(x, m, call, False, 2, np.uint8, ctx)
    assert len(shapes) == 4
    shapes.clear()
    some = seg._run_blocks(x, m, call, False, 2, np.uint8, ctx, valid)
    assert len(shapes) == 1
    first = (slice(None), slice(None), slice(m, m + side // 2), slice(m, m + side // 2))
    assert np.array_equal(some[first], every[first])
    assert not some[:, :, m + side // 2 :].any()


def _cudnn_float32_is_ieee() -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # PyTorch >= 2.9
        return bool(conv.fp32_precision == "ieee")
    return not torch.backends.cudnn.allow_tf32


def test_ieee_float32_convolutions() -> None:
    """The GPU runner's float32 stem is not computed in TF32 (cuDNN's default)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    before = conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
    try:
        ieee_float32_convolutions()
        assert _cudnn_float32_is_ieee()
    finally:
        if new_api:
            conv.fp32_precision = before
        else:
            torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bfloat16_model_keeps_the_first_convolution_float32(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(make_spec(arch, "tiny", 3, 4)).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        want = model(x).softmax(1)
        # every architecture here feeds its input to the first conv only
        assert bfloat16_model(model, 3)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert isinstance(first, Float32Conv2d) and first.weight.dtype == torch.float32
        others = [p for m in model.modules() if m is not first
                  for p in m.parameters(recurse=False)]
        assert others and all(p.dtype == torch.bfloat16 for p in others)
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float().softmax(1) - want).abs().max()) < 0.1


class _TwoInputConvs(torch.nn.Module):
    """Feeds its input to a second convolution too: bf16 weights would meet float32 there."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_bfloat16_model_gives_up_when_the_input_goes_elsewhere() -> None:
    model = _TwoInputConvs().eval()
    assert bfloat16_model(model, 3) is False
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 64, 64)).dtype == torch.float32


@pytest.mark.parametrize("arch", ["unet", "fpn", "segnet"])
def test_fold_batch_norms_keeps_the_outputs(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(make_spec(arch, "tiny", 3, 4)).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)  # stats a trained model would have
        bn.running_var.uniform_(0.5, 2.0)
    folded = fold_batch_norms(model, 3)
    norms = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if arch == "fpn":  # fx cannot trace smp's FPN: the model comes back as it was
        assert folded is model
    else:
        assert folded is not model and not norms
    x = torch.rand(2, 3, 96, 160)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_cpu_bf16_runs_torch_close_to_float32(tmp_path: Path, cpu_bf16: None) -> None:
    """On a CPU with native bf16, `auto` runs PyTorch in bf16 with its first layer in float32."""
    from tests.conftest import toy_field

    bundle = _trained_bundle(tmp_path / "toy.safetensors")
    seg = load_segmenter(str(bundle))
    assert uses_onnx("onnx")
    if not cuda_possible():
        assert not uses_onnx("auto")
    rgb, _ = toy_field(192, 256, seed=5)
    pixels = (rgb.astype(np.float32) / 255)[None]
    valid = np.ones((1, 192, 256), bool)
    mixed = seg.predict_classes(pixels, valid, NeuralParams(32), [])
    runner = get_runner(seg.path, seg.engine, seg.meta)
    assert runner.amp is torch.bfloat16 and not runner.autocast  # bf16 weights, no autocast
    assert sum(isinstance(m, Float32Conv2d) for m in runner.model.modules()) == 1
    full = load_segmenter(str(bundle), engine="onnx").predict(pixels, valid, NeuralParams(32), [])
    assert mixed is not None
    agree = float((mixed[0] == full.argmax(1)).mean())
    assert agree > 0.99, f"bf16 agrees with float32 on {agree:.4f} of pixels"
    assert np.abs(mixed[1].astype(int) - np.round(full.max(1) * 100)).max() <= 10


def _read1(path: str | Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def _trained_bundle(path: Path) -> Path:
    """A tiny U-Net briefly trained to call the toy field's green rows crop."""
    from tests.conftest import toy_field

    rgb, _ = toy_field(128, 128, seed=3)
    x = torch.from_numpy(rgb.astype(np.float32) / 255)[None]
    y = torch.from_numpy((rgb[1].astype(int) - rgb[0] > 20).astype(np.int64))[None]
    torch.manual_seed(0)
    spec = make_spec("unet", "tiny", 3, 4)
    model = build_model(spec)
    mean, std = (0.4, 0.5, 0.3), (0.2, 0.2, 0.2)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xn), y).backward()
        opt.step()
    meta = BundleMeta(spec, DEFAULT_CLASSES, ROLES, mean, std, 128, 32, (0.01, 0.05), "toy")
    return save_bundle(model.eval(), meta, path)


def test_survey_with_bundle_is_seamless(tmp_path: Path, rgba_tif: Path, scheduler: str) -> None:
    bundle = _trained_bundle(tmp_path / "toy.safetensors")
    runs = {}
    for name, tile, halo in (("whole", 512, None), ("tiled", 64, None), ("narrow", 64, 16)):
        cfg = build_run_config(input=rgba_tif, out=tmp_path / name, model=str(bundle),
                               tile_size=tile, halo=halo, indices=False, scheduler=scheduler)
        runs[name] = process_survey(cfg)
    (whole, tiled), (conf_whole, conf_tiled) = (
        [_read1(runs[r].outputs[name]) for r in ("whole", "tiled")]
        for name in ("classes", "confidence"))
    valid = whole != 255
    assert ((tiled == 255) == ~valid).all()
    share = np.bincount(whole[valid], minlength=4) / valid.sum()
    assert 0.05 < share[1] < 0.95, "the trained toy model finds the green rows"
    differ = whole != tiled
    # Halo + centre crop: tile borders change only a negligible number of pixels, and only
    # near-ties (the toy U-Net sees further than the 32 px halo, so 64 px tiles shift its
    # scores a little; how many ties flip varies with the CPU's float kernels).
    assert differ.sum() <= 0.004 * valid.sum(), f"{differ.sum()} pixels differ between tilings"
    sure = differ & (conf_whole >= 70) & (conf_tiled >= 70)
    assert sure.sum() <= 0.0002 * valid.sum(), f"{sure.sum()} confident pixels differ"
    # --halo 16: every model input gets 16 px of context instead of the bundle's 32 (fewer
    # model pixels, more near-ties flip next to block borders, still no confident ones)
    plans = {r: runs[r].manifest["plan"] for r in ("tiled", "narrow")}
    assert (plans["narrow"]["halo"], plans["tiled"]["halo"]) == (16, 32)
    assert (plans["narrow"]["model_pixels_per_output_pixel"]
            < plans["tiled"]["model_pixels_per_output_pixel"])
    differ = whole != _read1(runs["narrow"].outputs["classes"])
    assert differ.sum() <= 0.01 * valid.sum(), f"{differ.sum()} pixels differ at halo 16"
    m = runs["tiled"].manifest["model"]
    assert m["kind"] == "learned" and m["prepared"]["engine"] == "auto"
    assert m["prepared"]["runs_as"] == runs_as("auto")  # also logged: "model: toy (...)"
    assert runs_as("auto").startswith("PyTorch" if _mixed_precision() else "ONNX Runtime")
    # the workers loaded the model before the first tile
    assert runs["tiled"].manifest["timings_s"]["warm_up_s"] > 0


def test_halo_of_learned_model(tmp_path: Path) -> None:
    seg = load_neural(_tiny_bundle(tmp_path / "t.safetensors"))
    assert seg.margin == 32 and seg.with_halo(16).margin == 16 and seg.with_halo(0).margin == 0
    with pytest.raises(ConfigError, match=r"--halo 20: .* use 16 or 32 \(this model's default: 32"):
        seg.with_halo(20)
    with pytest.raises(ConfigError, match="use 0 or 16"):
        seg.with_halo(-4)
    with pytest.raises(ConfigError, match="--halo 4096: a learned model takes at most 256"):
        seg.with_halo(4096)
    # CPU blocks stay within CPU_BLOCK_INPUT with their context, and the default tiles they
    # make keep the output GeoTIFF blocks large (64 px blocks made the COG copy 2.5x slower)
    for halo in (0, 16, 32):
        interior = _block_interior(halo, gpu=False)
        tile = auto_tile_size(halo, multiple=interior)
        assert interior + 2 * halo <= CPU_BLOCK_INPUT and block_size_for(tile) >= 128


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_survey_on_gpu_matches_cpu(tmp_path: Path, rgba_tif: Path) -> None:
    """Both local GPU worker layouts run tiles on CUDA (bf16) and agree with ONNX on CPU."""
    bundle = _trained_bundle(tmp_path / "toy.safetensors")
    masks, plans = {}, {}
    for engine, tile, processes in (("onnx", 512, False), ("torch", 512, False),
                                    ("torch", 64, False), ("torch", 64, True)):
        cfg = build_run_config(input=rgba_tif, out=tmp_path / f"{engine}{tile}{processes}",
                               model=str(bundle), engine=engine, tile_size=tile, indices=False,
                               processes=processes,
                               skip=("quicklook", "zones", "fields", "report", "project"))
        res = process_survey(cfg)
        plans[engine, tile, processes] = res.manifest["plan"]
        assert "warm_up_s" in res.manifest["timings_s"]
        with rasterio.open(res.outputs["classes"]) as ds:
            masks[engine, tile, processes] = ds.read(1)
    assert plans["onnx", 512, False]["workers"] == "local threads"
    # One GPU: a worker of threads in this process; `processes: true` or several GPUs: one
    # worker process per GPU.
    gpus = torch.cuda.device_count()
    for processes in (False, True):
        gpu_plan = plans["torch", 64, processes]
        layout = "processes" if processes or gpus > 1 else "threads"
        assert gpu_plan["workers"] == f"local GPU {layout}"
        assert gpu_plan["worker_count"] == gpus
        assert gpu_plan["worker_threads"] >= 2 * gpu_plan["worker_count"]
    cpu = masks["onnx", 512, False]
    valid = cpu != 255
    for key in (("torch", 512, False), ("torch", 64, False), ("torch", 64, True)):
        assert ((masks[key] == 255) == ~valid).all()
        agree = float((masks[key] == cpu)[valid].mean())
        # bf16 autocast moves near-tie pixels only
        assert agree > 0.99, f"{key}: {agree:.4f} of pixels agree with ONNX on CPU"
    # the runners of this process (worker threads) compute the float32 stem without TF32
    assert _cudnn_float32_is_ieee()


@pytest.mark.parametrize("k", [2, 4, 5])
def test_reduce_scores_is_argmax_with_ties_to_the_lowest_class(k: int) -> None:
    from agriseg.models.base import reduce_scores

    # Coarse values make ties common.
    scores = np.random.default_rng(k).integers(0, 5, (k, 64, 80)).astype(np.float32) / 4
    classes, conf = reduce_scores(scores)
    np.testing.assert_array_equal(classes, scores.argmax(0))
    np.testing.assert_array_equal(conf, np.rint(scores.max(0) * 100).astype(np.uint8))


def test_value_counts_match_bincount() -> None:
    from agriseg.predict import value_counts

    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, (37, 53)).astype(np.uint8)
    classes[:5] = 255
    want = np.bincount(classes.ravel(), minlength=256)
    assert np.array_equal(value_counts(classes, (0, 1, 2, 3, 255)), want)
    # a value outside the expected ones is still counted
    classes[0, 0] = 9
    assert np.array_equal(value_counts(classes, (0, 1, 2, 3, 255)),
                          np.bincount(classes.ravel(), minlength=256))


def test_engine_on_a_rule_based_model_is_said_to_do_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        seg = load_segmenter("labelfree", "onnx")
    assert seg.name == "labelfree" and "runs no neural network" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_segmenter("index-threshold")
    assert not caplog.text


def test_describe_names_the_weights(tmp_path: Path) -> None:
    """A resume compares describe(): a bundle retrained in place must not look the same."""
    path = tmp_path / "m.safetensors"
    before = load_neural(_tiny_bundle(path, seed=1)).describe()
    after = load_neural(_tiny_bundle(path, seed=2)).describe()
    assert before["bundle"] == after["bundle"]
    assert before["bundle_sha256"] != after["bundle_sha256"]
    assert before["runs_as"] == runs_as("auto")
