"""Score the networks on an evaluation suite for several values of one ``PostprocessParams`` field.

    python benchmarks/sweep_postprocess.py SUITE N PARAM VALUE [VALUE ...]
    python benchmarks/sweep_postprocess.py SUITE N PARAM VALUE ... --preset P --first-seed S

(the second form scores simulator preset P at seeds S.. instead of the suite's frames, with SUITE's targets:
training-range seeds < 1_000_000 are the ones to choose defaults on; P may be ``hard:VARIANT``,
``benchmarks/hard_variants.py``)

e.g. ``realistic 30 partner_min_prob -1 0.15 0.3`` or ``clean 20 drop_atoms_in_depressions false true``;
weights from ``STM_FEEDBACK_MODELS__MODELS_DIR`` (default models/). Prints one JSON line of the suite metrics
(atoms, dimers, defects, terraces, sites) per value. The suites are for reporting: choose defaults on
training-range seeds (``stm-feedback nets-calibrate``) where possible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from hard_variants import config_of

from stm_feedback import postprocess as pp
from stm_feedback.config import load_settings
from stm_feedback.evaluation import evaluate, evaluate_frames, simulated_frames
from stm_feedback.pipeline import Pipeline

KEYS = ("atom_", "dimer_f1", "defect_", "terrace_ari", "angle_err", "site", "false_safe")


def parse_value(field: dataclasses.Field, text: str) -> object:
    """The command-line text as the field's type (bool: true/false; None: none)."""
    if text.lower() == "none":
        return None
    if "bool" in str(field.type):
        return text.lower() in ("1", "true", "yes", "on")
    if "int" in str(field.type) and "float" not in str(field.type):
        return int(text)
    return float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("n", type=int)
    ap.add_argument("param")
    ap.add_argument("values", nargs="+")
    ap.add_argument("--preset", help="simulator preset instead of the suite's frames")
    ap.add_argument("--first-seed", type=int, default=700_000, help="first seed with --preset")
    args = ap.parse_args()
    fields = {f.name: f for f in dataclasses.fields(pp.PostprocessParams)}
    if args.param not in fields:
        ap.error(f"unknown PostprocessParams field {args.param!r}")
    pipe = Pipeline(load_settings())

    def analyze(image, pixel_size_nm, bias_v=None):  # noqa: ANN001, ANN202
        return pipe.analyze(image, pixel_size_nm, bias_v=bias_v)

    for text in args.values:
        value = parse_value(fields[args.param], text)
        pipe.params = pp.PostprocessParams(**{args.param: value})
        if args.preset:
            m = evaluate_frames(
                simulated_frames(config_of(args.preset), args.first_seed, args.n),
                lambda f: analyze(f.image_nm, f.pixel_size_nm, f.bias_v),
                args.suite,
                "nets",
            ).metrics
        else:
            m = evaluate(args.suite, analyze, "nets", args.n).metrics
        row = {k: round(v, 4) for k, v in m.items() if k.startswith(KEYS)}
        src = {"preset": args.preset, "first_seed": args.first_seed} if args.preset else {"suite": args.suite}
        print(json.dumps({**src, args.param: value, **row}), flush=True)


if __name__ == "__main__":
    main()
