"""Speed benchmark of the whole analysis (``stm-feedback bench``): per-stage and end-to-end latency of
simulated frames in-process and through the daemon, throughput, and the paper's nets in eager fp32.

All times are wall-clock milliseconds (``*_ms``) unless named ``cpu_ms`` (process CPU time, all threads):
the machine may be shared, so every measurement also records the 1-minute load average before and after.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stm_feedback.errors import InputError

PERCENTILES: tuple[int, ...] = (50, 95, 99)
NET_STAGE_PREFIX = "net:"


# ------------------------------------------------------------------------------------------- statistics


def summarize_ms(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max (ms) and n of latency samples (ms); InputError when empty."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise InputError("no latency samples to summarize")
    out = {f"p{p}_ms": round(float(np.percentile(a, p)), 3) for p in PERCENTILES}
    out["mean_ms"] = round(float(a.mean()), 3)
    out["max_ms"] = round(float(a.max()), 3)
    out["n"] = int(a.size)
    return out


def load_average() -> float:
    """1-minute load average (runnable processes; compare with the core count)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, the CPU flags that matter for inference, library versions, load."""
    import torch

    from stm_feedback.backends import cpu_flags

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    return {
        "cpu": model,
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": [f for f in wanted if f in cpu_flags()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "openvino": ov_version,
        "cuda": torch.cuda.is_available(),
        "load_1min": load_average(),
        "hostname": socket.gethostname(),
    }


# ----------------------------------------------------------------------------------------------- frames


@dataclass
class BenchFrame:
    """One simulated frame: apparent heights (nm), pixel size (nm/px), bias (V)."""

    image_nm: np.ndarray
    pixel_size_nm: float
    bias_v: float


def simulated_frames(
    n: int, size_px: int, seed0: int = 2_000_000, preset: str = "realistic"
) -> list[BenchFrame]:
    """n simulator frames of size_px^2 at 0.1 nm/px (seeds seed0 .. seed0 + n - 1)."""
    from simulator.frame import SimConfig, simulate_frame

    if n < 1 or size_px < 16:
        raise InputError(f"need n >= 1 frames of >= 16 px, got n={n}, size_px={size_px}")
    cfg = SimConfig.preset(preset)
    out = []
    for i in range(n):
        f = simulate_frame(seed0 + i, size_px, 0.1, cfg)
        out.append(BenchFrame(f.image_nm, f.pixel_size_nm, f.bias_v))
    return out


def cycle(frames: Sequence[BenchFrame], n: int) -> Iterable[BenchFrame]:
    """n frames, reusing ``frames`` in order when there are fewer."""
    return (frames[i % len(frames)] for i in range(n))


# -------------------------------------------------------------------------------------- stage timing


class _TimedEngine:
    """Wraps one backend engine and records the wall time (ms) of each call."""

    def __init__(self, engine: Callable[[np.ndarray], np.ndarray]) -> None:
        self.engine = engine
        self.calls_ms: list[float] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        y = self.engine(x)
        self.calls_ms.append((time.perf_counter() - t) * 1e3)
        return y


@dataclass
class StageSamples:
    """Per-frame samples (ms) of every stage, the end-to-end wall time and process CPU time."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    end_to_end_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def add(self, name: str, ms: float) -> None:
        self.stages.setdefault(name, []).append(ms)

    def summary(self) -> dict[str, Any]:
        return {
            "stages": {k: summarize_ms(v) for k, v in self.stages.items()},
            "end_to_end": summarize_ms(self.end_to_end_ms),
            "cpu": summarize_ms(self.cpu_ms),
        }


