"""Training of the three networks on simulator frames (preset "training", seeds < 1_000_000 only).

Data: a cache of frames is simulated once (seeded, optionally 2 worker processes), each normalised per frame
at its own pixel size (0.05-0.2 nm/px drawn per frame) and resampled to the net's working pixel size, with
targets from ``stm_feedback.targets``. Steps: random crops + ``stm_feedback.augment``, Adam, cosine decay.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from stm_feedback.augment import AugmentConfig, augment
from stm_feedback.errors import InputError
from stm_feedback.nets import FILE_STEMS, NET_NAMES, NetSpec, build_net, load_model, save_model, spec_preset
from stm_feedback.preprocess import net_input, normalize_frame, resampled_shape, resize
from stm_feedback.targets import truth_to_targets

log = logging.getLogger(__name__)

MAX_TRAINING_SEED = 1_000_000  # evaluation suites use seeds >= this
SEED_BASE: dict[str, int] = {"terraces": 100_000, "atoms": 300_000, "defects": 500_000}
HELD_OUT_SEED = 950_000  # self-check frames (training range, never drawn by the cache)


DEFECT_CLASS_WEIGHTS: tuple[float, float, float] = (1.0, 4.0, 8.0)  # background, protrusion, depression


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``crop_px`` at the net's working pixel size; ``n_frames`` simulated once."""

    net: str
    steps: int = 3000
    seed: int = 0
    batch: int = 8
    crop_px: int = 64
    n_frames: int = 300
    lr: float = 2e-3
    workers: int = 2
    spec_preset: str = "default"
    pixel_size_range_nm: tuple[float, float] | None = None  # None = NATIVE_PIXEL_SIZE_NM[net]
    widths: tuple[int, ...] | None = None  # override the preset's widths
    convs_per_level: int | None = None  # override the preset's convs per U-Net level
    stem: int | None = None  # override the preset's U-Net space-to-depth stem (nets.NetSpec.stem)
    init_from: Path | None = None  # models dir whose weights (same spec) start this run (fine-tuning)
    sim_presets: tuple[str, ...] = ("training",)  # frame i of the cache uses sim_presets[i % len]
    p_axis_rows: float = 0.0  # fraction of cache frames rotated: rows along x or y (make_sample)
    defect_class_weights: tuple[float, float, float] = DEFECT_CLASS_WEIGHTS  # defects: background/prot/depr
    # knowledge distillation (issue 6: a cheaper net learning from the shipped one): the models dir of a
    # teacher of the same net, and the weight of the loss against its outputs (added to the truth loss)
    teacher_from: Path | None = None
    teacher_weight: float = 1.0


# Frame pixel sizes drawn for the cache. Atoms: the two atoms of a dimer (0.24 nm) are unresolvable in frames
# coarser than ~0.14 nm/px, so such frames would only teach the atom net to guess.
NATIVE_PIXEL_SIZE_NM: dict[str, tuple[float, float]] = {
    "terraces": (0.05, 0.2),
    "atoms": (0.05, 0.14),
    "defects": (0.05, 0.2),
}
# The simulator's training preset already has noise, jitter, blur and tips; a first run with strong extra
# noise (sigma up to 0.15) left most atom crops unresolved and the atom net did not learn (F1 0), so the
# atom net gets mild extra degradation.
AUGMENT: dict[str, AugmentConfig] = {
    "terraces": AugmentConfig(p_invert=0.5),
    "atoms": AugmentConfig(
        p_jitter=0.2,
        jitter_lambda_px=(0.0, 0.7),
        p_blur=0.1,
        blur_sigma_px=(0.3, 0.6),
        p_gaussian=0.3,
        gaussian_sigma=(0.0, 0.05),
        p_poisson=0.1,
        poisson_scale=(100.0, 300.0),
        p_salt_pepper=0.1,
        salt_pepper_fraction=(0.0, 0.003),
    ),
    "defects": AugmentConfig(),
}


@dataclass
class Sample:
    """One cached frame at the net's pixel size: normalised image, targets, and the bias sign."""

    image: np.ndarray  # (h, w) float32, normalised raw polarity
    targets: dict[str, np.ndarray]
    empty_state: bool


