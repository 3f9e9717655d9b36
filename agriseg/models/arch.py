"""Segmentation architectures behind one factory (U-Net, U-Net++, FPN, PSPNet, FCN, ...).

U-Net is the default; DeepLabV3+ and SegNet are there too.
The smp architectures come from segmentation-models-pytorch; FCN is an FCN-8s style head on
any smp encoder; SegNet is written here (neither smp nor torchvision has it) with max-pooling
indices carried to the decoder's unpooling, as in Badrinarayanan et al. (2017).

No weights are ever downloaded: every encoder starts from random initialisation (or from a
bundle). Besides smp's encoder names (``resnet18``, ``mobilenet_v2``, ...) two small
hand-written conv encoders are registered with smp: ``tiny`` (a few thousand parameters, for
tests) and ``small`` (about 0.6 M parameters in a U-Net, fast on CPU for the default model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from agriseg.errors import ConfigError
from agriseg.models.spec import SIZE_MULTIPLE, ArchSpec, check_spec

__all__ = ["ARCHITECTURES", "SIZE_MULTIPLE", "ArchSpec", "Float32Conv2d", "bfloat16_model",
           "build_model", "count_parameters", "create_model", "encoder_names",
           "fold_batch_norms", "full_precision_stem", "make_spec"]

log = logging.getLogger(__name__)

# Hand-written encoders: name -> channel widths of the 5 stride-2 stages.
LIGHT_ENCODERS: dict[str, tuple[int, ...]] = {
    "tiny": (4, 8, 8, 16, 16),
    "small": (16, 24, 32, 64, 96),
}
# Classic SegNet (VGG16 layout) for fidelity when asked, smaller variants for CPU use.
SEGNET_WIDTHS: dict[str, tuple[int, ...]] = {
    "tiny": (4, 8, 16),
    "small": (16, 32, 64, 96),
    "vgg16": (64, 128, 256, 512, 512),
}


class _LightEncoder(nn.Module):
    """Plain conv encoder with the smp encoder interface (features at strides 1..32)."""

    _is_torch_scriptable = True
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(
        self, widths: Sequence[int], depth: int = 5, output_stride: int = 32, in_channels: int = 3
    ) -> None:
        super().__init__()
        if not 1 <= depth <= len(widths):
            raise ConfigError(f"encoder depth must be 1..{len(widths)}, got {depth}")
        self._depth = depth
        self._in_channels = in_channels
        self._output_stride = output_stride
        self._out_channels = [in_channels, *widths]
        stages = []
        prev = in_channels
        for w in widths[:depth]:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(prev, w, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(w, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                )
            )
            prev = w
        self.stages = nn.ModuleList(stages)
        if output_stride < 32 and depth == 5:
            self._dilate(output_stride)

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned feature map (input first)."""
        return self._out_channels[: self._depth + 1]

    @property
    def output_stride(self) -> int:
        """Stride of the deepest feature map."""
        return min(self._output_stride, 2**self._depth)

    def set_in_channels(self, in_channels: int, pretrained: bool = False) -> None:
        """Rebuild the first convolution for ``in_channels`` bands.

        smp's ``get_encoder`` constructs registered encoders with their default (RGB) input
        and then calls this, so a multispectral model depends on it.
        """
        if in_channels == self._in_channels:
            return
        stage = cast("nn.Sequential", self.stages[0])
        first = cast("nn.Conv2d", stage[0])
        # The first stage is never dilated (stride 2 <= any output stride).
        stage[0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=2, padding=1, bias=False)
        self._in_channels = in_channels
        self._out_channels[0] = in_channels

    def _dilate(self, output_stride: int) -> None:
        # Stages deeper than output_stride keep resolution and dilate instead (DeepLabV3+).
        for i, stage in enumerate(self.stages):
            stride = 2 ** (i + 1)
            if stride <= output_stride:
                continue
            rate = stride // output_stride
            for m in stage.modules():
                if isinstance(m, nn.Conv2d):
                    m.stride = (1, 1)
                    m.dilation = (rate, rate)
                    m.padding = (rate, rate)

    def make_dilated(self, output_stride: int) -> None:
        """Hook smp calls for DeepLabV3(+) output strides."""
        self._output_stride = output_stride
        self._dilate(output_stride)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features ``[x, f/2, f/4, ...]``."""
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _register_light_encoders() -> None:
    """Make ``tiny`` and ``small`` known to smp's encoder lookup (idempotent)."""
    from segmentation_models_pytorch import encoders as smp_encoders

    for name, widths in LIGHT_ENCODERS.items():
        smp_encoders.encoders.setdefault(
            name,
            {"encoder": _LightEncoder, "pretrained_settings": {}, "params": {"widths": widths}},
        )


