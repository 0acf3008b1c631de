"""OpenVINO options for the three nets at 256 px, timed in wall and process CPU time, interleaved (issue 6).

Each configuration compiles the shipped nets (models/) for the bench's 256 px frame shapes (terraces 128,
atoms 256, defects 172 px) and times one frame's three inferences (``seq``: one after the other, as
``ModelRunner.predict`` does; ``par``: the atoms net started asynchronously while the other two run on the
calling thread). Configurations are interleaved in rounds so load changes hit them alike; every output is
checked to be bit-identical to the first configuration's.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_nets.py --rounds 5 --frames 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

BF16 = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
CONFIGS: dict[str, tuple[str, dict[str, dict[str, object]]]] = {
    # name: (seq|par, per-net extra options {net: {...}}, "*" = all nets)
    "current (2 threads, seq)": ("seq", {"*": {}}),
    "2 threads pinned, seq": ("seq", {"*": {"INFERENCE_NUM_THREADS": 2, "ENABLE_CPU_PINNING": True}}),
    "no pinning, seq": ("seq", {"*": {"ENABLE_CPU_PINNING": False}}),
    "1 thread, seq": ("seq", {"*": {"INFERENCE_NUM_THREADS": 1}}),
    "small nets 1 thread, seq": (
        "seq",
        {"*": {}, "terraces": {"INFERENCE_NUM_THREADS": 1}, "defects": {"INFERENCE_NUM_THREADS": 1}},
    ),
    "atoms 1 thread || small nets 1 thread": ("par", {"*": {"INFERENCE_NUM_THREADS": 1}}),
    "atoms 2 threads || small nets 1 thread": (
        "par",
        {"*": {"INFERENCE_NUM_THREADS": 1}, "atoms": {"INFERENCE_NUM_THREADS": 2}},
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=20, help="timed frames per configuration and round")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--only", default="", help="comma-separated configuration numbers (0-based)")
    ap.add_argument(
        "--share-ab",
        action="store_true",
        help="instead: the current config's infer with and without share_inputs (calling-thread CPU)",
    )
    args = ap.parse_args()
    if args.share_ab:
        share_ab(args.models_dir, args.rounds, args.frames)
        return

    import openvino as ov

    from stm_feedback.backends import WithActivation, _convert_cached, module_fingerprint
    from stm_feedback.benchmark import simulated_frames
    from stm_feedback.preprocess import net_input, normalize_frame, pad_to_multiple, resampled_shape, resize
    from stm_feedback.runner import ModelRunner

    runner = ModelRunner.from_dir(args.models_dir, device="cpu", backend="torch-eager")
    frame = next(iter(simulated_frames(1, 256, 2_000_000, preset="realistic")))
    norm = normalize_frame(frame.image_nm.astype(np.float32), frame.pixel_size_nm)
    inputs, models = {}, {}
    core = ov.Core()
    for n, spec in runner.specs.items():
        x = resize(norm, resampled_shape(norm.shape, frame.pixel_size_nm, spec.pixel_size_nm))
        x, _ = pad_to_multiple(net_input(x, spec.highpass_sigma_nm / spec.pixel_size_nm), spec.pool_multiple)
        inputs[n] = np.ascontiguousarray(x, np.float32)[None, None]
        wrapped = WithActivation(runner.modules[n], spec.out_channels).eval().float()
        models[n] = _convert_cached(
            ov, wrapped, module_fingerprint(wrapped, spec.out_channels, ov.__version__)
        )
    names = list(CONFIGS)
    if args.only:
        names = [names[int(i)] for i in args.only.split(",")]
    requests = {}
    for c in names:
        mode, opts = CONFIGS[c]
        for n, m in models.items():
            m = m.clone()
            m.reshape(list(inputs[n].shape))
            cfg = {**BF16, **opts.get("*", {}), **opts.get(n, {})}
            requests[c, n] = core.compile_model(m, "CPU", cfg).create_infer_request()

    def one_frame(c: str) -> dict[str, np.ndarray]:
        mode = CONFIGS[c][0]
        out = {}
        if mode == "par":
            atoms = requests[c, "atoms"]
            atoms.start_async({0: inputs["atoms"]})
            for n in ("terraces", "defects"):
                requests[c, n].infer({0: inputs[n]})
                out[n] = np.array(requests[c, n].get_output_tensor(0).data[0])
            atoms.wait()
            out["atoms"] = np.array(atoms.get_output_tensor(0).data[0])
        else:
            for n in ("terraces", "atoms", "defects"):
                requests[c, n].infer({0: inputs[n]})
                out[n] = np.array(requests[c, n].get_output_tensor(0).data[0])
        return out

    ref = one_frame(names[0])
    wall: dict[str, list[float]] = {c: [] for c in names}
    cpu: dict[str, list[float]] = {c: [] for c in names}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for c in names:
            for i in range(args.frames + 3):
                t0, c0 = time.perf_counter(), time.process_time()
                out = one_frame(c)
                c1, t1 = time.process_time(), time.perf_counter()
                if i >= 3:
                    wall[c].append((t1 - t0) * 1e3)
                    cpu[c].append((c1 - c0) * 1e3)
            for n in out:
                if not np.array_equal(out[n], ref[n]):
                    print(f"  {c}: {n} differs from {names[0]} by {np.abs(out[n] - ref[n]).max():.3g}")
    print(f"load {load0:.2f} -> {os.getloadavg()[0]:.2f}; {args.rounds} rounds x {args.frames} frames")
    print("| configuration | wall p50 / p95 ms | process CPU p50 ms |")
    print("|---|---|---|")
    for c in names:
        w50, w95, c50 = statistics.median(wall[c]), np.percentile(wall[c], 95), statistics.median(cpu[c])
        print(f"| {c} | {w50:.1f} / {w95:.1f} | {c50:.1f} |")


def share_ab(models_dir: str, rounds: int, frames: int) -> None:
    """``infer`` with ``share_inputs`` False / True alternately on the runner's own requests (random input
    of each net's 256 px-frame shape): median over rounds of the per-round median calling-thread CPU and
    wall ms; outputs checked bit-identical."""
    from stm_feedback.runner import ModelRunner

    runner = ModelRunner.from_dir(models_dir, device="cpu", backend="openvino")
    rng = np.random.default_rng(0)
    print(f"load {os.getloadavg()[0]:.2f}; {rounds} rounds x {frames} calls")
    for name, shape in {"terraces": (128, 128), "atoms": (256, 256), "defects": (172, 172)}.items():
        x = rng.random(shape).astype(np.float32)[None, None]
        request = runner.engines[name]._cache.get(shape)
        ref = None
        res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(rounds):
            for share in (False, True):
                cpu_ms, wall_ms = [], []
                for _ in range(frames):
                    c0, w0 = time.thread_time(), time.perf_counter()
                    request.infer({0: x}, share_inputs=share)
                    cpu_ms.append((time.thread_time() - c0) * 1e3)
                    wall_ms.append((time.perf_counter() - w0) * 1e3)
                    out = np.array(request.get_output_tensor(0).data[0])
                    ref = out if ref is None else ref
                    assert np.array_equal(out, ref), "outputs differ"
                res[share].append((statistics.median(cpu_ms), statistics.median(wall_ms)))
        for share, v in res.items():
            cpu = statistics.median(a for a, _ in v)
            wall = statistics.median(b for _, b in v)
            print(f"{name:9s} share_inputs={share!s:5s} calling-thread CPU {cpu:.3f} ms, wall {wall:.3f} ms")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
