"""Training augmentations on a normalised image (unitless, ~0..1) and its target maps (seeded numpy rng).

Geometric transforms (flips, 90-degree rotations, zoom, scan-line jitter) move the targets identically;
intensity transforms (noise, background, blur, contrast inversion) touch the image only.
``targets`` maps a name to an (H, W) array; integer arrays (class maps) are resampled nearest-neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

Maps = dict[str, np.ndarray]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per sample) and ranges (image units are normalised heights, lengths in px)."""

    p_flip_rot: float = 1.0
    p_zoom: float = 0.5
    zoom: tuple[float, float] = (0.85, 1.15)
    p_jitter: float = 0.3
    jitter_lambda_px: tuple[float, float] = (0.0, 1.5)
    p_background: float = 0.3
    background_amp: tuple[float, float] = (0.1, 0.5)
    p_blur: float = 0.2
    blur_sigma_px: tuple[float, float] = (0.3, 1.0)
    p_gaussian: float = 0.5
    gaussian_sigma: tuple[float, float] = (0.0, 0.15)
    p_poisson: float = 0.2
    poisson_scale: tuple[float, float] = (30.0, 100.0)
    p_salt_pepper: float = 0.2
    salt_pepper_fraction: tuple[float, float] = (0.0, 0.01)
    p_invert: float = 0.0  # only for nets whose targets do not depend on the sign of the contrast


def flip_rot(image: np.ndarray, targets: Maps, rng: np.random.Generator) -> tuple[np.ndarray, Maps]:
    """A random one of the 8 flips/90-degree rotations, applied to image and targets alike."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))

    def f(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a, k)
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    return f(image), {n: f(t) for n, t in targets.items()}


def zoom(
    image: np.ndarray, targets: Maps, factor: float, out_shape: tuple[int, int]
) -> tuple[np.ndarray, Maps]:
    """Scale by ``factor`` about the centre and return the central out_shape crop (reflect-padded when the
    scaled array is smaller)."""
    h, w = image.shape
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))

    def f(a: np.ndarray) -> np.ndarray:
        # class maps: nearest pixel *centre* (INTER_NEAREST_EXACT). Plain INTER_NEAREST reads source pixel
        # floor(i / factor), half a pixel off the image's bilinear grid: up to session 13 every zoomed NN-2
        # sample had its footprints 0.5 px right of and below the image's defects, and NN-2 learned the shift
        # (detections 0.03-0.07 nm off in +x and +y; models/MODEL_CARD.md, session 14)
        interp = cv2.INTER_NEAREST_EXACT if np.issubdtype(a.dtype, np.integer) else cv2.INTER_LINEAR
        src = a.astype(np.float32) if not np.issubdtype(a.dtype, np.integer) else a.astype(np.int32)
        z = cv2.resize(src, (nw, nh), interpolation=interp)
        return _center_fit(z, out_shape).astype(a.dtype)

    return f(image), {n: f(t) for n, t in targets.items()}


def _center_fit(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = a.shape
    th, tw = shape
    if h < th or w < tw:
        ph, pw = max(0, th - h), max(0, tw - w)
        a = np.pad(a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect")
        h, w = a.shape
    y0, x0 = (h - th) // 2, (w - tw) // 2
    return a[y0 : y0 + th, x0 : x0 + tw]


def line_jitter(
    image: np.ndarray, targets: Maps, lam_px: float, rng: np.random.Generator
) -> tuple[np.ndarray, Maps]:
    """Roll each scan line (row) by a Poisson(lam_px) number of pixels with a random sign; targets move along
    (the recorded position of a feature is where the jittered line put it)."""
    shifts = rng.poisson(lam_px, image.shape[0]) * rng.choice([-1, 1], image.shape[0])

    def f(a: np.ndarray) -> np.ndarray:
        out = np.empty_like(a)
        for i, s in enumerate(shifts):
            out[i] = np.roll(a[i], int(s))
        return out

    return f(image), {n: f(t) for n, t in targets.items()}


def background(image: np.ndarray, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Add an asymmetric 2-D Gaussian hump (amplitude amp, either sign) anywhere in the frame."""
    h, w = image.shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    sy, sx = rng.uniform(0.2, 1.0) * h, rng.uniform(0.2, 1.0) * w
    yy, xx = np.mgrid[0:h, 0:w]
    hump = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    return (image + amp * rng.choice([-1.0, 1.0]) * hump).astype(np.float32)


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise of standard deviation sigma (normalised units)."""
    return (image + rng.normal(0.0, sigma, image.shape)).astype(np.float32)


def poisson_noise(image: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise: counts ~ Poisson(scale * (image - min)) mapped back (smaller scale = noisier)."""
    lo = float(image.min())
    counts = rng.poisson(np.clip(image - lo, 0, None) * scale)
    return (counts / scale + lo).astype(np.float32)


def salt_pepper(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Set a random ``fraction`` of pixels to the image's min or max."""
    out = image.copy()
    m = rng.random(image.shape) < fraction
    out[m] = np.where(rng.random(int(m.sum())) < 0.5, image.min(), image.max())
    return out


def augment(
    image: np.ndarray, targets: Maps, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, Maps]:
    """Apply the whole chain once (each transform with its probability); shapes are preserved."""
    u = lambda r: float(rng.uniform(r[0], r[1]))  # noqa: E731
    if rng.random() < cfg.p_flip_rot:
        image, targets = flip_rot(image, targets, rng)
    if rng.random() < cfg.p_zoom:
        image, targets = zoom(image, targets, u(cfg.zoom), image.shape)
    if rng.random() < cfg.p_jitter:
        image, targets = line_jitter(image, targets, u(cfg.jitter_lambda_px), rng)
    if rng.random() < cfg.p_background:
        image = background(image, u(cfg.background_amp), rng)
    if rng.random() < cfg.p_blur:
        image = cv2.GaussianBlur(image, (0, 0), u(cfg.blur_sigma_px))
    if rng.random() < cfg.p_poisson:
        image = poisson_noise(image, u(cfg.poisson_scale), rng)
    if rng.random() < cfg.p_gaussian:
        image = gaussian_noise(image, u(cfg.gaussian_sigma), rng)
    if rng.random() < cfg.p_salt_pepper:
        image = salt_pepper(image, u(cfg.salt_pepper_fraction), rng)
    if rng.random() < cfg.p_invert:
        image = (1.0 - image).astype(np.float32)
    return image.astype(np.float32), targets
