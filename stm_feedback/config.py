"""The single settings object. Sources, highest priority first: CLI flags, environment (``STM_FEEDBACK_*``,
nested with ``__``, e.g. ``STM_FEEDBACK_SERVER__BIND``), a TOML/JSON file given by ``--config`` or
``STM_FEEDBACK_CONFIG``, then these defaults. Each subsystem reads only its own section.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class ModelSettings(BaseModel):
    models_dir: Path = REPO_MODELS_DIR
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1"
    backend: Literal["auto", "torch", "openvino", "torch-eager"] = "auto"  # see stm_feedback/backends.py
    fp32_nets: list[str] = []  # nets kept in fp32 when the backend would use bf16/fp16, e.g. ["atoms"]
    # OpenVINO runs each net as its INT8 IR in <models_dir>/int8 when `stm-feedback quantize` wrote one for
    # these weights (docs/performance.md: equivalence and latency); false = bf16/fp32 as without IRs
    int8: bool = True
    threads: int = 0  # 0 = leave torch's default
    # BLAS threads of numpy/scipy in this process, set when the runner is built: 1 because OpenBLAS's idle
    # workers spin after each product and take a core from the next network inference (session 10: predict
    # p50 13 -> 20 ms after the jitter estimate's products with two BLAS threads; docs/performance.md);
    # 0 = leave the library default
    blas_threads: int = 1


class PlannerSettings(BaseModel):
    """Safe-to-write rules; defaults from ../shared/design/hsi-physics.md section 5."""

    pattern: str = "3x1"  # k adjacent dimers on one row ("3x1"), or "3x2" (2 rows x 3 dimers)
    step_margin_nm: float = 2.0
    depression_margin_nm: float = 0.8
    adatom_margin_nm: float = 1.5
    dihydride_margin_nm: float = 0.6
    unknown_margin_nm: float = 1.0
    charged_margin_along_nm: float = 0.0  # optional charged-defect exclusion (SiDB logic uses ~10 nm)
    max_sites: int = 50
    # beyond the frame is unknown: dimers keep this distance from the border. A step or an adatom cluster just
    # outside the frame is invisible (2 of 3 false-safe sites on 100 realistic frames at 0.05-0.2 nm/px were
    # such; session 5), and NN-0 also misses most steps that run within ~1.5 nm inside the border (it sees too
    # little of the far terrace): 2.0 -> 2.5 nm in session 10 after 3 false-safe sites 1.3-1.9 nm from such a
    # step (hard 800040+80 with the jitter correction, which made that frame plannable) and one at 0.05 nm/px
    # (a step 0.5 nm inside the top border); cost: site-found 0.966 -> 0.943 at 0.05-0.2 nm/px, 0.836 -> 0.782
    # at 0.05 nm/px, realistic unchanged (models/MODEL_CARD.md session 10)
    border_margin_nm: float = 2.5
    resolved_radius_nm: float = 0.6  # terrace pixels farther than this from any detected atom are unresolved
    # unlabelled protrusions at most this large AND this high are writable (DB-like); the defaults make none
    # writable: on network detections adatoms/clusters and single DBs overlap in (area, height) (docs/
    # defect-library.md), so only a classifier label (library `train`) may call a protrusion writable
    writable_max_area_cells: float = 0.0
    writable_max_height_rel: float = 0.0
    dimer_pitch_tol_nm: float = 0.1  # consecutive site dimers 0.384 +- tol nm apart along the row
    # added to every must-avoid margin (defects, steps, holes) of *detected* features: network footprints and
    # step masks come out slightly smaller than the truth (measured in docs/analysis-schema.md, planner)
    detection_pad_nm: float = 0.3
    # added to detection_pad_nm for detected steps only: NN-0 works at 0.2 nm/px and its step band can sit a
    # few tenths of a nm off the true edge (false-safe sites 0.04-0.27 nm inside the 2 nm step margin on
    # sharp-tip and fine-pixel frames; models/MODEL_CARD.md session 9)
    step_extra_pad_nm: float = 0.15
    # added to the step margin on the upper-terrace side of a detected step only: a blunt or double tip shows
    # the upper terrace wider than it is, so the true edge may lie up to the tip's reach inside it (session 8,
    # models/MODEL_CARD.md); 0 = off
    step_upper_extra_nm: float = 1.5
    # a lattice position next to a detected dimer with no detected dimer on it (a "hole": dihydrides and
    # small vacancies the defect net misses look like this) is must-avoid with this margin; < 0 = off
    hole_margin_nm: float = -1.0
    # detected atoms in no dimer and dimers with a bond longer than anomaly_max_bond_nm (dihydrides look like
    # this: the defect net misses them) are must-avoid with this margin; < 0 = off
    anomaly_margin_nm: float = 0.6
    anomaly_max_bond_nm: float = 0.27
    # where dimers of both row orientations lie within this of a pixel a step lies between them (detected or
    # not): that band keeps step_margin_nm; < 0 = off
    orientation_reach_nm: float = 2.0
    # frames whose quality check suspects a double tip get no sites and an empty safe mask (every feature is
    # imaged twice; hard suite: the last false-safe sites sat on such a frame, docs/analysis-schema.md)
    withhold_on_double_tip: bool = True
    # empty-state frames (bias > 0, or polarity estimated "empty") get no sites and an empty safe mask: at
    # positive bias a single dihydride is not resolved (hsi-physics.md: its empty-state contrast is unknown;
    # in our simulator NN-2 finds 0 % of them and a row-aligned patch classifier ~40 % at 1 % false alarms),
    # so a must-avoid defect cannot be ruled out (suite `empty`: 26 false-safe sites with this off,
    # docs/analysis-schema.md); plan from a filled-state (negative bias) image
    withhold_on_empty_state: bool = True
    # frames analysed without a bias (polarity estimated from the frame or assumed filled) get no sites and
    # an empty safe mask: the estimate takes 20 % of the `empty` suite's frames for filled-state ones (the
    # atom-map confidence ratios of the two polarities overlap: benchmarks/polarity_estimate.py), and a wrong
    # "filled" plans over invisible dihydrides (`evaluate --suite empty --no-bias`: 3 false-safe sites with
    # this off; models/MODEL_CARD.md session 7). Give the bias (file metadata, --bias-v, a sidecar) to plan
    withhold_on_unknown_polarity: bool = True
    # frames coarser than this (nm/px) get no sites and an empty safe mask: a dihydride (atoms pushed ~0.1 nm
    # apart, a dark line < 0.02 nm deep) is not resolved there. Whole safe mask against the truth
    # (benchmarks/safe_mask_violations.py realistic 870000 40 PX, session 12): at 0.1 / 0.115 / 0.125 nm/px
    # 0 / 3 / 2 frames with unsafe pixels, all 1-5 px at a margin's edge; at 0.135 / 0.15 nm/px 6 / 4 frames,
    # patches of up to 233 px over missed dihydrides and dv1. Rescan finer to plan; <= 0 switches it off
    max_plan_pixel_size_nm: float = 0.13
    # per-dimer evidence of a defect the nets did not report (planner.suspect_dimers): a detected dimer
    # with NN-2 depression probability >= suspect_depression_prob within suspect_radius_nm, or a dark row
    # centre line (robust z against its terrace's dimers >= suspect_centre_z), is must-avoid with
    # suspect_margin_nm (+ detection_pad_nm); < 0 = that test off
    suspect_depression_prob: float = 0.2
    suspect_radius_nm: float = 0.25
    suspect_centre_z: float = 3.0
    suspect_margin_nm: float = 0.8
    # pixels where NN-0's step probability reaches this are step pixels for planning (the segmentation's own
    # threshold is PostprocessParams.step_threshold); < 0 = off
    step_prob_plan: float = 0.15
    # a detected step (planning step pixels) at least this long that ends inside the frame is continued
    # straight to the border (planner.step_continuations: a step cannot end on a terrace, NN-0 lost it);
    # the continuation keeps the step margin; < 0 = off
    step_continuation_min_nm: float = 2.0


class LibrarySettings(BaseModel):
    path: Path = Path("stm-feedback-library.sqlite")
    patch_size_px: int = 24
    patch_pixel_size_nm: float = 0.125  # row-aligned patches are resampled to this (24 px = 3 nm)
    # the daemon (and `analyze --library`) record every analysed frame's defects into the library, on a
    # background writer thread; False = off
    record: bool = True
    record_queue: int = 256  # frames waiting for the writer before submit() blocks (never dropped)
    # the daemon's writer waits up to this long (s) for a moment with no analysis running before it writes
    # a frame (LibraryRecorder(idle=...)): its CPU then does not slow the next frame's analysis
    record_defer_s: float = 2.0
    # the space mean shift clusters defects in (library cluster, analyze's batch classes): "embedding" =
    # class probabilities of <models_dir>/defect_embedding.json, a small MLP per kind trained on simulator
    # truth (stm_feedback/embedding.py; protrusion ARI 0.59 -> 0.75+, docs/defect-library.md); "features" =
    # each kind's engineered feature columns (classify.KIND_FEATURES), the paper's approach
    cluster_space: Literal["embedding", "features"] = "embedding"
    # without a library cluster model, real-time analyses take their cluster ids from
    # <models_dir>/defect_clusters.json (mean shift in the embedding over its training rows) when present
    default_clusters: bool = True


class ServerSettings(BaseModel):
    bind: str = "tcp://127.0.0.1:5555"
    max_inflight: int = 8
    deadline_ms: float = 2000.0
    max_frame_px: int = 2048 * 2048
    max_message_bytes: int = 64 * 1024 * 1024
    curve_secret_key_file: Path | None = None
    curve_allowed_clients_dir: Path | None = None
    # daemon internals (owner: stm_feedback/server.py)
    analyzer: str = "stm_feedback.pipeline:Pipeline"  # "module:factory", called as factory(settings)
    workers: int = 1  # analyzer threads; 1 = one frame at a time (the nets use all cores themselves)
    max_header_bytes: int = 64 * 1024
    warmup_px: int = 128  # side of the synthetic warm-up frame; 0 = no warm-up
    latency_window: int = 1024  # samples per stage kept for the stats percentiles
    # garbage collection between frames: automatic collection off while serving, one full collection
    # after a reply when no job is queued, or after this many frames in a row (0 = automatic collection)
    gc_every_frames: int = 8


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STM_FEEDBACK_", env_nested_delimiter="__", extra="ignore")

    models: ModelSettings = Field(default_factory=ModelSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    library: LibrarySettings = Field(default_factory=LibrarySettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    # overrides of stm_feedback.postprocess.PostprocessParams fields, e.g. {"line_jitter_correction": false}
    # (env STM_FEEDBACK_POSTPROCESS as JSON); unknown names are an error when a Pipeline is built
    postprocess: dict[str, bool | int | float | None] = Field(default_factory=dict)
    log_level: str = "INFO"
    log_json: bool = False


def load_settings(path: str | os.PathLike | None = None, **overrides: object) -> Settings:
    """Settings from an optional TOML/JSON file (or ``STM_FEEDBACK_CONFIG``), env vars, then ``overrides``."""
    path = path or os.environ.get("STM_FEEDBACK_CONFIG")
    data: dict = {}
    if path:
        p = Path(path)
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    settings = Settings(**data)
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            setattr(getattr(settings, section), name, value)
        else:
            setattr(settings, section, value)
    return settings
