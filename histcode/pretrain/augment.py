"""SimCLR augmentations for H&E tiles, batched on the accelerator with per-sample parameters.

The data loader only decodes tiles to uint8 tensors; :class:`TileAugmentation` turns a uint8
batch already on the device into float, normalised views. Every sample of the batch draws its
own parameters (crop box, flips, rotation, colour, stain, blur), and no operation reads values
back to the host, so the whole pipeline stays on the accelerator without synchronising.

Pipeline (each step configured by :class:`AugmentConfig`, hence by the YAML config):

1. random resized crop, resized to ``crop_size`` (kornia ``RandomResizedCrop``, one batched
   warp);
2. horizontal and vertical flips and rotations by multiples of 90° (:class:`RandomFlipRotate`,
   exact, torch; run on the uint8 tiles before the crop);
3. HED stain jitter (:class:`RandomHEDJitter`, torch; Tellez et al. 2018);
4. colour jitter (brightness, contrast, saturation, hue), then random grayscale
   (:class:`RandomColorJitter`, torch, one fused per-sample affine map);
5. Gaussian blur with a per-sample sigma (kornia ``RandomGaussianBlur``);
6. normalisation with the encoder's mean and std.

kornia supplies the crop and the blur; the other steps are written in torch because kornia
lacks HED jitter, and its rotation (an interpolating warp) and colour jitter (one HSV round
trip per step, ~40× slower on CPU) cost more than the rest of the pipeline together.

The same code runs on CPU (the tensors' device decides).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

#: Ruifrok & Johnston (2001) stain OD vectors (rows: haematoxylin, eosin, DAB), as
#: scikit-image's ``rgb_from_hed``.
RGB_FROM_HED = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)
#: scikit-image's optical-density scale: OD = log(I) / log(1e-6), I in (0, 1].
_OD_EPS = 1e-6


@dataclass(frozen=True)
class AugmentConfig:
    """Every parameter of the augmentation pipeline (the ``model.augmentation`` YAML group).

    Probabilities are per sample: each tile of a batch is flipped, jittered, … independently.

    Attributes:
        crop_size: side of the views in pixels; ``None`` = the tile store's tile size (the
            encoder's ``input_spec.tile_size``), the size at which tiles are embedded later.
        crop_scale: range of the crop area as a fraction of the tile area.
        crop_ratio: range of the crop aspect ratio (width / height).
        hflip_prob: probability of a horizontal flip.
        vflip_prob: probability of a vertical flip.
        rot90_prob: probability of a rotation by 90°, 180° or 270° (chosen uniformly); 0.75
            makes all four orientations equally likely.
        hed_prob: probability of HED stain jitter.
        hed_sigma: strength σ of HED stain jitter: per-stain scale in [1-σ, 1+σ] and shift in
            [-σ, σ] (scikit-image ``rgb2hed`` units); 0.05 is Tellez et al.'s "HED-light",
            0.2 their "HED-strong".
        jitter_prob: probability of colour jitter.
        brightness: brightness jitter strength (factor in [1-b, 1+b]).
        contrast: contrast jitter strength (factor in [1-c, 1+c]).
        saturation: saturation jitter strength (factor in [1-s, 1+s]).
        hue: hue jitter strength (shift in [-h, h] of a full turn; at most 0.5).
        gray_prob: probability of converting to grayscale.
        blur_prob: probability of Gaussian blur.
        blur_sigma: range of the blur's standard deviation in pixels.
        blur_kernel_size: side of the blur kernel (odd); ``None`` = about a tenth of
            ``crop_size`` (SimCLR's 23 px at 224 px).
    """

    crop_size: int | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rot90_prob: float = 0.75
    hed_prob: float = 0.8
    hed_sigma: float = 0.05
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None

    def check(self) -> None:
        """Raise a ``ValueError`` naming the option and its valid range for impossible values."""
        for name in (
            "hflip_prob",
            "vflip_prob",
            "rot90_prob",
            "hed_prob",
            "jitter_prob",
            "gray_prob",
            "blur_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation.{name}={value}: a probability, expected 0-1")
        for name in ("brightness", "contrast", "saturation", "hed_sigma"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"augmentation.{name}={value}: expected 0 ≤ value < 1")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"augmentation.hue={self.hue}: expected 0-0.5 (of a full turn)")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"augmentation.crop_scale={list(self.crop_scale)}: expected 0 < min ≤ max ≤ 1 "
                "(fractions of the tile area, e.g. [0.2, 1.0])"
            )
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(
                f"augmentation.crop_ratio={list(self.crop_ratio)}: expected 0 < min ≤ max "
                "(e.g. [0.75, 1.333])"
            )
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(
                f"augmentation.blur_sigma={list(self.blur_sigma)}: expected 0 < min ≤ max pixels"
            )
        if self.crop_size is not None and self.crop_size < 8:
            raise ValueError(f"augmentation.crop_size={self.crop_size}: expected ≥ 8 px or null")
        k = self.blur_kernel_size
        if k is not None and (k < 3 or k % 2 == 0):
            raise ValueError(
                f"augmentation.blur_kernel_size={k}: expected an odd number ≥ 3, or null for "
                "about a tenth of the crop size"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists), for registry cards."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def default_blur_kernel(crop_size: int) -> int:
    """SimCLR's blur kernel: an odd side of about a tenth of the view (23 px at 224 px)."""
    k = max(3, round(crop_size / 10))
    return k if k % 2 == 1 else k + 1


def _per_sample(p: float, batch_size: int, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, 1) bool: which samples an operation with probability ``p`` applies to."""
    return (torch.rand(batch_size, device=device) < p).view(-1, 1, 1, 1)


class RandomFlipRotate(nn.Module):
    """Random flips and rotations by multiples of 90°, per sample, exactly (no interpolation).

    Each sample draws a horizontal flip (probability ``hflip_p``), a vertical flip
    (``vflip_p``) and a rotation by 90°, 180° or 270° (``rot90_p``, the angle uniform), applied
    in that order. The three compose into one element of the dihedral group of the square,
    which is applied as at most a transpose, a row flip and a column flip selected per sample
    with ``torch.where``: three passes over the batch whatever the draws, no interpolation and
    no host synchronisation, on any dtype (uint8 included, so it can run before the tiles are
    converted to float). kornia's ``RandomRotation90`` warps with bilinear interpolation
    through an affine matrix instead, and its flips are one pass each.

    Args:
        hflip_p: probability of a horizontal flip (left-right).
        vflip_p: probability of a vertical flip (top-bottom).
        rot90_p: probability of a rotation by a non-zero multiple of 90°; 0.75 makes the four
            orientations equally likely.

    Shapes:
        ``(B, C, S, S)`` → ``(B, C, S, S)`` (square images), same dtype.
    """

    def __init__(self, hflip_p: float = 0.5, vflip_p: float = 0.5, rot90_p: float = 0.75) -> None:
        super().__init__()
        self.hflip_p, self.vflip_p, self.rot90_p = hflip_p, vflip_p, rot90_p
        self._params: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flip and rotate.

        Args:
            x: images, ``(batch_size, C, S, S)``.

        Returns:
            Transformed images, ``(batch_size, C, S, S)``; ``self._params`` holds each
            sample's ``hflip``, ``vflip`` (bool) and ``k`` (quarter turns counter-clockwise,
            as ``torch.rot90``), each ``(batch_size,)``.
        """
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"RandomFlipRotate needs square images, got {tuple(x.shape)}")
        b, dev = x.shape[0], x.device
        hflip = torch.rand(b, device=dev) < self.hflip_p
        vflip = torch.rand(b, device=dev) < self.vflip_p
        k = torch.randint(1, 4, (b,), device=dev)
        k = torch.where(torch.rand(b, device=dev) < self.rot90_p, k, torch.zeros_like(k))
        self._params = {"hflip": hflip, "vflip": vflip, "k": k}
        # An element (t, r, c) acts as: transpose if t, then flip rows if r, then columns if c.
        # hflip = (0, 0, 1), vflip = (0, 1, 0); rot90 by k: (1, 1, 0), (0, 1, 1), (1, 0, 1).
        # rot ∘ flips = F(r2, c2)·T^t2·F(r1, c1) = F(r2 ^ r1', c2 ^ c1')·T^t2 where
        # (r1', c1') = (c1, r1) if t2 (a transpose swaps row and column flips).
        t2 = k % 2 == 1
        r2 = (k == 1) | (k == 2)
        c2 = k >= 2
        r1 = torch.where(t2, hflip, vflip)
        c1 = torch.where(t2, vflip, hflip)
        t, r, c = (v.view(-1, 1, 1, 1) for v in (t2, r2 ^ r1, c2 ^ c1))
        x = torch.where(t, x.transpose(-1, -2), x)
        x = torch.where(r, x.flip(-2), x)
        return torch.where(c, x.flip(-1), x)