def _light_defaults(arch: str, encoder: str, depth: int) -> dict[str, Any]:
    """Decoder sizes that match a light encoder (smp's defaults are for ResNets)."""
    if encoder not in LIGHT_ENCODERS:
        return {}
    w = LIGHT_ENCODERS[encoder]
    if arch in ("unet", "unetplusplus"):
        return {"decoder_channels": tuple(w[i] for i in range(depth - 1, -1, -1))}
    if arch == "fpn":
        # smp's FPN uses GroupNorm(32, ...): segmentation channels must be a multiple of 32.
        return {"decoder_pyramid_channels": max(32, 2 * w[2]), "decoder_segmentation_channels": 32}
    if arch == "pspnet":
        return {"psp_out_channels": 2 * w[2]}
    if arch == "deeplabv3plus":
        return {"decoder_channels": 2 * w[1], "decoder_atrous_rates": (3, 6, 9)}
    return {}


class FCN(nn.Module):
    """FCN-8s style head: class scores at the three deepest strides, upsampled and summed."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        chans = list(cast("Sequence[int]", encoder.out_channels))
        self.score = nn.ModuleList(nn.Conv2d(c, classes, 1) for c in chans[-3:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at input resolution."""
        feats = self.encoder(x)[-3:]
        out = self.score[-1](feats[-1])
        for head, f in zip(reversed(self.score[:-1]), reversed(feats[:-1]), strict=True):
            out = nn.functional.interpolate(
                out, size=f.shape[-2:], mode="bilinear", align_corners=False
            ) + head(f)
        return nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SegNet(nn.Module):
    """SegNet: conv encoder whose max-pool indices drive the decoder's unpooling.

    Each encoder stage is two conv-BN-ReLU layers and a 2x2 max pool that remembers where the
    maxima were; the mirrored decoder stage unpools to exactly those positions (sparse maps,
    no learned upsampling) and densifies them with two conv-BN-ReLU layers.
    """

    def __init__(self, in_channels: int, classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.enc = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.enc.append(nn.Sequential(_conv_bn(prev, w), _conv_bn(w, w)))
            prev = w
        self.dec = nn.ModuleList()
        outs = [*reversed(widths[:-1]), widths[0]]
        for w_in, w_out in zip(reversed(widths), outs, strict=True):
            self.dec.append(nn.Sequential(_conv_bn(w_in, w_in), _conv_bn(w_in, w_out)))
        self.head = nn.Conv2d(widths[0], classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at input resolution (input sides must be multiples of 2**stages)."""
        indices = []
        sizes = []
        for stage in self.enc:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = nn.functional.max_pool2d(x, 2, 2, return_indices=True)
            indices.append(idx)
        for stage, idx, size in zip(self.dec, reversed(indices), reversed(sizes), strict=True):
            x = nn.functional.max_unpool2d(x, idx, (2, 2), (2, 2), output_size=size)
            x = stage(x)
        return self.head(x)


def _smp(cls_name: str) -> Callable[[ArchSpec], nn.Module]:
    def build(spec: ArchSpec) -> nn.Module:
        import segmentation_models_pytorch as smp

        _register_light_encoders()
        kwargs: dict[str, Any] = _light_defaults(spec.arch, spec.encoder, spec.depth)
        kwargs.update(dict(spec.options))
        cls = getattr(smp, cls_name)
        return cls(
            encoder_name=spec.encoder, encoder_depth=spec.depth, encoder_weights=None,
            in_channels=spec.in_channels, classes=spec.classes, **kwargs,
        )

    return build


def _fcn(spec: ArchSpec) -> nn.Module:
    from segmentation_models_pytorch.encoders import get_encoder

    _register_light_encoders()
    if spec.depth < 3:
        raise ConfigError(f"fcn needs encoder depth >= 3, got {spec.depth}")
    enc = get_encoder(spec.encoder, in_channels=spec.in_channels, depth=spec.depth, weights=None)
    return FCN(enc, spec.classes)


def _segnet(spec: ArchSpec) -> nn.Module:
    if spec.encoder not in SEGNET_WIDTHS:
        raise ConfigError(
            f"segnet has its own encoder; unknown encoder {spec.encoder!r}; valid choices: "
            f"{', '.join(SEGNET_WIDTHS)}"
        )
    widths = SEGNET_WIDTHS[spec.encoder][: spec.depth]
    return SegNet(spec.in_channels, spec.classes, widths)


ARCHITECTURES: dict[str, Callable[[ArchSpec], nn.Module]] = {
    "unet": _smp("Unet"),
    "unetplusplus": _smp("UnetPlusPlus"),
    "fpn": _smp("FPN"),
    "pspnet": _smp("PSPNet"),
    "deeplabv3plus": _smp("DeepLabV3Plus"),
    "fcn": _fcn,
    "segnet": _segnet,
}
DEFAULT_ARCH = "unet"
# smp's own default depths where they differ from 5.
_DEFAULT_DEPTH = {"pspnet": 3}


def encoder_names() -> list[str]:
    """Encoders usable with the smp architectures and FCN."""
    import segmentation_models_pytorch as smp

    _register_light_encoders()
    return sorted(smp.encoders.get_encoder_names())


def make_spec(
    arch: str = DEFAULT_ARCH,
    encoder: str = "small",
    in_channels: int = 3,
    classes: int = 4,
    depth: int | None = None,
    **options: Any,
) -> ArchSpec:
    """Validate names and build an :class:`ArchSpec`.

    Raises:
        ConfigError: unknown architecture or encoder (the message lists the valid choices).
    """
    arch = arch.lower()
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture {arch!r}; valid choices: {', '.join(ARCHITECTURES)}"
        )
    if arch == "segnet":
        if encoder not in SEGNET_WIDTHS:
            raise ConfigError(
                f"unknown SegNet encoder {encoder!r}; valid choices: {', '.join(SEGNET_WIDTHS)}"
            )
        max_depth = len(SEGNET_WIDTHS[encoder])
    else:
        if encoder not in LIGHT_ENCODERS and not encoder.startswith("tu-"):
            valid = encoder_names()
            if encoder not in valid:
                raise ConfigError(
                    f"unknown encoder {encoder!r} for {arch}; valid choices: tiny, small, "
                    f"{', '.join(v for v in valid if v not in LIGHT_ENCODERS)} (or tu-<timm name>)"
                )
        max_depth = 5
    d = depth if depth is not None else min(_DEFAULT_DEPTH.get(arch, 5), max_depth)
    if not 1 <= d <= max_depth:
        raise ConfigError(f"depth must be 1..{max_depth} for {arch}/{encoder}, got {d}")
    if in_channels < 1 or classes < 2:
        raise ConfigError(f"need >= 1 input channel and >= 2 classes, got {in_channels}, {classes}")
    opts = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return check_spec(ArchSpec(arch, encoder, in_channels, classes, d, opts))


def build_model(spec: ArchSpec) -> nn.Module:
    """Instantiate the network described by ``spec`` (random init, never downloads).

    Raises:
        ConfigError: the combination is invalid (message says why).
    """
    try:
        return ARCHITECTURES[spec.arch](spec)
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(
            f"cannot build {spec.arch} with encoder {spec.encoder!r} (depth {spec.depth}, "
            f"options {dict(spec.options)}): {exc}"
        ) from exc


def create_model(
    arch: str = DEFAULT_ARCH,
    encoder: str = "small",
    in_channels: int = 3,
    classes: int = 4,
    depth: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build a segmentation network returning logits ``(N, classes, H, W)``.

    Args:
        arch: one of :data:`ARCHITECTURES` (``unet`` by default).
        encoder: ``tiny``, ``small`` or any smp encoder name (random init); for ``segnet``
            one of ``tiny``, ``small``, ``vgg16``.
        in_channels: input bands.
        classes: output classes.
        depth: encoder stages (default 5; 3 for PSPNet).
        **options: passed to the smp constructor (e.g. ``decoder_channels``).

    Raises:
        ConfigError: unknown names (valid choices listed) or an invalid combination.
    """
    return build_model(make_spec(arch, encoder, in_channels, classes, depth, **options))


class Float32Conv2d(nn.Conv2d):
    """A convolution that runs in float32 even inside an autocast region.

    Attributes:
        output_dtype: dtype its output is cast to (None: float32), for the layers after it
            when their weights are in that dtype (:func:`bfloat16_model`).
    """

    output_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As :class:`torch.nn.Conv2d`, in float32."""
        with torch.autocast(x.device.type, enabled=False):
            y = cast(torch.Tensor, super().forward(x.float()))
        return y if self.output_dtype is None else y.to(self.output_dtype)


def full_precision_stem(model: nn.Module) -> nn.Module:
    """Keep the first convolution (the one that sees the bands) in float32 under autocast.

    Trained first layers compute colour contrasts (e.g. green against red and blue) as
    differences of nearly cancelling weights; in bf16 (8 significant bits) inputs and weights
    lose those contrasts. With the whole default U-Net in bf16 the class map agreed with
    float32 on 83-99 % of the real samples' pixels; with its first convolution in float32 on
    99.6-99.95 % (benchmarks/RESULTS.md). The layer is a small share of the work.

    The first convolution is the first in definition order, depth first (every architecture
    here defines its encoder before its decoder); it becomes a :class:`Float32Conv2d` in
    place, so parameters, state-dict keys and saved bundles stay as they were. Returns the
    same module (idempotent).
    """
    first = _first_conv(model)
    if first is not None and type(first) is nn.Conv2d:
        first.__class__ = Float32Conv2d
    return model


def ieee_float32_convolutions() -> None:
    """Make cuDNN compute float32 convolutions in float32, not TF32 (process-wide).

    Under autocast the only float32 convolution left is the stem (:func:`full_precision_stem`),
    and TF32 (10 significant bits) would undo most of what keeping it float32 is for: with the
    stem's inputs and weights rounded to TF32, the rest in float32, the shipped model's class
    map changed on 0.06-1.0 % of the real samples' pixels (CPU emulation; 0.0-0.1 % with the
    rest in bf16 and the stem in float32). The stem is ~10 % of U-Net resnet18's operations
    and the GPU waits on tile decoding most of the time, so float32 costs little there.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # PyTorch >= 2.9
        conv.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def bfloat16_model(model: nn.Module, in_channels: int) -> bool:
    """Put the model's weights in bf16, except the first convolution's (float32), in place.

    For CPUs with native bf16: without autocast's per-operator casts U-Net resnet18 ran
    12-17 % faster (benchmarks/RESULTS.md). The first convolution takes the float32 input,
    computes in float32 (see :func:`full_precision_stem`) and hands bf16 on. Returns False,
    with the weights back in float32, for an architecture that uses its input elsewhere than
    in the first convolution: it would meet bf16 weights with it.
    """
    first = _first_conv(model)
    if first is None or type(first) not in (nn.Conv2d, Float32Conv2d):
        return False
    model.to(torch.bfloat16)
    full_precision_stem(model)
    first.float()
    cast(Float32Conv2d, first).output_dtype = torch.bfloat16
    side = 2 * SIZE_MULTIPLE
    try:
        with torch.inference_mode():
            model(torch.zeros(1, in_channels, side, side))
    except RuntimeError as exc:  # a dtype mismatch inside the architecture
        log.debug("weights kept in float32 (%s)", exc)
        model.float()
        cast(Float32Conv2d, first).output_dtype = None
        return False
    return True


def fold_batch_norms(model: nn.Module, in_channels: int) -> nn.Module:
    """A copy of an eval-mode model with each batch norm folded into the convolution before it.

    Inference only. On CPU, where nothing fuses eager PyTorch's operators, this drops a
    read and write of every normalised activation map (U-Net resnet18 in bf16: ~8 % faster,
    benchmarks/RESULTS.md). torch.fx traces the model; architectures it cannot trace (smp's
    FPN, PSPNet, DeepLabV3+ and U-Net++ branch on tensor shapes) come back unchanged, as does a
    folded copy that does not reproduce the original on a check input.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model, inplace=False)
    except Exception as exc:  # fx raises several unrelated types on code it cannot trace
        log.debug("batch norms not folded (%s: %s)", type(exc).__name__, exc)
        return model
    side = 2 * SIZE_MULTIPLE
    x = torch.rand(1, in_channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        same = torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)
    if not same:
        log.debug("batch norms not folded: the folded model differs from the original")
        return model
    return folded


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
