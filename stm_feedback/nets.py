"""The three fully convolutional networks (Ziatdinov et al., Methods) and their JSON specs.

- NN-0 (terraces) and NN-1 (atoms): U-Net with 3 max-pool levels; the bottleneck is a spatial pyramid of
  dilated 3x3 convolutions (rates 2, 4, 6, outputs summed); bilinear upsampling + skip concatenation.
- NN-2 (defects): three 3x3 convs x C, one max-pool, two dilated pyramids with 2C filters, bilinear
  upsampling, three 3x3 convs x C, then a 1x1 classifier (background / protrusion / depression).
Leaky ReLU (slope 0.01) everywhere; BatchNorm after each conv (folded into the conv at load time).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from stm_feedback.errors import ModelError

NetName = Literal["terraces", "atoms", "defects"]
NET_NAMES: tuple[str, ...] = ("terraces", "atoms", "defects")
FILE_STEMS: dict[str, str] = {"terraces": "nn0_terraces", "atoms": "nn1_atoms", "defects": "nn2_defects"}
LEAK = 0.01
DILATIONS: tuple[int, ...] = (2, 4, 6)


@dataclass
class NetSpec:
    """Everything needed to rebuild and feed one network (stored as ``models/<stem>.json``).

    ``widths``: U-Net (enc1, enc2, enc3, bottleneck) or NN-2 (C,) filters. ``pixel_size_nm``: the working
    pixel size the net was trained at (input frames are resampled to it). ``polarity``: "rows_bright" = the
    net is fed polarity-corrected frames when the bias is known (trained on both polarities for bias None);
    "raw" = fed the levelled frame as is, whatever the bias. ``highpass_sigma_nm``: background removal before
    the net (0 = none). ``outputs``: the meaning of the output channels.
    """

    name: str
    arch: Literal["unet", "defectnet"]
    widths: tuple[int, ...]
    out_channels: int
    pixel_size_nm: float
    polarity: Literal["rows_bright", "raw"] = "raw"
    highpass_sigma_nm: float = 0.0
    convs_per_level: int = 1
    stem: int = 1  # U-Net only: pixel-unshuffle factor in front (and pixel-shuffle behind) the U-Net
    normalisation: str = "plane+line levelling, 1-99 percentile scaling, clip [-0.5, 1.5]"
    outputs: tuple[str, ...] = ()
    version: str = "untrained"
    training: dict = field(default_factory=dict)

    @property
    def pool_multiple(self) -> int:
        """Input sides must be multiples of this (2 ** number of max-pools)."""
        return 8 * self.stem if self.arch == "unet" else 2

    def to_json(self) -> str:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["outputs"] = list(self.outputs)
        return json.dumps(d, indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> NetSpec:
        try:
            d = json.loads(text)
            d["widths"] = tuple(int(v) for v in d["widths"])
            d["outputs"] = tuple(d.get("outputs", ()))
            return NetSpec(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"invalid network spec: {e}") from e


# Shipped defaults: narrow nets at coarse working pixel sizes (speed, issue 6); "paper" = the paper's widths.
DEFAULT_SPECS: dict[str, NetSpec] = {
    "terraces": NetSpec(
        "terraces", "unet", (8, 16, 32, 32), 1, pixel_size_nm=0.2, polarity="raw", outputs=("step_logit",)
    ),
    "atoms": NetSpec(
        "atoms",
        "unet",
        (8, 16, 32, 32),
        1,
        pixel_size_nm=0.1,
        polarity="rows_bright",
        highpass_sigma_nm=1.0,
        outputs=("atom_logit",),
    ),
    "defects": NetSpec(
        "defects",
        "defectnet",
        (12,),
        3,
        pixel_size_nm=0.15,
        polarity="raw",
        outputs=("background", "protrusion", "depression"),
    ),
}
PAPER_SPECS: dict[str, NetSpec] = {
    "terraces": replace(
        DEFAULT_SPECS["terraces"], widths=(16, 32, 64, 128), pixel_size_nm=0.1, convs_per_level=2
    ),
    "atoms": replace(DEFAULT_SPECS["atoms"], widths=(16, 32, 64, 128), convs_per_level=2),
    "defects": replace(DEFAULT_SPECS["defects"], widths=(25,), pixel_size_nm=0.1),
}


def spec_preset(name: str, preset: str = "default") -> NetSpec:
    """A fresh copy of the "default" (shipped, cheap) or "paper" spec of net ``name``."""
    table = {"default": DEFAULT_SPECS, "paper": PAPER_SPECS}.get(preset)
    if table is None or name not in table:
        raise ModelError(f"unknown spec {preset!r}/{name!r}; nets: {NET_NAMES}, presets: default, paper")
    return replace(table[name], training={})


class ConvBlock(nn.Sequential):
    """n x (3x3 conv, BatchNorm, leaky ReLU); ``dilation`` applies to every conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, dilation: int = 1) -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv2d(
                    c_in if i == 0 else c_out, c_out, 3, padding=dilation, dilation=dilation, bias=False
                ),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(LEAK, inplace=True),
            ]
        super().__init__(*layers)


