"""Which frames the scan-line jitter correction touches, and what it does to their atoms
(models/MODEL_CARD.md, session 10; docs/performance.md).

    python benchmarks/line_jitter_frames.py PRESET FIRST_SEED N      # e.g. realistic 700000 60

Per frame whose estimate passes the gain gate (a second pass runs): the true tip state, the drawn jitter
(Poisson lambda, px), the estimate's gain, the number of proposed sites, the estimate's rms offset, whether
the corrected analysis was kept, and atom F1 without -> with the correction. Last line: frames with a second
pass and frames corrected.
"""

import dataclasses
import sys

import stm_feedback.pipeline as plm
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.metrics import score_frame

seen: dict[str, float | bool] = {}
_estimate, _merge = plm.estimate_line_jitter, plm.merge_jitter_corrected


def estimate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    r = _estimate(*args, **kwargs)
    seen.update(gain=r.gain, rms=r.rms_px)
    return r


def merge(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    seen["kept"] = True
    return _merge(*args, **kwargs)


plm.estimate_line_jitter, plm.merge_jitter_corrected = estimate, merge
on = plm.Pipeline(load_settings())
off = plm.Pipeline(
    on.settings, runner=on.runner, params=dataclasses.replace(on.params, line_jitter_correction=False)
)
second = kept = 0
preset, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for f in simulated_frames(preset, first, n):
    seen.clear()
    a = on.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    if seen.get("gain", 0.0) < on.params.line_jitter_min_gain:
        continue
    second += 1
    kept += bool(seen.get("kept"))
    b = off.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    print(
        f"{f.seed} {f.truth.tip_state} tip, jitter lambda {f.truth.params['jitter_lambda_px']:.2f} px, gain "
        f"{seen['gain']:.3f}, sites {len(a.sites)}, rms "
        f"{seen['rms']:.2f} px, kept {bool(seen.get('kept'))}, atom F1 "
        f"{score_frame(f.truth, b).atoms.f1:.3f} -> {score_frame(f.truth, a).atoms.f1:.3f}",
        flush=True,
    )
print(f"{n} frames: second pass on {second}, corrected {kept}")