class RandomHEDJitter(nn.Module):
    """HED stain jitter: perturb haematoxylin, eosin and DAB concentrations per sample.

    Tellez, Balkenhol, Otte-Höller et al., "Whole-slide mitosis detection in H&E breast
    histology using PHH3 as a reference to train distilled stain-invariant convolutional
    networks", IEEE TMI 2018 (and Tellez et al., "Quantifying the effects of data augmentation
    and stain color normalization…", MedIA 2019): RGB is converted to optical density and
    deconvolved into HED stains with the Ruifrok–Johnston matrix; each stain channel ``c`` of
    each sample becomes ``α_c · s_c + β_c`` with ``α_c ~ U[1-σ, 1+σ]`` and ``β_c ~ U[-σ, σ]``;
    the result is converted back to RGB.

    The jitter is linear in optical density, so it is applied as one per-sample 3×3 matrix
    and offset in OD space: ``od' = od · (H · diag(α) · R) + β · R`` with ``R`` the stain
    matrix and ``H = R⁻¹``. With σ = 0 the transform is the identity up to float error.
    Units follow scikit-image's ``rgb2hed`` (OD scaled by ``1 / -ln(1e-6)``), as in Tellez
    et al.'s code.

    Args:
        sigma: jitter strength σ (0.05 "HED-light", 0.2 "HED-strong").
        p: probability that a sample is jittered.

    Shapes:
        ``(B, 3, H, W)`` float RGB in [0, 1] → same shape, in [0, 1].
    """

    def __init__(self, sigma: float = 0.05, p: float = 1.0) -> None:
        super().__init__()
        self.sigma = sigma
        self.p = p
        rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
        self.register_buffer("rgb_from_hed", rgb_from_hed.float(), persistent=False)
        self.register_buffer(
            "hed_from_rgb", torch.linalg.inv(rgb_from_hed).float(), persistent=False
        )
        self._params: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Jitter stains.

        Args:
            x: RGB images in [0, 1], ``(batch_size, 3, H, W)``.

        Returns:
            Jittered images in [0, 1], ``(batch_size, 3, H, W)``; ``self._params`` holds
            ``alpha`` and ``beta``, ``(batch_size, 3)`` each.
        """
        b = x.shape[0]
        s = self.sigma
        alpha = 1.0 + (2.0 * torch.rand(b, 3, device=x.device) - 1.0) * s
        beta = (2.0 * torch.rand(b, 3, device=x.device) - 1.0) * s
        off = torch.rand(b, device=x.device) >= self.p  # samples left untouched
        alpha = torch.where(off[:, None], torch.ones_like(alpha), alpha)
        beta = torch.where(off[:, None], torch.zeros_like(beta), beta)
        self._params = {"alpha": alpha, "beta": beta}
        # per-sample colour transform in OD space: (B, 3, 3) and (B, 3)
        hed, rgb = self.hed_from_rgb.to(x.dtype), self.rgb_from_hed.to(x.dtype)
        matrix = hed @ (alpha.to(x.dtype)[:, :, None] * rgb)
        offset = beta.to(x.dtype) @ rgb
        log_eps = math.log(_OD_EPS)
        od = torch.log(x.clamp(min=_OD_EPS)) / log_eps  # (B, 3, H, W), ≥ 0
        od = torch.einsum("bihw,bij->bjhw", od, matrix) + offset[:, :, None, None]
        return torch.exp(od * log_eps).clamp_(0.0, 1.0)


#: ITU-R 601 luma weights (torchvision's and kornia's grayscale).
LUMA = (0.299, 0.587, 0.114)
#: RGB → YIQ; hue is a rotation of the (I, Q) chroma plane, which keeps luma.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)


class RandomColorJitter(nn.Module):
    """SimCLR's colour stage (jitter, then grayscale) as one per-sample affine map of RGB.

    Brightness (``x·b``), contrast (blend with the image's mean gray level, factor ``c``),
    saturation (blend with the grayscale image, factor ``s``) and hue (rotation by ``2π·h``
    of the chroma plane of YIQ, which keeps luma) are all affine in RGB, so the four are
    composed per sample into one 3×3 matrix and offset and applied in one pass, then clamped
    to [0, 1]. Grayscale (the luma projection) composes the same way. Factors are drawn as in
    torchvision's ``ColorJitter``: ``b, c, s ~ U[1-v, 1+v]``, ``h ~ U[-v, v]``; the order is
    fixed (brightness, contrast, saturation, hue) and there is one clamp at the end rather than
    one after each step.

    kornia's ``ColorJitter`` does the same through HSV with one pass per step: it measured
    about 40× slower on CPU (2.2 s vs 0.05 s for 128 views of 224 px on two cores), where it
    dominated the whole pipeline.

    Args:
        brightness: brightness strength (factor in ``[1-v, 1+v]``).
        contrast: contrast strength.
        saturation: saturation strength.
        hue: hue strength, a fraction of a full turn (≤ 0.5).
        p: probability that a sample is jittered.
        gray_p: probability that a sample is then converted to grayscale.

    Shapes:
        ``(B, 3, H, W)`` float RGB in [0, 1] → same shape, in [0, 1].
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        p: float = 0.8,
        gray_p: float = 0.2,
    ) -> None:
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness,
            contrast,
            saturation,
            hue,
        )
        self.p, self.gray_p = p, gray_p
        yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
        self.register_buffer("rgb_to_yiq", yiq.float(), persistent=False)
        self.register_buffer("yiq_to_rgb", torch.linalg.inv(yiq).float(), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA), persistent=False)
        self._params: dict[str, torch.Tensor] = {}

    def _uniform(
        self, strength: float, centre: float, b: int, device: torch.device
    ) -> torch.Tensor:
        return centre + (2.0 * torch.rand(b, device=device) - 1.0) * strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Jitter colours.

        Args:
            x: RGB images in [0, 1], ``(batch_size, 3, H, W)``.

        Returns:
            Jittered images in [0, 1], ``(batch_size, 3, H, W)``; ``self._params`` holds each
            sample's ``brightness``, ``contrast``, ``saturation``, ``hue`` (``(batch_size,)``,
            neutral values for samples not jittered) and ``gray`` (bool, ``(batch_size,)``).
        """
        b, dev = x.shape[0], x.device
        on = torch.rand(b, device=dev) < self.p
        neutral = torch.ones(b, device=dev)
        bri = torch.where(on, self._uniform(self.brightness, 1.0, b, dev), neutral)
        con = torch.where(on, self._uniform(self.contrast, 1.0, b, dev), neutral)
        sat = torch.where(on, self._uniform(self.saturation, 1.0, b, dev), neutral)
        hue = torch.where(on, self._uniform(self.hue, 0.0, b, dev), 0.0 * neutral)
        gray = torch.rand(b, device=dev) < self.gray_p
        self._params = {
            "brightness": bri,
            "contrast": con,
            "saturation": sat,
            "hue": hue,
            "gray": gray,
        }
        eye = torch.eye(3, device=dev)
        to_gray = self.luma.expand(3, 3)  # every output channel = luma: (3, 3)
        # saturation: s·I + (1-s)·G ; hue: YIQ⁻¹ · rot(θ) · YIQ (rows act on column vectors)
        sat_m = sat[:, None, None] * eye + (1.0 - sat)[:, None, None] * to_gray
        theta = 2.0 * math.pi * hue
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(b, 3, 3, device=dev)
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        hue_m = self.yiq_to_rgb @ rot @ self.rgb_to_yiq
        # x' = c·b·(H·S)·x + (1-c)·b·m, with m the mean gray level (H and S keep gray levels)
        matrix = (con * bri)[:, None, None] * (hue_m @ sat_m)
        mean_gray = x.mean(dim=(2, 3)) @ self.luma  # (B,)
        offset = ((1.0 - con) * bri * mean_gray)[:, None].expand(b, 3)
        matrix = torch.where(gray[:, None, None], to_gray @ matrix, matrix)
        offset = torch.where(gray[:, None], offset @ to_gray.T, offset)
        matrix, offset = matrix.to(x.dtype), offset.to(x.dtype)
        out = torch.einsum("bij,bjhw->bihw", matrix, x) + offset[:, :, None, None]
        return out.clamp_(0.0, 1.0)


class TileAugmentation(nn.Module):
    """The SimCLR view generator for tiles: uint8 batch on the device → normalised views.

    Args:
        config: every parameter of the pipeline.
        mean: per-channel RGB mean of the encoder's normalisation.
        std: per-channel RGB std of the encoder's normalisation.
        crop_size: side of the views when ``config.crop_size`` is None (the tile size).

    Shapes:
        ``(B, 3, H, W)`` uint8 → ``(B, 3, crop_size, crop_size)`` float32.

    Example:
        >>> aug = TileAugmentation(AugmentConfig(), (0.5,) * 3, (0.25,) * 3, crop_size=64)
        >>> tiles = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
        >>> view0, view1 = aug.two_views(tiles)
        >>> view0.shape
        torch.Size([8, 3, 64, 64])
    """

    def __init__(
        self,
        config: AugmentConfig,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        crop_size: int,
    ) -> None:
        import kornia.augmentation as K

        super().__init__()
        config.check()
        self.config = config
        size = int(config.crop_size or crop_size)
        self.size = size
        kernel = config.blur_kernel_size or default_blur_kernel(size)
        self.blur_kernel_size = kernel
        # Flips and rotations run on the uint8 tiles (a quarter of the bytes of float), before
        # the crop: the crop's distribution is invariant under them, so the views are
        # distributed as with crop-then-flip.
        self.flip_rotate = RandomFlipRotate(config.hflip_prob, config.vflip_prob, config.rot90_prob)
        self.crop = K.RandomResizedCrop(
            (size, size),
            scale=config.crop_scale,
            ratio=config.crop_ratio,
            cropping_mode="resample",  # one batched warp; "slice" loops over the samples
            p=1.0,
        )
        self.colour = nn.Sequential(
            RandomHEDJitter(sigma=config.hed_sigma, p=config.hed_prob),
            RandomColorJitter(
                config.brightness,
                config.contrast,
                config.saturation,
                config.hue,
                p=config.jitter_prob,
                gray_p=config.gray_prob,
            ),
            K.RandomGaussianBlur((kernel, kernel), config.blur_sigma, p=config.blur_prob),
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """One random view of each tile.

        Args:
            tiles: uint8 RGB tiles, ``(batch_size, 3, H, W)``, on any device.

        Returns:
            Normalised float32 views, ``(batch_size, 3, size, size)``, on the same device.
        """
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(
                f"expected uint8 RGB tiles (B, 3, H, W), got {tiles.dtype} {tuple(tiles.shape)}"
            )
        if tiles.shape[0] == 0:
            return torch.empty(0, 3, self.size, self.size, device=tiles.device)
        with torch.autocast(tiles.device.type, enabled=False):
            x = self.flip_rotate(tiles).float().div_(255.0)
            x = self.crop(x).clamp_(0.0, 1.0)
            x = self.colour(x)
            return (x - self.mean) / self.std

    def two_views(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views of each tile, augmented as one batch of ``2 * B``.

        Args:
            tiles: uint8 RGB tiles, ``(batch_size, 3, H, W)``.

        Returns:
            ``(view0, view1)``, each ``(batch_size, 3, size, size)`` float32.
        """
        views = self(torch.cat([tiles, tiles]))
        return views[: len(tiles)], views[len(tiles) :]

    def resolved(self) -> dict[str, int]:
        """The sizes that the config leaves to defaults: ``crop_size``, ``blur_kernel_size``."""
        return {"crop_size": self.size, "blur_kernel_size": self.blur_kernel_size}

    def extra_repr(self) -> str:
        return f"size={self.size}"