class DilatedPyramid(nn.Module):
    """Spatial pyramid: parallel 3x3 convs, dilation rates 2, 4, 6 (each conv + BN), summed, leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, rates: tuple[int, ...] = DILATIONS) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(c_out))
            for r in rates
        )
        self.act = nn.LeakyReLU(LEAK, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return self.act(out)


class UNet(nn.Module):
    """U-Net with 3 max-pools and a dilated-pyramid bottleneck; widths = (e1, e2, e3, bottleneck).
    Input (B, 1, H, W) with H, W multiples of 8 * stem; output (B, out_channels, H, W) logits."""

    def __init__(
        self, widths: tuple[int, ...], out_channels: int, convs_per_level: int = 1, stem: int = 1
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ModelError(f"U-Net widths must be (e1, e2, e3, bottleneck), got {widths}")
        if stem not in (1, 2, 4):
            raise ModelError(f"U-Net stem must be 1, 2 or 4, got {stem}")
        e1, e2, e3, b = widths
        n = convs_per_level
        self.stem = stem
        self.enc1 = ConvBlock(stem * stem, e1, n)
        self.enc2 = ConvBlock(e1, e2, n)
        self.enc3 = ConvBlock(e2, e3, n)
        self.bottleneck = DilatedPyramid(e3, b)
        self.dec3 = ConvBlock(b + e3, e3, n)
        self.dec2 = ConvBlock(e3 + e2, e2, n)
        self.dec1 = ConvBlock(e2 + e1, e1, n)
        self.head = nn.Conv2d(e1, out_channels * stem * stem, 1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem > 1:
            x = F.pixel_unshuffle(x, self.stem)
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        s3 = self.enc3(F.max_pool2d(s2, 2))
        z = self.bottleneck(F.max_pool2d(s3, 2))
        z = self.dec3(torch.cat([self._up(z, s3), s3], 1))
        z = self.dec2(torch.cat([self._up(z, s2), s2], 1))
        z = self.dec1(torch.cat([self._up(z, s1), s1], 1))
        out = self.head(z)
        return F.pixel_shuffle(out, self.stem) if self.stem > 1 else out


class DefectNet(nn.Module):
    """NN-2: 3 convs x C, max-pool, 2 dilated pyramids x 2C, bilinear upsampling, 3 convs x C, 1x1 head.
    Input (B, 1, H, W) with even H, W; output (B, out_channels, H, W) logits."""

    def __init__(self, widths: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        if len(widths) != 1:
            raise ModelError(f"NN-2 widths must be (C,), got {widths}")
        c = widths[0]
        self.enc = ConvBlock(1, c, 3)
        self.pyr1 = DilatedPyramid(c, 2 * c)
        self.pyr2 = DilatedPyramid(2 * c, 2 * c)
        self.dec = ConvBlock(2 * c, c, 3)
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.enc(x)
        z = self.pyr2(self.pyr1(F.max_pool2d(s, 2)))
        z = F.interpolate(z, size=s.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.dec(z))


def build_net(spec: NetSpec) -> nn.Module:
    """A freshly initialised network for ``spec``."""
    if spec.arch == "unet":
        return UNet(spec.widths, spec.out_channels, spec.convs_per_level, spec.stem)
    if spec.arch == "defectnet":
        return DefectNet(spec.widths, spec.out_channels)
    raise ModelError(f"unknown architecture {spec.arch!r}")


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every (Conv2d, BatchNorm2d) pair inside nn.Sequential containers into one conv (eval only)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        fuse_batchnorm(child)
    if isinstance(module, nn.Sequential):
        mods = list(module)
        i = 0
        while i < len(mods) - 1:
            if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                mods[i] = fuse_conv_bn_eval(mods[i], mods[i + 1])
                mods[i + 1] = nn.Identity()
                i += 2
            else:
                i += 1
        for k, m in enumerate(mods):
            module._modules[str(k)] = m
    return module


def model_paths(models_dir: Path, name: str) -> tuple[Path, Path]:
    """(weights .pt, spec .json) of net ``name`` in models_dir."""
    stem = FILE_STEMS[name]
    return models_dir / f"{stem}.pt", models_dir / f"{stem}.json"


def save_model(net: nn.Module, spec: NetSpec, models_dir: Path) -> tuple[Path, Path]:
    """Write the plain state_dict and the JSON spec; returns their paths."""
    models_dir.mkdir(parents=True, exist_ok=True)
    pt, js = model_paths(models_dir, spec.name)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, pt)
    js.write_text(spec.to_json() + "\n")
    return pt, js


def load_model(models_dir: Path, name: str) -> tuple[nn.Module, NetSpec]:
    """Network ``name`` (eval mode, BN unfused) from models_dir; ModelError when missing or incompatible."""
    pt, js = model_paths(models_dir, name)
    if not pt.exists() or not js.exists():
        raise ModelError(
            f"no trained weights for {name!r} in {models_dir} (need {pt.name} and {js.name}); "
            f"train them with `stm-feedback train {name}` (or point settings.models.models_dir elsewhere)"
        )
    spec = NetSpec.from_json(js.read_text())
    net = build_net(spec)
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        raise ModelError(f"weights {pt} do not match spec {js.name}: {e}") from e
    return net.eval(), spec


def count_gflop(net: nn.Module, height_px: int, width_px: int) -> float:
    """Floating-point operations (1e9, multiply and add counted separately) of one forward pass on a
    (1, 1, H, W) input (torch.utils.flop_counter; independent of machine load)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, height_px, width_px)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x)
    return fc.get_total_flops() / 1e9