def bench_pipeline(pipe: Any, frames: Sequence[BenchFrame], n: int, warmup: int) -> dict[str, Any]:
    """Whole in-process analysis (``pipe.analyze``) of n frames after ``warmup`` untimed ones.

    Stages: "preprocess" (levelling, resampling, high-pass, polarity: networks time minus the nets),
    "net:<name>" (one backend engine call), then the post-processing stages of ``Analysis.timings_ms``.
    After the warm-up the heap is frozen (``server.freeze_heap``, as the daemon does after its warm-up):
    otherwise a full garbage collection over all the objects of the loaded libraries lands in some frame.
    """
    from stm_feedback.server import freeze_heap

    runner = pipe.runner
    originals = dict(runner.engines)
    timed = {k: _TimedEngine(e) for k, e in originals.items()}
    runner.engines.update(timed)
    samples = StageSamples()
    load0 = load_average()
    try:
        for i, f in enumerate(cycle(frames, warmup + n)):
            if i == warmup:
                freeze_heap()
            for t in timed.values():
                t.calls_ms.clear()
            c0, t0 = time.process_time(), time.perf_counter()
            a = pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
            wall_ms = (time.perf_counter() - t0) * 1e3
            cpu_ms = (time.process_time() - c0) * 1e3
            if i < warmup:
                continue
            samples.end_to_end_ms.append(wall_ms)
            samples.cpu_ms.append(cpu_ms)
            nets_ms = 0.0
            for name, t in timed.items():
                ms = sum(t.calls_ms)
                nets_ms += ms
                samples.add(NET_STAGE_PREFIX + name, ms)
            tm = dict(a.timings_ms)
            samples.add("preprocess", max(0.0, tm.pop("networks", nets_ms) - nets_ms))
            tm.pop("total", None)
            for k, v in tm.items():
                samples.add(k, float(v))
    finally:
        runner.engines.update(originals)
    return {
        **samples.summary(),
        "frames": n,
        "warmup": warmup,
        "load_before": load0,
        "load_after": load_average(),
    }


def bench_predict(runner: Any, frames: Sequence[BenchFrame], n: int, warmup: int) -> dict[str, Any]:
    """``runner.predict`` only (all three nets + their pre-processing) on n frames after warm-up."""
    ms: list[float] = []
    load0 = load_average()
    for i, f in enumerate(cycle(frames, warmup + n)):
        t0 = time.perf_counter()
        runner.predict(f.image_nm, f.pixel_size_nm, f.bias_v)
        if i >= warmup:
            ms.append((time.perf_counter() - t0) * 1e3)
    return {"predict": summarize_ms(ms), "load_before": load0, "load_after": load_average()}


def throughput(pipe: Any, frames: Sequence[BenchFrame], n: int) -> dict[str, float]:
    """Archive mode: n frames analysed back to back (no waiting between frames); frames/s."""
    load0 = load_average()
    t0 = time.perf_counter()
    for f in cycle(frames, n):
        pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    dt = time.perf_counter() - t0
    return {"frames": n, "frames_per_s": round(n / dt, 2), "load_before": load0, "load_after": load_average()}


# --------------------------------------------------------------------------------------------- daemon


