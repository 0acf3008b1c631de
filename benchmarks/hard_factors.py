"""The hard preset with one artefact group reset to realistic values at a time: atom / dimer / defect F1,
terrace ARI, site-found and false-safe sites of the networks (models/MODEL_CARD.md, session 5).

    python benchmarks/hard_factors.py N [VARIANT ...]     # 30 frames at seeds 800000+ in the card

Per variant: one JSON line of suite metrics, one of atom / defect F1 per true tip state.
"""

import json
import sys

from hard_variants import VARIANTS, config_of

from stm_feedback.config import load_settings
from stm_feedback.evaluation import evaluate_frames, simulated_frames
from stm_feedback.pipeline import Pipeline

pipe = Pipeline(load_settings())
KEYS = ("atom_f1", "dimer_f1", "defect_f1", "terrace_ari", "site_found_rate", "false_safe_sites")
n = int(sys.argv[1])
for name in sys.argv[2:] or list(VARIANTS):
    cfg = config_of(f"hard:{name}")
    result = evaluate_frames(
        simulated_frames(cfg, 800_000, n),
        lambda f: pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v),
        "hard",
        "nets",
    )
    m = result.metrics
    print(json.dumps({"variant": name, **{k: round(m[k], 4) for k in KEYS}}), flush=True)
    # the same F1s per true tip state (summed matches over that state's frames)
    by_tip: dict[str, dict[str, list[int]]] = {}
    for fr in result.frames:
        counts = by_tip.setdefault(fr["tip_state"], {"atoms": [0, 0, 0], "defects": [0, 0, 0], "frames": [0]})
        counts["frames"][0] += 1
        for kind in ("atoms", "defects"):
            for i, key in enumerate(("tp", "fp", "fn")):
                counts[kind][i] += fr[kind][key]
    f1 = lambda c: round(2 * c[0] / (2 * c[0] + c[1] + c[2]), 4) if c[0] else None  # noqa: E731
    print(
        json.dumps(
            {
                "variant": name,
                "by_tip_state": {
                    tip: {"frames": c["frames"][0], "atom_f1": f1(c["atoms"]), "defect_f1": f1(c["defects"])}
                    for tip, c in sorted(by_tip.items())
                },
            }
        ),
        flush=True,
    )