def frame_seeds(cfg: TrainConfig) -> range:
    """Simulator seeds of the cache: from the net's SEED_BASE, shifted by 20 000 per run seed, all < 1_000_000
    (the nets' ranges meet from run seed 10 on: atoms seed 10 starts at defects seed 0)."""
    start = SEED_BASE[cfg.net] + 20_000 * cfg.seed
    stop = start + cfg.n_frames
    if stop > MAX_TRAINING_SEED or cfg.seed < 0 or cfg.n_frames > 20_000:
        max_seed = (MAX_TRAINING_SEED - SEED_BASE[cfg.net] - cfg.n_frames) // 20_000
        raise InputError(
            f"training seeds must stay < {MAX_TRAINING_SEED} (seed {cfg.seed}, {cfg.n_frames} frames): "
            f"--seed 0..{max_seed} for the {cfg.net} net, at most 20000 frames"
        )
    return range(start, stop)


def align_rows(image: np.ndarray, maps: dict[str, np.ndarray], row_angle_deg: float, k90: int) -> tuple:
    """Rotate image and target maps (same grid) so rows at ``row_angle_deg`` (image axes, deg) run at
    ``k90`` * 90 deg, i.e. along a scan axis. Bilinear, reflected borders (targets rotate with the image)."""
    h, w = image.shape
    rot = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), row_angle_deg - 90.0 * k90, 1.0)

    def f(a: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(a, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    return f(image.astype(np.float32)), {k: f(v.astype(np.float32)) for k, v in maps.items()}


def make_sample(args: tuple[int, str, float, int, tuple[float, float], str, float]) -> Sample:
    """Simulate frame ``seed`` (simulator preset ``args[5]``) so that it covers >= 1.3 crops at the net
    pixel size, normalise, resample; with probability ``args[6]`` (atoms only) rotate it so the rows of
    its first terrace run along x or y: the simulator draws scan angles uniformly, but real scans are
    usually aligned with the rows, where rows also parallel the scan-line artefacts."""
    from simulator.frame import SimConfig, simulate_frame

    seed, net, net_px_nm, crop_px, px_range, sim_preset, p_axis_rows = args
    rng = np.random.default_rng(seed)
    native_px = float(rng.uniform(*px_range))
    side = int(math.ceil(1.3 * crop_px * net_px_nm / native_px))
    f = simulate_frame(seed, size_px=side, pixel_size_nm=native_px, config=SimConfig.preset(sim_preset))
    norm = normalize_frame(f.image_nm, native_px)
    shape = resampled_shape(norm.shape, native_px, net_px_nm)
    t = truth_to_targets(f.truth, net_px_nm)
    targets = {"terraces": {"step": t.step}, "atoms": {"atoms": t.atoms}, "defects": {"cls": t.defect_class}}
    image, tg = resize(norm, shape), targets[net]
    if net == "atoms" and f.truth.terraces and rng.random() < p_axis_rows:
        image, tg = align_rows(image, tg, f.truth.terraces[0].row_angle_deg, int(rng.integers(2)))
    return Sample(image, tg, f.bias_v > 0)


def build_cache(cfg: TrainConfig, spec: NetSpec) -> list[Sample]:
    """Simulate the cache (tqdm progress; ``cfg.workers`` > 1 uses a process pool)."""
    px_range = cfg.pixel_size_range_nm or NATIVE_PIXEL_SIZE_NM[cfg.net]
    if not cfg.sim_presets:
        raise InputError("sim_presets must name at least one simulator preset")
    presets = cfg.sim_presets
    jobs = [
        (s, cfg.net, spec.pixel_size_nm, cfg.crop_px, px_range, presets[i % len(presets)], cfg.p_axis_rows)
        for i, s in enumerate(frame_seeds(cfg))
    ]
    desc = f"simulating {cfg.net} frames"
    if cfg.workers > 1:
        with get_context("spawn").Pool(cfg.workers) as pool:
            return list(tqdm(pool.imap(make_sample, jobs, chunksize=4), total=len(jobs), desc=desc))
    return [make_sample(j) for j in tqdm(jobs, desc=desc)]


def _crop(a: np.ndarray, y: int, x: int, n: int) -> np.ndarray:
    return a[y : y + n, x : x + n]


def make_batch(
    cache: list[Sample], spec: NetSpec, cfg: TrainConfig, rng: np.random.Generator, aug: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, n, n) inputs and targets ((B, 1, n, n) float or (B, n, n) long) from random crops."""
    n = cfg.crop_px
    xs, ys = [], []
    hp_px = spec.highpass_sigma_nm / spec.pixel_size_nm
    for _ in range(cfg.batch):
        smp = cache[int(rng.integers(len(cache)))]
        img, tg = smp.image, smp.targets
        h, w = img.shape
        if h < n or w < n:  # rare: rounding left the frame a little small
            ph, pw = max(0, n - h), max(0, n - w)
            img = np.pad(img, ((0, ph), (0, pw)), mode="reflect")
            tg = {k: np.pad(v, ((0, ph), (0, pw)), mode="reflect") for k, v in tg.items()}
            h, w = img.shape
        y, x = int(rng.integers(h - n + 1)), int(rng.integers(w - n + 1))
        ci = _crop(img, y, x, n).copy()
        ct = {k: _crop(v, y, x, n) for k, v in tg.items()}
        # polarity: "rows_bright" nets see corrected frames when the bias is known (half the time) and raw
        # frames (either polarity) when it is not; "raw" nets always see the raw frame
        if spec.polarity == "rows_bright" and smp.empty_state and rng.random() < 0.5:
            ci = 1.0 - ci
        ci, ct = augment(ci, ct, rng, aug)
        xs.append(net_input(ci, hp_px))
        ys.append(next(iter(ct.values())))
    x_t = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
    y_np = np.stack(ys)
    y_t = (
        torch.from_numpy(y_np.astype(np.int64))
        if spec.out_channels > 1
        else torch.from_numpy(y_np[:, None].astype(np.float32))
    )
    return x_t, y_t


def loss_fn(
    spec: NetSpec,
    logits: torch.Tensor,
    target: torch.Tensor,
    defect_class_weights: tuple[float, float, float] = DEFECT_CLASS_WEIGHTS,
) -> torch.Tensor:
    """Terraces: BCE (step pixels weighted 3x); atoms: BCE on the soft Gaussian map, weighted 1 + 9 * target
    (atoms are a small fraction of pixels); defects: cross-entropy with class weights (default 1/4/8)."""
    if spec.name == "defects":
        # depressions weigh more: faint dihydrides (-0.02..-0.05 nm) were missed at equal weights
        return F.cross_entropy(logits, target, weight=torch.tensor(defect_class_weights, dtype=torch.float32))
    weight = 1.0 + (2.0 if spec.name == "terraces" else 9.0) * target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight)


def distill_loss(spec: NetSpec, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Loss of the student's logits against a teacher's on the same batch: BCE against the teacher's
    probabilities (terraces, atoms; weighted like ``loss_fn`` by 1 + 9 * p for atoms, whose peaks are a small
    fraction of the pixels) or cross-entropy against its softmax (defects)."""
    if spec.name == "defects":
        return F.cross_entropy(logits, F.softmax(teacher_logits, dim=1))
    p = torch.sigmoid(teacher_logits)
    weight = 1.0 + (2.0 if spec.name == "terraces" else 9.0) * p
    return F.binary_cross_entropy_with_logits(logits, p, weight=weight)


def train(
    cfg: TrainConfig, out_dir: Path | None, cache: list[Sample] | None = None, progress: bool = True
) -> tuple[nn.Module, NetSpec, dict]:
    """Train net ``cfg.net``; writes models/<stem>.pt/.json to out_dir (None = do not save). Returns the
    trained net (eval mode), its spec and a summary dict (losses, times)."""
    if cfg.net not in NET_NAMES:
        raise InputError(f"unknown net {cfg.net!r}; choose one of {NET_NAMES}")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.crop_px < 16 or cfg.crop_px % (8 * (cfg.stem or 1)):
        raise InputError("steps and batch must be >= 1, crop_px a multiple of 8 * stem and >= 16")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    spec = spec_preset(cfg.net, cfg.spec_preset)
    if cfg.widths is not None:
        spec = replace(spec, widths=tuple(cfg.widths))
    if cfg.convs_per_level is not None:
        spec = replace(spec, convs_per_level=int(cfg.convs_per_level))
    if cfg.stem is not None:
        spec = replace(spec, stem=int(cfg.stem))
    t0 = time.time()
    if cache is None:
        cache = build_cache(cfg, spec)
    t_data = time.time() - t0
    net = build_net(spec)
    if cfg.init_from is not None:
        prev, prev_spec = load_model(Path(cfg.init_from), cfg.net)
        spec = replace(prev_spec, training={}, version="untrained")
        net = prev
    net = net.train().to(memory_format=torch.channels_last)  # ~2x faster convs on CPU
    teacher = None
    if cfg.teacher_from is not None:
        teacher, t_spec = load_model(Path(cfg.teacher_from), cfg.net)
        if (t_spec.pixel_size_nm, t_spec.highpass_sigma_nm) != (spec.pixel_size_nm, spec.highpass_sigma_nm):
            raise InputError(
                f"teacher {t_spec.version} sees its input at {t_spec.pixel_size_nm} nm/px, high-pass "
                f"{t_spec.highpass_sigma_nm} nm; student {spec.pixel_size_nm}, {spec.highpass_sigma_nm}"
            )
        teacher = teacher.eval().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    aug = AUGMENT[cfg.net]
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"training {cfg.net}", disable=not progress)
    for _ in bar:
        x, y = make_batch(cache, spec, cfg, rng, aug)
        x = x.contiguous(memory_format=torch.channels_last)
        logits = net(x)
        loss = loss_fn(spec, logits, y, cfg.defect_class_weights)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = loss + cfg.teacher_weight * distill_loss(spec, logits, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    t_total = time.time() - t0
    net.eval()
    seeds = frame_seeds(cfg)
    summary = {
        "seed": cfg.seed,
        "steps": cfg.steps,
        "batch": cfg.batch,
        "crop_px": cfg.crop_px,
        "lr": cfg.lr,
        "n_frames": cfg.n_frames,
        "init_from": None if cfg.init_from is None else str(cfg.init_from),
        "teacher_from": None if cfg.teacher_from is None else str(cfg.teacher_from),
        "teacher_weight": cfg.teacher_weight if cfg.teacher_from is not None else None,
        "frame_seeds": [seeds.start, seeds.stop],
        "simulator_preset": ",".join(cfg.sim_presets),
        "p_axis_rows": cfg.p_axis_rows,
        "frame_pixel_size_nm": list(cfg.pixel_size_range_nm or NATIVE_PIXEL_SIZE_NM[cfg.net]),
        "augment": asdict(aug),
        "data_time_s": round(t_data, 1),
        "total_time_s": round(t_total, 1),
        "final_loss": float(np.mean(losses[-100:])),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    date = datetime.now(timezone.utc).strftime("%Y%m%d")
    spec = replace(spec, version=f"{FILE_STEMS[cfg.net]}-{date}-s{cfg.seed}-{cfg.steps}", training=summary)
    if out_dir is not None:
        save_model(net, spec, Path(out_dir))
    return net, spec, summary


# ----------------------------------------------------------------------------------------------------------
# quick self-check (the official evaluation is `stm-feedback evaluate`)


def atom_peaks(atom_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(N, 2) (x_px, y_px) of local maxima (3x3) above threshold, refined by the 3x3 centre of mass."""
    mx = ndimage.maximum_filter(atom_prob, size=3, mode="constant")
    ys, xs = np.nonzero((atom_prob == mx) & (atom_prob > threshold))
    if len(xs) == 0:
        return np.zeros((0, 2))
    p = np.pad(atom_prob, 1)
    d = np.array([-1, 0, 1])
    win = np.stack([np.stack([p[ys + 1 + dy, xs + 1 + dx] for dx in d], 1) for dy in d], 1)  # (N, 3, 3)
    wsum = win.sum((1, 2))
    ox = (win.sum(1) * d).sum(1) / wsum
    oy = (win.sum(2) * d).sum(1) / wsum
    return np.stack([xs + ox, ys + oy], 1)


def self_check_atoms(
    net: nn.Module,
    spec: NetSpec,
    n_frames: int = 4,
    size_px: int = 192,
    preset: str = "realistic",
    bias_known: bool = True,
    threshold: float = 0.5,
) -> dict:
    """Atom F1 / RMSE at 0.10 nm (metrics.score_matching, evaluation exclusion rules) on held-out
    training-range frames (seeds from 950_000) of simulator preset ``preset``, using this net alone."""
    from simulator.frame import SimConfig, simulate_frame
    from stm_feedback.metrics import MatchCounts, near_border, on_mask, score_matching
    from stm_feedback.runner import ModelRunner, atom_map_confidence

    runner = ModelRunner({spec.name: (net, spec)}, device="cpu", require_all=False)
    total = MatchCounts(0, 0, 0, 0.0)
    for i in range(n_frames):
        f = simulate_frame(HELD_OUT_SEED + i, size_px, None, SimConfig.preset(preset))
        tr, s = f.truth, f.truth.pixel_size_nm
        norm = normalize_frame(f.image_nm, s)
        invert = bias_known and f.bias_v > 0
        prob = runner.net_on_frame("atoms", norm, s, invert)[0]
        if not bias_known:  # as ModelRunner.predict: keep the more confident polarity
            prob_inv = runner.net_on_frame("atoms", norm, s, True)[0]
            if atom_map_confidence(prob_inv) > atom_map_confidence(prob):
                prob = prob_inv
        pred = atom_peaks(prob, threshold)
        t_ex = ~np.asarray(tr.atom_resolved, bool) | near_border(tr.atoms_xy_px, size_px, size_px, 0.3, s)
        p_ex = near_border(pred, size_px, size_px, 0.3, s) | on_mask(pred, tr.unresolved_mask)
        c, _, _ = score_matching(tr.atoms_xy_px, pred, 0.10, s, t_ex, p_ex)
        total = total + c
    return {
        "atom_f1": total.f1,
        "precision": total.precision,
        "recall": total.recall,
        "rmse_nm": total.rmse_nm,
        "frames": n_frames,
        "preset": preset,
        "bias_known": bias_known,
        "threshold": threshold,
    }


# ----------------------------------------------------------------------------------------------------------
# threshold calibration of the post-processing (training-range seeds only; the suites are never used)

CALIB_SEED = 960_000  # calibration frames: training range, disjoint from caches and self-check
CALIB_GRID: dict[str, tuple[float, ...]] = {
    "atom_threshold": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5),
    "defect_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "depression_threshold": (0.5, 0.6, 0.7, 0.8, 0.9),  # depressions alone (protrusions at defect_threshold)
    "step_threshold": (0.15, 0.2, 0.25, 0.3, 0.4, 0.5),
}
CALIB_PLATEAU = 0.01  # objective values this close to the best count as equally good
# the metrics each threshold is chosen for (mean over the calibration presets)
CALIB_OBJECTIVE: dict[str, tuple[str, ...]] = {
    "atom_threshold": ("atom_f1", "dimer_f1"),
    "defect_threshold": ("defect_f1",),
    "depression_threshold": ("defect_f1",),
    "step_threshold": ("terrace_ari",),
}


def calibrate_thresholds(
    models_dir: Path,
    n_frames: int = 6,
    size_px: int = 256,
    presets: tuple[str, ...] = ("realistic", "hard"),
    grid: dict[str, tuple[float, ...]] | None = None,
) -> dict:
    """Sweep each PostprocessParams threshold in ``grid`` (others at their defaults) with the full
    post-processing on the maps of ``models_dir``'s nets, on simulator frames of each preset (seeds
    CALIB_SEED + i, < 1_000_000, bias given). Returns per threshold the table of objective values and the
    value maximising the mean of CALIB_OBJECTIVE over presets."""
    from simulator.frame import SimConfig, simulate_frame
    from stm_feedback.config import load_settings
    from stm_feedback.evaluation import aggregate
    from stm_feedback.metrics import score_frame
    from stm_feedback.pipeline import postprocess_maps
    from stm_feedback.postprocess import PostprocessParams
    from stm_feedback.runner import ModelRunner

    grid = grid or CALIB_GRID
    unknown = set(grid) - set(CALIB_OBJECTIVE)
    if unknown or n_frames < 1:
        raise InputError(f"calibration: unknown thresholds {sorted(unknown)} or n_frames < 1")
    settings = load_settings()
    runner = ModelRunner.from_dir(Path(models_dir))
    cached = []  # (preset, image, maps, pixel size, bias, truth)
    for preset in presets:
        cfg = SimConfig.preset(preset)
        for i in range(n_frames):
            f = simulate_frame(CALIB_SEED + i, size_px, None, cfg)
            s = float(f.truth.pixel_size_nm)
            maps = runner.predict(f.image_nm, s, bias_v=f.bias_v)
            cached.append((preset, f.image_nm, maps, s, f.bias_v, f.truth))
    base = PostprocessParams()
    out: dict = {"seeds": [CALIB_SEED, CALIB_SEED + n_frames], "presets": list(presets), "size_px": size_px}
    for name, values in grid.items():
        rows = []
        for v in values:
            params = replace(base, **{name: float(v)})
            per_preset: dict[str, dict[str, float]] = {}
            for preset in presets:
                scores = [
                    score_frame(tr, postprocess_maps(img, m, s, b, None, settings, params))
                    for p, img, m, s, b, tr in cached
                    if p == preset
                ]
                agg = aggregate(scores)
                per_preset[preset] = {k: float(agg[k]) for k in CALIB_OBJECTIVE[name]}
            vals = [x for d in per_preset.values() for x in d.values() if not math.isnan(x)]
            objective = float(np.mean(vals)) if vals else float("nan")
            rows.append({"value": float(v), "objective": objective, **per_preset})
        best = max(rows, key=lambda r: -1.0 if math.isnan(r["objective"]) else r["objective"])
        # recommended: the middle of the values within CALIB_PLATEAU of the best (robust to the few frames)
        near = [r["value"] for r in rows if r["objective"] >= best["objective"] - CALIB_PLATEAU]
        out[name] = {"best": best["value"], "recommended": near[len(near) // 2], "table": rows}
    return out