def free_tcp_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size (MiB) of process pid from /proc (NaN where unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return float("nan")


# the daemon's own reply timings (docs/protocol.md): the work around the analysis on the reply path
DAEMON_STAGES: tuple[str, ...] = ("decode", "queue", "analyze", "state", "encode")


def bench_daemon(
    frames: Sequence[BenchFrame],
    n: int,
    warmup: int,
    env: dict[str, str],
    ready_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Start ``stm-feedback serve`` as a subprocess on 127.0.0.1, time spawn -> ``ready``, then n analyze
    round trips (no maps returned) after warm-up; daemon RSS (MiB) at the end. ``env``: extra environment
    (STM_FEEDBACK_* settings). The subprocess is always terminated."""
    from stm_feedback.client import Client

    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    cmd = [sys.executable, "-m", "stm_feedback.cli", "serve", "--bind", endpoint]
    log = tempfile.NamedTemporaryFile("w+", prefix="stm-feedback-bench-serve-", suffix=".log", delete=False)
    t_spawn = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    client = Client(endpoint, timeout_ms=500, retries=0)
    try:
        cold_s = _wait_ready(proc, client, t_spawn, ready_timeout_s, Path(log.name))
        client.timeout_ms = 60_000
        models = client.models()
        wall: list[float] = []
        server_ms: list[float] = []
        stages: dict[str, list[float]] = {}
        load0 = load_average()
        for i, f in enumerate(cycle(frames, warmup + n)):
            t0 = time.perf_counter()
            client.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v, with_maps=False)
            ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                wall.append(ms)
                tm = client.last_reply.get("timings_ms", {})
                total = tm.get("total")
                if total is not None:
                    server_ms.append(float(total))
                for k in DAEMON_STAGES:
                    if k in tm:
                        stages.setdefault(k, []).append(float(tm[k]))
        out: dict[str, Any] = {
            "round_trip": summarize_ms(wall),
            "cold_start_to_ready_s": round(cold_s, 2),
            "rss_mb": rss_mb(proc.pid),
            "backend": models.get("backend"),
            "device": models.get("device"),
            "versions": models.get("versions"),
            "frames": n,
            "warmup": warmup,
            "load_before": load0,
            "load_after": load_average(),
            "log": log.name,
        }
        if server_ms:
            out["server_total"] = summarize_ms(server_ms)
        if stages:
            out["server_stages"] = {k: summarize_ms(v) for k, v in stages.items()}
        return out
    finally:
        stop_daemon(proc, client, log)


def stop_daemon(proc: subprocess.Popen, client: Any, log: Any) -> None:
    """Close the client, terminate the ``serve`` subprocess (kill it after 30 s) and close its log file."""
    client.close()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _wait_ready(proc: subprocess.Popen, client: Any, t_spawn: float, timeout_s: float, log: Path) -> float:
    """Seconds from spawn until the daemon answers ``ready`` = true; RuntimeError if it dies or times out."""
    from stm_feedback.errors import ServerUnavailable

    while time.perf_counter() - t_spawn < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}; log: {log}\n{log.read_text()[-2000:]}")
        try:
            if client.ready():
                return time.perf_counter() - t_spawn
        except ServerUnavailable:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"daemon not ready after {timeout_s} s; log: {log}")


# ----------------------------------------------------------------------------------- architectures


def bench_net_latency(
    spec: Any,
    backend: str,
    frame_px: int = 256,
    frame_pixel_nm: float = 0.1,
    n: int = 30,
    warmup: int = 3,
    threads: int = 0,
) -> dict[str, Any]:
    """Latency (ms) of one randomly initialised net of ``spec`` (a nets.NetSpec) on the input it gets for a
    frame_px^2 frame at frame_pixel_nm (resampled to spec.pixel_size_nm, padded), with ``backend``."""
    import torch

    from stm_feedback.nets import build_net
    from stm_feedback.runner import ModelRunner

    torch.manual_seed(0)
    runner = ModelRunner(
        {spec.name: (build_net(spec), spec)},
        device="cpu",
        threads=threads,
        require_all=False,
        backend=backend,
    )
    side = int(round(frame_px * frame_pixel_nm / spec.pixel_size_nm))
    x = np.random.default_rng(0).random((side, side), dtype=np.float32)
    ms, cpu = [], []
    for i in range(warmup + n):
        c0, t0 = time.process_time(), time.perf_counter()
        runner.run_net(spec.name, x)
        if i >= warmup:
            ms.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return {
        "input_px": side,
        "backend": runner.backend,
        **summarize_ms(ms),
        "cpu_p50_ms": round(float(np.median(cpu)), 3),
        "load": load_average(),
    }


# candidate architectures for the networks engineer: (net, widths, working pixel size nm, convs per level)
CANDIDATES: tuple[tuple[str, tuple[int, ...], float, int], ...] = (
    ("terraces", (16, 32, 64, 128), 0.1, 2),  # paper
    ("terraces", (8, 16, 32, 32), 0.2, 1),
    ("terraces", (8, 16, 32, 32), 0.4, 1),
    ("terraces", (4, 8, 16, 16), 0.4, 1),
    ("atoms", (16, 32, 64, 128), 0.1, 2),  # paper
    ("atoms", (16, 32, 32, 64), 0.1, 2),
    ("atoms", (16, 32, 32, 64), 0.1, 1),
    ("atoms", (8, 16, 32, 32), 0.1, 2),
    ("atoms", (8, 16, 32, 32), 0.1, 1),
    ("atoms", (6, 12, 24, 24), 0.1, 1),
    ("atoms", (4, 8, 16, 16), 0.1, 1),
    ("atoms", (8, 16, 32, 32), 0.125, 1),
    ("atoms", (8, 16, 32, 32), 0.15, 1),
    ("defects", (25,), 0.1, 1),  # paper
    ("defects", (12,), 0.15, 1),
    ("defects", (8,), 0.15, 1),
    ("defects", (12,), 0.2, 1),
    ("defects", (8,), 0.2, 1),
)


def bench_candidates(backend: str, n: int = 40, threads: int = 0) -> list[dict[str, Any]]:
    """Latency of each CANDIDATES net (random weights, default spec otherwise), 256 px frame at 0.1 nm."""
    from dataclasses import replace

    from stm_feedback.nets import spec_preset

    rows = []
    for name, widths, px_nm, convs in CANDIDATES:
        spec = replace(spec_preset(name), widths=widths, pixel_size_nm=px_nm, convs_per_level=convs)
        rows.append(
            {
                "net": name,
                "widths": list(widths),
                "pixel_size_nm": px_nm,
                "convs_per_level": convs,
                **bench_net_latency(spec, backend, n=n, threads=threads),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ whole run


@dataclass
class BenchOptions:
    """What ``stm-feedback bench`` measures (sizes in px, counts in frames)."""

    size_px: int = 256
    frames: int = 200
    warmup: int = 20
    daemon: bool = True
    models_dir: Path | None = None  # None = settings.models.models_dir
    backend: str | None = None  # None = settings.models.backend
    threads: int | None = None  # None = settings.models.threads
    large_size_px: int = 512
    large_frames: int = 50
    archive_frames: int = 100
    baseline_frames: int = 30
    distinct_frames: int = 0  # 0 = every timed frame is a different simulator frame
    candidates: bool = False
    # per evaluation suite (realistic, hard); 0 = skip. The whole suites (30): with ~140 defects in 10+10
    # frames one flipped bf16 detection is dF1 ~0.007, above the 0.005 criterion the issue sets on the suites
    equivalence_frames: int = 30
    seed0: int = 2_000_000


def _has_weights(models_dir: Path) -> bool:
    from stm_feedback.nets import NET_NAMES, model_paths

    return all(p.exists() for n in NET_NAMES for p in model_paths(models_dir, n))


def _random_models_dir() -> Path:
    """A temporary models dir holding randomly initialised nets of the default (shipped) specs."""
    from dataclasses import replace

    import torch

    from stm_feedback.nets import NET_NAMES, build_net, save_model, spec_preset

    d = Path(tempfile.mkdtemp(prefix="stm-feedback-bench-models-"))
    torch.manual_seed(0)
    for name in NET_NAMES:
        spec = spec_preset(name)
        save_model(build_net(spec), replace(spec, version=f"{spec.name}-random-init"), d)
    return d


def run_benchmark(opts: BenchOptions, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Everything ``stm-feedback bench`` reports, as one JSON-able dict (see docs/performance.md)."""
    import torch

    from stm_feedback.config import load_settings
    from stm_feedback.nets import NET_NAMES, build_net, spec_preset
    from stm_feedback.pipeline import Pipeline
    from stm_feedback.runner import ModelRunner

    if opts.frames < 1 or opts.warmup < 0:
        raise InputError(f"need frames >= 1 and warmup >= 0, got {opts.frames}, {opts.warmup}")
    settings = load_settings()
    models = settings.models
    if opts.models_dir is not None:
        models.models_dir = Path(opts.models_dir)
    if opts.backend is not None:
        models.backend = opts.backend  # type: ignore[assignment]
    if opts.threads is not None:
        models.threads = opts.threads
    weights = "trained"
    if not _has_weights(models.models_dir):
        progress(f"no trained weights in {models.models_dir}: timing randomly initialised default-spec nets")
        models.models_dir = _random_models_dir()
        weights = "random-init (default specs)"
    result: dict[str, Any] = {
        "machine": machine_info(),
        "options": {k: str(v) for k, v in vars(opts).items()},
    }

    progress("loading models")
    t0 = time.perf_counter()
    runner = ModelRunner.from_settings(models)
    load_s = time.perf_counter() - t0
    pipe = Pipeline(settings, runner=runner)
    result["models"] = {
        "dir": str(models.models_dir),
        "weights": weights,
        "versions": runner.versions(),
        "widths": {n: list(s.widths) for n, s in runner.specs.items()},
        "pixel_size_nm": {n: s.pixel_size_nm for n, s in runner.specs.items()},
        "backend": runner.backend,
        "device": runner.device,
        "threads": torch.get_num_threads() if models.threads <= 0 else models.threads,
        "load_s": round(load_s, 2),
    }

    n_distinct = opts.distinct_frames or opts.frames + opts.warmup
    progress(f"simulating {n_distinct} frames of {opts.size_px} px")
    frames = simulated_frames(n_distinct, opts.size_px, opts.seed0)
    progress(f"in-process: {opts.warmup} + {opts.frames} frames")
    result["inprocess"] = {"size_px": opts.size_px, **bench_pipeline(pipe, frames, opts.frames, opts.warmup)}
    progress("predict only (our nets)")
    n_base = max(1, opts.baseline_frames)
    ours = bench_predict(runner, frames, n_base, 3)
    progress("paper nets, PyTorch eager fp32")
    torch.manual_seed(0)
    paper_nets = {n: (build_net(spec_preset(n, "paper")), spec_preset(n, "paper")) for n in NET_NAMES}
    paper_eager = ModelRunner(paper_nets, device="cpu", threads=models.threads, backend="torch-eager")
    paper = bench_predict(paper_eager, frames, n_base, 3)
    paper_fast = ModelRunner(paper_nets, device="cpu", threads=models.threads, backend=models.backend)
    paper_fast_res = bench_predict(paper_fast, frames, n_base, 3)
    post_p50 = result["inprocess"]["end_to_end"]["p50_ms"] - ours["predict"]["p50_ms"]
    result["paper_eager_fp32"] = {
        "backend": paper_eager.backend,
        **paper,
        "ours_predict": ours["predict"],
        "paper_nets_on_our_backend": {"backend": paper_fast.backend, **paper_fast_res["predict"]},
        "ratio_networks_p50": round(paper["predict"]["p50_ms"] / ours["predict"]["p50_ms"], 2),
        "ratio_frame_p50": round(
            (paper["predict"]["p50_ms"] + post_p50) / result["inprocess"]["end_to_end"]["p50_ms"], 2
        ),
    }
    del paper_eager, paper_fast, paper_nets

    if opts.large_frames > 0:
        progress(f"in-process {opts.large_size_px} px: {opts.large_frames} frames")
        big = simulated_frames(min(opts.large_frames + 3, 20), opts.large_size_px, opts.seed0 + 500_000)
        result["inprocess_large"] = {
            "size_px": opts.large_size_px,
            **bench_pipeline(pipe, big, opts.large_frames, 3),
        }
    if opts.archive_frames > 0:
        progress(f"archive throughput: {opts.archive_frames} frames")
        result["archive"] = {"size_px": opts.size_px, **throughput(pipe, frames, opts.archive_frames)}
    if opts.daemon:
        progress("daemon: serve subprocess on 127.0.0.1")
        env = {
            "STM_FEEDBACK_MODELS__MODELS_DIR": str(models.models_dir),
            "STM_FEEDBACK_MODELS__BACKEND": str(models.backend),
            "STM_FEEDBACK_MODELS__THREADS": str(models.threads),
            "STM_FEEDBACK_SERVER__WARMUP_PX": str(opts.size_px),
            "STM_FEEDBACK_LOG_LEVEL": "WARNING",
        }
        result["daemon"] = {"size_px": opts.size_px, **bench_daemon(frames, opts.frames, opts.warmup, env)}
        progress("daemon cold start with an empty model cache")
        with tempfile.TemporaryDirectory(prefix="stm-feedback-bench-cache-") as empty:
            cold = bench_daemon(frames, 1, 0, {**env, "STM_FEEDBACK_CACHE_DIR": empty})
        result["daemon"]["cold_start_empty_cache_s"] = cold["cold_start_to_ready_s"]
    if opts.equivalence_frames > 0:
        progress(f"backend equivalence: {opts.equivalence_frames} frames of the realistic and hard suites")
        result["equivalence"] = backend_equivalence(models.models_dir, opts.equivalence_frames)
    if opts.candidates:
        progress("candidate architectures (random weights)")
        result["candidates"] = bench_candidates(str(models.backend), threads=models.threads)
    result["machine"]["load_1min_end"] = load_average()
    return result


def format_report(r: dict[str, Any]) -> str:
    """Human-readable summary of a run_benchmark result."""
    m, md = r["machine"], r["models"]
    lines = [
        f"machine: {m['cpu']}, {m['cores_usable']} cores, flags {' '.join(m['cpu_flags'])}; "
        f"torch {m['torch']}, openvino {m['openvino']}; load {m['load_1min']} -> {m.get('load_1min_end')}",
        f"models: {md['weights']} from {md['dir']}; versions {md['versions']}",
        f"backend {md['backend']} on {md['device']}, threads {md['threads']}, load {md['load_s']} s",
    ]

    def block(title: str, res: dict[str, Any]) -> None:
        lines.append(f"{title} (load {res['load_before']} -> {res['load_after']})")
        lines.append(f"  {'stage':<22}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
        rows = [(k, res["stages"][k]) for k in stage_order(res["stages"])] + [
            ("END-TO-END", res["end_to_end"]),
            ("cpu time (all threads)", res["cpu"]),
        ]
        for name, s in rows:
            lines.append(f"  {name:<22}{s['p50_ms']:>9.2f}{s['p95_ms']:>9.2f}{s['p99_ms']:>9.2f}")

    block(f"in-process {r['inprocess']['size_px']} px, {r['inprocess']['frames']} frames", r["inprocess"])
    if "inprocess_large" in r:
        block(
            f"in-process {r['inprocess_large']['size_px']} px, {r['inprocess_large']['frames']} frames",
            r["inprocess_large"],
        )
    p = r["paper_eager_fp32"]
    pf = p["paper_nets_on_our_backend"]
    lines.append(
        f"paper nets, PyTorch eager fp32: predict p50 {p['predict']['p50_ms']:.1f} ms vs ours "
        f"{p['ours_predict']['p50_ms']:.1f} ms -> networks x{p['ratio_networks_p50']}, "
        f"whole frame x{p['ratio_frame_p50']}; paper nets on {pf['backend']}: "
        f"p50 {pf['p50_ms']:.1f} ms (load {p['load_before']} -> {p['load_after']})"
    )
    if "archive" in r:
        a = r["archive"]
        lines.append(
            f"archive mode {a['size_px']} px: {a['frames_per_s']} frames/s over {a['frames']} frames"
        )
    if "daemon" in r:
        d = r["daemon"]
        rt = d["round_trip"]
        lines.append(
            f"daemon over ZeroMQ ({d['backend']}): round trip p50/p95/p99 {rt['p50_ms']:.2f} / "
            f"{rt['p95_ms']:.2f} / {rt['p99_ms']:.2f} ms; "
            f"cold start to ready {d['cold_start_to_ready_s']} s "
            f"(empty cache {d.get('cold_start_empty_cache_s')} s); RSS {d['rss_mb']} MiB "
            f"(load {d['load_before']} -> {d['load_after']})"
        )
        if d.get("server_stages"):
            lines.append(
                "  server side p50/p95 ms: "
                + "; ".join(
                    f"{k} {v['p50_ms']:.2f}/{v['p95_ms']:.2f}" for k, v in d["server_stages"].items()
                )
            )
    for c in r.get("candidates", []):
        lines.append(
            f"candidate {c['net']:<9} widths {str(c['widths']):<18} x{c['convs_per_level']} "
            f"{c['pixel_size_nm']} nm/px "
            f"({c['input_px']} px): p50 {c['p50_ms']:.2f} ms p95 {c['p95_ms']:.2f} ms, "
            f"CPU p50 {c['cpu_p50_ms']:.2f} ms (load {c['load']})"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ equivalence


def detection_agreement(ref: Any, other: Any, pixel_size_nm: float, tol_nm: float = 0.05) -> dict[str, float]:
    """F1 of ``other``'s atoms and defects (``Analysis``) against ``ref``'s, matched one-to-one within tol_nm
    (same kind required for defects); 1.0 = identical detections. Also the largest matched offset (nm)."""
    from stm_feedback.metrics import score_matching

    out: dict[str, float] = {}
    worst_nm = 0.0
    for key, items_ref, items_other in (
        ("atoms", ref.atoms, other.atoms),
        (
            "protrusions",
            [d for d in ref.defects if d.kind == "protrusion"],
            [d for d in other.defects if d.kind == "protrusion"],
        ),
        (
            "depressions",
            [d for d in ref.defects if d.kind == "depression"],
            [d for d in other.defects if d.kind == "depression"],
        ),
    ):
        a = np.array([[p.x_px, p.y_px] for p in items_ref], np.float64).reshape(-1, 2)
        b = np.array([[p.x_px, p.y_px] for p in items_other], np.float64).reshape(-1, 2)
        counts, ti, pi = score_matching(a, b, tol_nm, pixel_size_nm)
        out[f"{key}_f1"] = counts.f1
        out[f"{key}_n_ref"] = float(len(a))
        if len(ti):
            worst_nm = max(worst_nm, float(np.max(np.hypot(*(a[ti] - b[pi]).T)) * pixel_size_nm))
    out["max_offset_nm"] = worst_nm
    return out


STAGE_ORDER: tuple[str, ...] = (
    "preprocess",
    *(NET_STAGE_PREFIX + n for n in ("terraces", "atoms", "defects")),
    "terraces",
    "atoms",
    "lattice",
    "dimers",
    "defects",
    "classes",
    "planner",
    "quality",
    "objects",
)


def stage_order(names: Iterable[str]) -> list[str]:
    """Stage names in pipeline order (unknown ones last, alphabetically)."""
    names = list(names)
    known = [n for n in STAGE_ORDER if n in names]
    return known + sorted(n for n in names if n not in STAGE_ORDER)


def format_markdown(r: dict[str, Any]) -> str:
    """The run as markdown tables (docs/performance.md): conditions, stages, daemon, ratio, candidates."""
    m, md = r["machine"], r["models"]
    out = [
        f"- machine: {m['cpu']}, {m['cores_usable']} usable cores, flags {', '.join(m['cpu_flags'])}; "
        f"torch {m['torch']}, openvino {m['openvino']}; 1-min load average {m['load_1min']} at start, "
        f"{m.get('load_1min_end')} at end",
        f"- models: {md['weights']} ({', '.join(f'{k}: {v}' for k, v in md['versions'].items())}); widths "
        f"{md['widths']}, working pixel sizes {md['pixel_size_nm']} nm",
        f"- backend **{md['backend']}** on {md['device']}, {md['threads']} thread(s); models loaded in "
        f"{md['load_s']} s",
        "",
    ]
    runs = [("in-process", r["inprocess"])]
    if "inprocess_large" in r:
        runs.append(("in-process", r["inprocess_large"]))
    head = "| stage | " + " | ".join(f"{t} {x['size_px']} px p50 / p95 / p99 ms" for t, x in runs) + " |"
    out += [head, "|---" * (len(runs) + 1) + "|"]
    names = stage_order(runs[0][1]["stages"])
    for name in names + ["END-TO-END", "CPU time (all threads)"]:
        cells = []
        for _, x in runs:
            key = {"END-TO-END": "end_to_end", "CPU time (all threads)": "cpu"}.get(name)
            s = x[key] if key else x["stages"].get(name)
            cells.append("" if s is None else f"{s['p50_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f}")
        label = f"**{name}**" if name == "END-TO-END" else name
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append(
        "| frames (load before -> after) | "
        + " | ".join(f"{x['frames']} ({x['load_before']} -> {x['load_after']})" for _, x in runs)
        + " |"
    )
    out.append("")
    if "daemon" in r:
        d = r["daemon"]
        rt = d["round_trip"]
        out.append(
            f"- daemon (`serve` subprocess, ZeroMQ on 127.0.0.1, no maps returned, {d['frames']} frames): "
            f"round trip p50/p95/p99 **{rt['p50_ms']:.1f}** / {rt['p95_ms']:.1f} / {rt['p99_ms']:.1f} ms; "
            f"cold start to `ready` **{d['cold_start_to_ready_s']} s** (model cache warm), "
            f"{d.get('cold_start_empty_cache_s')} s with an empty model cache; "
            f"RSS **{d['rss_mb']} MiB**; load "
            f"{d['load_before']} -> {d['load_after']}"
        )
        if d.get("server_stages"):
            st = d["server_stages"]
            out.append(
                "- daemon reply timings (server side, p50 / p95 ms): "
                + "; ".join(f"{k} {v['p50_ms']:.2f} / {v['p95_ms']:.2f}" for k, v in st.items())
            )
    if "archive" in r:
        a = r["archive"]
        out.append(
            f"- archive mode ({a['size_px']} px, back to back, {a['frames']} frames): "
            f"**{a['frames_per_s']} frames/s**; load {a['load_before']} -> {a['load_after']}"
        )
    p = r["paper_eager_fp32"]
    pf = p["paper_nets_on_our_backend"]
    out.append(
        f"- paper nets (random weights), PyTorch eager fp32: `predict` p50 {p['predict']['p50_ms']:.1f} ms; "
        f"ours {p['ours_predict']['p50_ms']:.1f} ms: **networks x{p['ratio_networks_p50']}**, whole frame "
        f"x{p['ratio_frame_p50']} (paper nets + our post-processing vs ours); paper nets on {pf['backend']}: "
        f"p50 {pf['p50_ms']:.1f} ms; load {p['load_before']} -> {p['load_after']}"
    )
    if r.get("equivalence"):
        out += [
            "",
            "| backend vs torch eager fp32 | frames | suite abs dF1 atoms | suite abs dF1 defects | "
            "min frame agreement F1 atoms | min frame agreement F1 defects | max offset nm | "
            "frame max abs dF1 atoms | frame max abs dF1 defects |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in r["equivalence"]:
            out.append(
                f"| {e['backend']} | {e['frames']} | {e['suite_abs_df1_atoms']} | "
                f"{e['suite_abs_df1_defects']} | "
                f"{e['min_atoms_f1']} | {e['min_defects_f1']} | {e['max_offset_nm']} | "
                f"{e['frame_max_abs_df1_atoms']} | {e['frame_max_abs_df1_defects']} |"
            )
    if r.get("candidates"):
        out += [
            "",
            "| net | widths | convs/level | pixel nm | input px | p50 ms | p95 ms | CPU p50 ms | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in r["candidates"]:
            out.append(
                f"| {c['net']} | {tuple(c['widths'])} | {c['convs_per_level']} | {c['pixel_size_nm']} | "
                f"{c['input_px']} | {c['p50_ms']:.2f} | {c['p95_ms']:.2f} | {c['cpu_p50_ms']:.2f} | "
                f"{c['load']} |"
            )
    return "\n".join(out) + "\n"


def backend_equivalence(
    models_dir: Path, n_frames: int = 10, suites: Sequence[str] = ("realistic", "hard")
) -> list[dict[str, Any]]:
    """Every backend runnable here against PyTorch eager fp32 on the first n_frames of each evaluation
    suite: worst per-frame agreement F1 of atoms / defects (matched within 0.05 nm), largest matched offset
    (nm), and the largest |F1 difference| against the simulator truth (atoms, defects)."""
    from stm_feedback.backends import INT8_DIRNAME, BackendUnavailable, select_backend
    from stm_feedback.config import Settings
    from stm_feedback.evaluation import suite_frames
    from stm_feedback.metrics import MatchCounts, score_frame
    from stm_feedback.pipeline import Pipeline
    from stm_feedback.runner import ModelRunner

    def pipeline(kind: str, bf16: bool | None, keep: tuple[str, ...] = (), int8: bool = False) -> Pipeline:
        runner = ModelRunner.from_dir(models_dir, device="cpu", backend="torch-eager")
        if kind != "torch-eager":
            int8_dir = Path(models_dir) / INT8_DIRNAME if int8 else None
            be = select_backend(kind, "cpu", 0, bf16=bf16, fp32_nets=keep, int8_dir=int8_dir)
            runner._backend = be
            runner.engines = {
                n: be.engine(m, runner.specs[n].out_channels, n) for n, m in runner.modules.items()
            }
        return Pipeline(Settings(), runner=runner)

    ref = pipeline("torch-eager", None)
    others: dict[str, Pipeline] = {}
    variants: tuple[tuple[str, bool, tuple[str, ...], bool], ...] = (
        ("openvino", True, (), True),  # the INT8 IRs of models_dir/int8 (when there are any)
        ("openvino", True, (), False),
        ("openvino", True, ("atoms",), False),
        ("openvino", False, (), False),
        ("torch", True, (), False),
        ("torch", False, (), False),
    )
    for kind, bf16, keep, int8 in variants:
        try:
            p = pipeline(kind, bf16, keep, int8)
        except BackendUnavailable:
            continue
        others.setdefault(p.runner.backend, p)
    rows: dict[str, dict[str, Any]] = {
        k: {"backend": k, "frames": 0, "min_atoms_f1": 1.0, "min_defects_f1": 1.0, "max_offset_nm": 0.0,
            "suite_abs_df1_atoms": 0.0, "suite_abs_df1_defects": 0.0,
            "frame_max_abs_df1_atoms": 0.0, "frame_max_abs_df1_defects": 0.0}
        for k in others
    }  # fmt: skip
    for suite in suites:
        # summed TP/FP/FN over the suite's frames: the suite-level F1 the evaluation reports
        totals = {k: [MatchCounts(), MatchCounts()] for k in ["ref", *others]}
        for f in suite_frames(suite, n_frames):
            a0 = ref.analyze(f.image_nm, f.pixel_size_nm, f.bias_v)
            s0 = score_frame(f.truth, a0)
            totals["ref"] = [totals["ref"][0] + s0.atoms, totals["ref"][1] + s0.defects]
            for k, p in others.items():
                a = p.analyze(f.image_nm, f.pixel_size_nm, f.bias_v)
                s = score_frame(f.truth, a)
                totals[k] = [totals[k][0] + s.atoms, totals[k][1] + s.defects]
                ag = detection_agreement(a0, a, f.pixel_size_nm, tol_nm=0.05)
                r = rows[k]
                r["frames"] += 1
                r["min_atoms_f1"] = min(r["min_atoms_f1"], ag["atoms_f1"])
                r["min_defects_f1"] = min(r["min_defects_f1"], ag["protrusions_f1"], ag["depressions_f1"])
                r["max_offset_nm"] = max(r["max_offset_nm"], ag["max_offset_nm"])
                r["frame_max_abs_df1_atoms"] = max(
                    r["frame_max_abs_df1_atoms"], abs(s.atoms.f1 - s0.atoms.f1)
                )
                r["frame_max_abs_df1_defects"] = max(
                    r["frame_max_abs_df1_defects"], abs(s.defects.f1 - s0.defects.f1)
                )
        for k in others:
            r = rows[k]
            d_atoms = abs(totals[k][0].f1 - totals["ref"][0].f1)
            d_defects = abs(totals[k][1].f1 - totals["ref"][1].f1)
            r["suite_abs_df1_atoms"] = max(r["suite_abs_df1_atoms"], d_atoms)
            r["suite_abs_df1_defects"] = max(r["suite_abs_df1_defects"], d_defects)
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows.values()]
