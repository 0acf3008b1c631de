"""The stm-feedback daemon: one I/O thread owns a ZeroMQ ROUTER socket, worker threads run the analyzer.

Design (zguide "ROUTER + workers" with a bounded in-flight count):
- the I/O thread receives, size-checks and validates every request (``stm_feedback.protocol``), answers cheap
  requests itself (health, ready, models, stats, query_sites) and puts analyze/analyze_lines jobs on a queue,
  answering ``overloaded`` once ``max_inflight`` jobs are queued or running;
- workers run ``analyzer.analyze(...)`` and push finished replies back over an inproc PUSH->PULL socket (zmq
  sockets are not thread-safe, so only the I/O thread touches the ROUTER);
- every accepted job produces exactly one reply (errors included); stopping = stop reading, drain, close.
The analyzer is any object with ``analyze(image, pixel_size_nm, bias_v=None, frame_id=None) -> Analysis``.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq

from stm_feedback.config import ServerSettings, Settings
from stm_feedback.drift import DriftEstimate, bin_mean, drift_bin_factor, estimate_drift, image_candidates
from stm_feedback.errors import InputError, ModelError, ProtocolError
from stm_feedback.protocol import (
    PROTOCOL_VERSION,
    QUEUED_TYPES,
    ROW_FIELDS,
    AnalyzeLinesRequest,
    AnalyzeRequest,
    Limits,
    Packed,
    QuerySitesRequest,
    Request,
    build_error,
    build_reply,
    encode_arrays,
    image_float32,
    pack_map,
    pack_rows,
    packb,
    parse_request,
)
from stm_feedback.schema import Analysis, Site
from stm_feedback.stats import Stats

log = logging.getLogger("stm_feedback.server")
_ids = itertools.count()


class Analyzer(Protocol):
    def analyze(
        self,
        image: np.ndarray,
        pixel_size_nm: float,
        bias_v: float | None = None,
        frame_id: str | None = None,
    ) -> Analysis: ...


def load_analyzer(settings: Settings) -> Analyzer:
    """Build the analyzer named by ``settings.server.analyzer`` ("module:factory", factory(settings))."""
    module_name, _, attr = settings.server.analyzer.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr or "Pipeline")
    except (ImportError, AttributeError) as exc:
        raise ModelError(
            f"analyzer {settings.server.analyzer!r} cannot be loaded ({exc}); for the classical baseline "
            "set STM_FEEDBACK_SERVER__ANALYZER=stm_feedback.server:baseline_analyzer"
        ) from exc
    analyzer = factory(settings)
    # load the networks now, not on the first request: `serve` must fail at start-up (ModelError) when the
    # weights are missing, and the first frame must not pay the loading time
    getattr(analyzer, "runner", None)
    return analyzer


class BaselineAnalyzer:
    """The classical analyzer (``stm_feedback.baseline``) behind the Pipeline's ``analyze`` signature, so the
    daemon can run without trained weights (``server.analyzer = "stm_feedback.server:baseline_analyzer"``)."""

    backend = "classical"
    device = "cpu"

    def versions(self) -> dict[str, str]:
        return {"baseline": "classical-1"}

    def analyze(
        self,
        image: np.ndarray,
        pixel_size_nm: float,
        bias_v: float | None = None,
        frame_id: str | None = None,
    ) -> Analysis:
        from stm_feedback.baseline import analyze_baseline

        analysis = analyze_baseline(image, pixel_size_nm, bias_v=bias_v)
        analysis.image.frame_id = frame_id
        return analysis


def baseline_analyzer(settings: Settings) -> BaselineAnalyzer:
    """Factory for ``server.analyzer``: the classical baseline (no networks, no planner sites)."""
    return BaselineAnalyzer()


def describe_models(analyzer: Any) -> dict[str, Any]:
    """Model versions, backend and device of the analyzer's runner (``Pipeline.runner``), where it has one."""
    runner = getattr(analyzer, "runner", analyzer)
    versions = getattr(runner, "versions", None)
    try:
        vers = dict(versions()) if callable(versions) else {}
    except Exception:  # a broken runner must not take down the models request
        log.exception("runner.versions() failed")
        vers = {}
    models = getattr(analyzer, "models", None)  # Pipeline: + the library classifier's version, if any
    if callable(models):
        try:
            vers.update({str(k): str(v) for k, v in models().items()})
        except Exception:
            log.exception("analyzer.models() failed")
    return {
        "versions": vers,
        "backend": str(getattr(runner, "backend", "unknown")),
        "device": str(getattr(runner, "device", "unknown")),
        "analyzer": type(analyzer).__module__ + "." + type(analyzer).__qualname__,
    }


# ------------------------------------------------------------------------------------------ reply payload
_FLAT_LISTS = ("atoms", "dimers", "defects", "terraces")  # dataclasses of scalars, thousands per frame


def _flat_rows(objs: list[Any]) -> list[dict[str, Any]]:
    """``[asdict(o) for o in objs]`` for dataclasses whose fields are all scalars: a copy of each
    instance's attribute dict (same keys in field order, same values), ~50x cheaper than ``asdict``'s
    recursive deep copy; any object that is not such a plain instance goes through ``asdict``."""
    if not objs:
        return []
    cls = type(objs[0])
    n_fields = len(fields(cls)) if is_dataclass(cls) else -1
    out = []
    for o in objs:
        d = getattr(o, "__dict__", None)
        out.append(d.copy() if type(o) is cls and d is not None and len(d) == n_fields else asdict(o))
    return out


def analysis_json(analysis: Analysis, packed_rows: bool = False) -> dict[str, Any]:
    """``analysis.to_json_dict()`` (equal dict, same key order) for the reply: the large per-object lists
    (atoms, dimers, defects, terraces) are built by ``_flat_rows``, everything else by ``to_json_dict``
    itself, so keys added to the schema later still arrive. ~2 ms instead of ~45 ms for 6500 objects.
    ``packed_rows``: atoms / dimers still held as columns come as ``protocol.Packed`` msgpack bytes of
    their rows (``protocol.pack_rows``, no dicts) where their values allow it, and the sites' rows share
    their ``dimers`` lists with the analysis (not deep copies as ``asdict`` makes: ~0.7 ms for 50 sites):
    such a dict is for packing at once, see ``pack_analysis``."""
    lists = (*_FLAT_LISTS, "sites") if packed_rows else _FLAT_LISTS
    d = replace(analysis, **{k: [] for k in lists}).to_json_dict()
    for k in lists:
        if packed_rows and k in ROW_FIELDS:
            cols = analysis.lazy_columns(k)
            packed = pack_rows(ROW_FIELDS[k], cols) if cols is not None else None
            if packed is not None:
                d[k] = packed
                continue
        rows = analysis.json_rows(k) if k in ("atoms", "dimers") else None  # still columns: no objects
        d[k] = rows if rows is not None else _flat_rows(getattr(analysis, k))
    return d


def pack_analysis(analysis: Analysis) -> Packed:
    """``packb(analysis.to_json_dict())``, byte for byte, for the reply: the atoms' and dimers' rows are
    written from the pipeline's columns in one numpy pass (``protocol.pack_rows``) instead of ~6500 dicts
    packed one by one (docs/performance.md, "Session 4 daemon overhead")."""
    return Packed(pack_map(analysis_json(analysis, packed_rows=True)))


# ------------------------------------------------------------------------------------------ drift estimate


def _defects_xy_px(analysis: Analysis) -> np.ndarray:
    return np.array([[d.x_px, d.y_px] for d in analysis.defects], np.float64).reshape(-1, 2)


def measure_drift(
    prev: Analysis | None,
    prev_binned: np.ndarray | None,
    analysis: Analysis,
    binned: np.ndarray,
    factor: int,
    candidates: list[tuple[float, float, float]] | None = None,
) -> DriftEstimate | None:
    """Apparent motion in input pixels of the surface from the previous full frame to this one
    (``stm_feedback.drift.estimate_drift`` on the frames block-averaged by ``factor``, with both analyses'
    defects), or None without a previous frame of the same shape and pixel size. ``candidates``: the image
    part (``DriftPrep.candidates``) when it was computed ahead for exactly these two binned frames."""
    if prev is None or prev_binned is None or prev_binned.shape != binned.shape:
        return None
    if (prev.image.height_px, prev.image.width_px) != (analysis.image.height_px, analysis.image.width_px):
        return None
    px = analysis.image.pixel_size_nm
    if abs(prev.image.pixel_size_nm - px) > 1e-6 * px:
        return None
    return estimate_drift(
        prev_binned, binned, px, factor, _defects_xy_px(prev), _defects_xy_px(analysis), candidates
    )


@dataclass
class DriftPrep:
    """The image part of one frame's drift estimate, computed on the drift thread while the frame is being
    analysed: the frame binned for drift (``bin_mean`` by ``factor``) and, when a previous full frame of the
    same binned shape existed at submission, the correlation peaks against it (``image_candidates``).
    ``prev_binned`` is that previous frame (the object itself: the result is used only if it is still the
    instrument's previous frame when the analysis is done)."""

    factor: int
    binned: np.ndarray
    pixel_size_nm: float
    prev_binned: np.ndarray | None = None
    candidates: list[tuple[float, float, float]] | None = None


def prepare_drift(image: np.ndarray, pixel_size_nm: float, prev_binned: np.ndarray | None) -> DriftPrep:
    """``DriftPrep`` of ``image`` (H, W) against ``prev_binned`` (or None); needs no analysis."""
    factor = drift_bin_factor(image.shape)
    binned = bin_mean(image, factor)
    prep = DriftPrep(factor, binned, float(pixel_size_nm))
    if prev_binned is not None and prev_binned.shape == binned.shape:
        prep.prev_binned = prev_binned
        prep.candidates = image_candidates(prev_binned, binned, float(pixel_size_nm), factor)
    return prep


@dataclass
class InstrumentState:
    """What the daemon remembers about one instrument between frames (in memory only)."""

    instrument_id: str
    latest: Analysis | None = None
    latest_frame_id: str | None = None
    latest_unix_s: float = 0.0
    latest_meta: dict[str, Any] = field(default_factory=dict)
    latest_partial: Analysis | None = None
    frames: int = 0
    drift_px: tuple[float, float] | None = None  # last frame-to-frame apparent motion (dx, dy), or None
    drift_nm: tuple[float, float] | None = None
    drift_method: str | None = None  # DriftEstimate.method of the last estimate ("ambiguous": no number)
    drift_response: float | None = None
    drift_pairs: int = 0
    drift_candidates_px: list[list[float]] = field(default_factory=list)  # (dx, dy, peak) when ambiguous
    cumulative_drift_nm: tuple[float, float] = (0.0, 0.0)
    previous_binned: np.ndarray | None = None  # last full frame after bin_mean, for the next drift estimate

    def update(
        self,
        binned: np.ndarray,
        analysis: Analysis,
        meta: dict[str, Any],
        shift: DriftEstimate | None,
    ) -> None:
        """Record a full frame's analysis and its drift estimate (``measure_drift``) from the previous frame.
        An ambiguous estimate clears ``drift_px`` (a wrong number is worse than none) and is not accumulated;
        no estimate at all (first frame, new size) leaves the previous values."""
        px = float(meta["pixel_size_nm"])
        if shift is not None:
            self.drift_method, self.drift_response = shift.method, shift.response
            self.drift_pairs = shift.n_pairs
            if shift.dx_px is None or shift.dy_px is None:
                self.drift_px = self.drift_nm = None
                self.drift_candidates_px = [[round(v, 3) for v in c] for c in shift.candidates_px]
            else:
                dx, dy = shift.dx_px, shift.dy_px
                self.drift_px, self.drift_nm = (dx, dy), (dx * px, dy * px)
                self.drift_candidates_px = []
                cx, cy = self.cumulative_drift_nm
                self.cumulative_drift_nm = (cx + dx * px, cy + dy * px)
        self.latest, self.latest_frame_id, self.latest_unix_s = analysis, analysis.image.frame_id, time.time()
        self.latest_meta = meta
        self.previous_binned = binned
        self.frames += 1

    def drift_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "drift_px": list(self.drift_px) if self.drift_px else None,
            "drift_nm": list(self.drift_nm) if self.drift_nm else None,
            "method": self.drift_method,
            "response": self.drift_response,
            "n_pairs": self.drift_pairs,
            "ambiguous": self.drift_method == "ambiguous",
            "candidates_px": self.drift_candidates_px,
            "cumulative_drift_nm": list(self.cumulative_drift_nm),
        }


def select_sites(
    sites: list[Site], pattern: str, region: list[float] | None, terrace: int | None, limit: int
) -> list[Site]:
    """Sites of ``pattern`` whose centre lies in ``region`` [x0, y0, x1, y1] px (inclusive) and on
    ``terrace``, best first (score, then clearance), at most ``limit``."""
    out = [s for s in sites if s.pattern == pattern and (terrace is None or s.terrace == terrace)]
    if region is not None:
        x0, y0, x1, y1 = region
        out = [
            s
            for s in out
            if min(x0, x1) <= s.center_x_px <= max(x0, x1) and min(y0, y1) <= s.center_y_px <= max(y0, y1)
        ]
    out.sort(key=lambda s: (-s.score, -s.clearance_nm))
    return out[:limit]


# ----------------------------------------------------------------------------------------------- server


@dataclass
class _Job:
    envelope: list[Any]
    request: Request
    received_s: float
    decode_ms: float
    deadline_s: float
    frames: list[Any]  # keeps the zmq frames (and so the zero-copy arrays) alive until the job is done


class Server:
    """The daemon. ``start()`` binds and serves in background threads; ``stop()`` drains and closes.

    ``bind`` may use port ``*`` (e.g. ``tcp://127.0.0.1:*``); ``endpoint`` is then the bound address.
    """

    def __init__(
        self,
        analyzer: Analyzer,
        settings: ServerSettings | None = None,
        bind: str | None = None,
        warm_up: bool = True,
    ) -> None:
        self.analyzer = analyzer
        self.settings = settings or ServerSettings()
        self.bind = bind or self.settings.bind
        self.limits = Limits(
            max_message_bytes=self.settings.max_message_bytes,
            max_header_bytes=self.settings.max_header_bytes,
            max_frame_px=self.settings.max_frame_px,
        )
        self.stats = Stats(window=self.settings.latency_window)
        self.endpoint: str | None = None
        self._warm_up = warm_up
        self._ready = False
        self._stopping = threading.Event()
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._ctx = zmq.Context()
        self._inproc = f"inproc://stm-feedback-replies-{next(_ids)}"
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._inflight = 0  # touched by the I/O thread only
        # set while no analysis is queued or running: background work that would compete with the analysis
        # for the 2 cores and the GIL waits for it (the defect-library recorder, LibraryRecorder(idle=...))
        self.idle = threading.Event()
        self.idle.set()
        self._replies_since_gc = 0  # worker replies forwarded since the last collection (I/O thread only)
        self._instruments: dict[str, InstrumentState] = {}
        self._state_lock = threading.Lock()
        self._models = describe_models(analyzer)
        # the image part of the drift estimate runs here while the worker analyses the frame (numpy's FFTs
        # release the GIL), so only the defect pairing is left on the reply path
        self._drift_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stm-feedback-drift")
        self._io_thread = threading.Thread(target=self._io_loop, name="stm-feedback-io", daemon=True)
        self._workers = [
            threading.Thread(target=self._worker_loop, name=f"stm-feedback-worker-{i}", daemon=True)
            for i in range(max(1, self.settings.workers))
        ]
        self._auth: Any = None
        self._gc_paused = False

    # -------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> Server:
        """Warm up the analyzer, bind and start serving; raises if the bind fails."""
        if self._warm_up:
            self.warmup()
        else:
            self._ready = True
        if self.settings.gc_every_frames > 0:
            # the collections between frames must not walk the loaded libraries' ~250k objects (150-200 ms
            # each): frozen by the warm-up, or here when there was none (a cheap collect after a warm-up)
            freeze_heap()
            _automatic_gc.pause()
            self._gc_paused = True
        self._io_thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            if self._gc_paused:
                self._gc_paused = False
                _automatic_gc.resume()
            raise self._bind_error
        for w in self._workers:
            w.start()
        log.info("serving", extra={"fields": {"endpoint": self.endpoint, "models": self._models}})
        return self

    def warmup(self) -> None:
        """Run the analyzer once on a synthetic frame so the first real frame does not pay for lazy init."""
        n = self.settings.warmup_px
        if n <= 0:
            self._ready = True
            return
        image = (np.random.default_rng(0).normal(size=(n, n)) * 0.02).astype(np.float32)
        t0 = time.perf_counter()
        try:
            self.analyzer.analyze(image, 0.1, bias_v=None, frame_id="warmup")
            self._ready = True
        except Exception:
            log.exception("warm-up failed; serving with ready=false")
        freeze_heap()
        log.info(
            "warm-up", extra={"fields": {"ms": round((time.perf_counter() - t0) * 1e3, 1), "ok": self._ready}}
        )

    def stop(self, timeout_s: float | None = 30.0) -> None:
        """Stop accepting, finish in-flight work (replies are sent), close sockets. Idempotent."""
        self._stopping.set()
        if self._io_thread.is_alive():
            self._io_thread.join(timeout_s)
        for w in self._workers:
            if w.is_alive():
                w.join(timeout_s)
        if self._gc_paused:  # even when a thread is stuck below: this server no longer collects
            self._gc_paused = False
            _automatic_gc.resume()
        if self._io_thread.is_alive() or any(w.is_alive() for w in self._workers):
            # an analyzer call is stuck: leave the (daemon) threads and their sockets; term() would block
            log.error("stop: threads still running after %s s; not closing the context", timeout_s)
            return
        self._drift_pool.shutdown(wait=True)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not self._ctx.closed:
            self._ctx.term()

    def is_alive(self) -> bool:
        return self._io_thread.is_alive()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ I/O thread

    def _make_router(self) -> zmq.Socket:
        s = self.settings
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing silently
        router.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)  # oversized frames disconnect before decoding
        router.setsockopt(zmq.LINGER, 2000)  # let the last replies leave on shutdown
        if s.curve_secret_key_file is not None:
            from zmq.auth import load_certificate
            from zmq.auth.thread import ThreadAuthenticator

            if s.curve_allowed_clients_dir is None:
                raise ValueError("curve_secret_key_file is set but curve_allowed_clients_dir is not")
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(s.curve_allowed_clients_dir))
            public, secret = load_certificate(str(s.curve_secret_key_file))
            if secret is None:
                raise ValueError(f"{s.curve_secret_key_file} holds no secret key")
            router.curve_secretkey = secret
            router.curve_publickey = public
            router.curve_server = True
        router.bind(self.bind)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        return router

    def _io_loop(self) -> None:
        try:
            router = self._make_router()
            pull = self._ctx.socket(zmq.PULL)
            pull.bind(self._inproc)
        except BaseException as exc:
            self._bind_error = exc
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        accepting = True
        try:
            while True:
                if self._stopping.is_set():
                    if accepting:
                        poller.unregister(router)
                        accepting = False
                        log.info("stopping: draining", extra={"fields": {"inflight": self._inflight}})
                    if self._inflight == 0:
                        break
                events = dict(poller.poll(100))
                if pull in events:
                    while self._forward_one(router, pull):
                        pass
                if accepting and router in events:
                    for _ in range(64):  # bounded burst so worker replies are not starved
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
        finally:
            self.idle.set()  # nothing more will be analysed: background writers need not wait
            for _ in self._workers:
                self._jobs.put(None)
            pull.close(0)
            router.close()

    def _forward_one(self, router: zmq.Socket, pull: zmq.Socket) -> bool:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        meta = _unpack_meta(frames[0].bytes)
        self._inflight -= 1
        n_env = meta["n_env"]
        self._send(
            router, frames[1 : 1 + n_env], frames[1 + n_env :], meta.get("code"), meta.get("timings", {})
        )
        del frames  # sent (ZeroMQ holds its own reference to the buffers): collectable below
        self._collect_after_reply()
        if self._inflight == 0:
            self.idle.set()
        return True

    def _collect_after_reply(self) -> None:
        """The garbage-collection policy (``gc_every_frames`` > 0): one full collection after a worker's
        reply has been handed to the ROUTER socket, when no analysis is queued or running, or at the latest
        every ``gc_every_frames`` replies. Runs on the I/O thread, after the send: a collection holds the
        GIL, so in the worker (before) it delayed the forwarding of the reply it followed. With the heap
        frozen after warm-up a full collection is the objects of the last frames only (speed4 section of
        docs/performance.md)."""
        every = self.settings.gc_every_frames
        if every <= 0:
            return
        self._replies_since_gc += 1
        if self._replies_since_gc >= every or self._inflight == 0:
            gc.collect()
            self._replies_since_gc = 0

    def _send(
        self,
        router: zmq.Socket,
        envelope: list[Any],
        body: list[Any],
        code: str | None,
        timings: dict[str, float],
    ) -> None:
        self.stats.count_reply(code)
        self.stats.record_ms(timings)
        try:
            router.send_multipart([*envelope, *body], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (client gone) or EAGAIN (client not reading)
            self.stats.count_undeliverable()
            log.warning("reply undeliverable", extra={"fields": {"errno": exc.errno, "error": str(exc)}})

    def _handle(self, router: zmq.Socket, frames: list[Any]) -> None:
        """One incoming message: validate, answer or enqueue. Never raises."""
        t0 = time.perf_counter()
        # envelope = identity (+ the empty delimiter a REQ socket adds); echoed back unchanged
        n_env = 2 if len(frames) >= 2 and len(frames[1].buffer) == 0 else 1
        envelope, body = frames[:n_env], frames[n_env:]
        rid: Any = None
        rtype: str | None = None
        try:
            try:
                req = parse_request(body, self.limits)
            except ProtocolError as err:
                self.stats.count_request(err.request_type)
                timings = {"decode": _ms(t0), "total": _ms(t0)}
                log.info(
                    "rejected",
                    extra={"fields": {"id": err.request_id, "code": err.code, "message": err.message}},
                )
                self._send(
                    router,
                    envelope,
                    build_error(err.request_id, err.request_type, err.code, err.message, timings),
                    err.code,
                    timings,
                )
                return
            rid, rtype = req.header.id, req.header.type
            self.stats.count_request(rtype)
            decode_ms = _ms(t0)
            if rtype in QUEUED_TYPES:
                if self._inflight >= self.settings.max_inflight:
                    timings = {"decode": decode_ms, "total": _ms(t0)}
                    msg = f"{self._inflight} request(s) in flight (max_inflight={self.settings.max_inflight})"
                    self._send(
                        router,
                        envelope,
                        build_error(rid, rtype, "overloaded", msg, timings),
                        "overloaded",
                        timings,
                    )
                    return
                deadline_ms = req.header.deadline_ms or self.settings.deadline_ms
                self._inflight += 1
                self.idle.clear()
                self._jobs.put(_Job(envelope, req, t0, decode_ms, t0 + deadline_ms / 1e3, frames))
                return
            payload = self._answer_inline(req)
            timings = {"decode": decode_ms, "total": _ms(t0)}
            self._send(router, envelope, build_reply(rid, rtype, payload, timings), None, timings)
        except ProtocolError as err:
            timings = {"total": _ms(t0)}
            self._send(
                router, envelope, build_error(rid, rtype, err.code, err.message, timings), err.code, timings
            )
        except Exception as exc:  # a bug: answer and keep serving
            log.exception("internal error in I/O thread")
            timings = {"total": _ms(t0)}
            self._send(
                router,
                envelope,
                build_error(rid, rtype, "internal", f"{type(exc).__name__}: {exc}", timings),
                "internal",
                timings,
            )

    def _answer_inline(self, req: Request) -> dict[str, Any]:
        rtype = req.header.type
        if rtype == "health":
            return {
                "status": "stopping" if self._stopping.is_set() else "ok",
                "uptime_s": self.stats.uptime_s(),
                "inflight": self._inflight,
            }
        if rtype == "ready":
            return {"ready": self._ready and not self._stopping.is_set()}
        if rtype == "models":
            return dict(self._models)
        if rtype == "stats":
            with self._state_lock:
                instruments = {k: v.drift_dict() for k, v in self._instruments.items()}
            return self.stats.snapshot(
                queue_depth=self._inflight, max_inflight=self.settings.max_inflight, instruments=instruments
            )
        if rtype == "query_sites":
            return self._query_sites(req.header)  # type: ignore[arg-type]
        raise ProtocolError("unknown_type", f"{rtype!r} is not answered inline")

    def _query_sites(self, h: QuerySitesRequest) -> dict[str, Any]:
        with self._state_lock:
            state = self._instruments.get(h.instrument_id)
            if state is None or state.latest is None:
                raise ProtocolError(
                    "unknown_instrument", f"no analysed frame yet for instrument {h.instrument_id!r}"
                )
            latest = state.latest
            sites = select_sites(latest.sites, h.pattern, h.region, h.terrace, h.limit)
            return {
                "instrument_id": h.instrument_id,
                "frame_id": state.latest_frame_id,
                "age_s": time.time() - state.latest_unix_s,
                "image": asdict(latest.image),
                "sites": [asdict(s) for s in sites],
                "n_sites_total": len(latest.sites),
                "drift": state.drift_dict(),
            }

    # ---------------------------------------------------------------------------------------------- workers

    def _worker_loop(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._inproc)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                body, code, timings = self._run_job(job)
                meta = packb({"n_env": len(job.envelope), "code": code, "timings": timings})
                push.send_multipart([meta, *job.envelope, *body], copy=False)
                # no collection here: it holds the GIL, and the I/O thread needs the GIL to forward this
                # reply (the collection was on the round trip, ~2 ms; the I/O thread collects after sending)
                del job, body
        finally:
            push.close()

    def _run_job(self, job: _Job) -> tuple[list[Any], str | None, dict[str, float]]:
        """One analyze/analyze_lines job -> (reply frames, error code or None, timings). Never raises."""
        h = job.request.header
        t_start = time.perf_counter()
        timings = {"decode": job.decode_ms, "queue": (t_start - job.received_s) * 1e3 - job.decode_ms}
        try:
            if t_start > job.deadline_s:
                waited = (t_start - job.received_s) * 1e3
                raise ProtocolError(
                    "deadline_exceeded", f"waited {waited:.1f} ms > deadline before work started"
                )
            if not isinstance(h, AnalyzeRequest):
                raise ProtocolError("unknown_type", f"{h.type!r} is not a queued request type")
            image = image_float32(job.request.arrays["image"])
            prep = None if isinstance(h, AnalyzeLinesRequest) else self._start_drift(h, image)
            t1 = time.perf_counter()
            analysis = self.analyzer.analyze(image, h.pixel_size_nm, bias_v=h.bias_v, frame_id=h.frame_id)
            timings["analyze"] = _ms(t1)
            t2 = time.perf_counter()
            payload = self._after_analysis(h, image, analysis, prep)
            timings["state"] = _ms(t2)  # instrument state + what is left of the drift estimate
            t3 = time.perf_counter()
            arrays = analysis.maps() if h.with_maps else None
            for stage, ms in analysis.timings_ms.items():
                timings[f"pipeline.{stage}"] = float(ms)
            body = encode_reply(h.id, h.type, payload, arrays, lambda: _final_timings(timings, t3, job))
            log.info(
                "analyzed",
                extra={
                    "fields": {
                        "id": h.id,
                        "type": h.type,
                        "instrument": h.instrument_id,
                        "frame_id": h.frame_id,
                        "timings_ms": timings,
                    }
                },
            )
            return body, None, timings
        except ProtocolError as err:
            code, msg = err.code, err.message
        except InputError as err:
            code, msg = "invalid_input", str(err)
        except Exception as exc:
            log.exception("analyzer failed")
            code, msg = "internal", f"{type(exc).__name__}: {exc}"
        timings["total"] = _ms(job.received_s)
        log.info("failed", extra={"fields": {"id": h.id, "code": code, "message": msg}})
        return build_error(h.id, h.type, code, msg, timings), code, timings

    def _start_drift(self, h: AnalyzeRequest, image: np.ndarray) -> Future[DriftPrep] | None:
        """Submit the image part of this frame's drift estimate (``prepare_drift``) to the drift thread,
        against the instrument's previous full frame as it is now; None when the pool is shut down."""
        with self._state_lock:
            state = self._instruments.get(h.instrument_id)
            prev_binned = None if state is None else state.previous_binned
        try:
            # the array keeps its zero-copy request buffer alive; the worker waits for the result anyway
            return self._drift_pool.submit(prepare_drift, image, h.pixel_size_nm, prev_binned)
        except RuntimeError:  # shut down
            return None

    def _after_analysis(
        self,
        h: AnalyzeRequest,
        image: np.ndarray,
        analysis: Analysis,
        prep_future: Future[DriftPrep] | None = None,
    ) -> dict[str, Any]:
        meta = {
            "pixel_size_nm": h.pixel_size_nm,
            "scan_angle_deg": h.scan_angle_deg,
            "bias_v": h.bias_v,
            "setpoint_pa": h.setpoint_pa,
        }
        partial = isinstance(h, AnalyzeLinesRequest)
        with self._state_lock:
            state = self._instruments.setdefault(h.instrument_id, InstrumentState(h.instrument_id))
            prev, prev_binned = state.latest, state.previous_binned
        # binning and FFTs run outside the lock so query_sites on the I/O thread never waits for them
        shift, binned = None, None
        if not partial:
            prep = None
            if prep_future is not None:
                try:
                    prep = prep_future.result()
                except Exception:
                    log.exception("drift preparation failed; estimating on the reply path")
            if prep is None:
                prep = prepare_drift(image, h.pixel_size_nm, None)
            binned, cands = prep.binned, None
            # the peaks are reused only for exactly the previous frame and pixel size they were computed for
            # (another frame of this instrument may have been recorded meanwhile when workers > 1)
            if prep.prev_binned is not None and prep.prev_binned is prev_binned:
                if prep.pixel_size_nm == analysis.image.pixel_size_nm:
                    cands = prep.candidates
            shift = measure_drift(prev, prev_binned, analysis, binned, prep.factor, cands)
        with self._state_lock:
            if binned is None:
                state.latest_partial = analysis  # a partial frame never replaces the latest full analysis
            else:
                state.update(binned, analysis, meta, shift)
            drift = state.drift_dict()
        payload: dict[str, Any] = {
            "analysis": pack_analysis(analysis),  # msgpack bytes: encode_reply inserts them as they are
            "instrument_id": h.instrument_id,
            "request_meta": meta,
            "drift": drift,
        }
        if isinstance(h, AnalyzeLinesRequest):
            payload["partial"] = {"lines": int(image.shape[0]), "total_lines": h.total_lines}
        return payload


def encode_reply(
    request_id: Any,
    rtype: str | None,
    payload: dict[str, Any],
    arrays: dict[str, np.ndarray] | None,
    final_timings: Any,
) -> list[Any]:
    """The frames ``protocol.build_reply`` makes, with ``timings_ms`` = ``final_timings()`` called after
    everything else is packed (so it can include the encoding time). The header map is assembled from
    separately packed entries, so the large ``analysis`` value is packed once, not packed, unpacked and
    packed again to insert the final timings."""
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": rtype,
        "id": request_id,
        "ok": True,
        "timings_ms": None,
        **payload,
    }
    frames: list[Any] = []
    if arrays:
        specs, frames = encode_arrays(arrays)
        header["arrays"] = specs
    # values already packed (``protocol.Packed``, e.g. the analysis from ``pack_analysis``) go in as-is
    parts = {
        k: packb(k) + (v if isinstance(v, Packed) else packb(v))
        for k, v in header.items()
        if k != "timings_ms"
    }
    parts["timings_ms"] = packb("timings_ms") + packb(final_timings())
    head = msgpack.Packer().pack_map_header(len(header)) + b"".join(parts[k] for k in header)
    return [head, *frames]


def _final_timings(timings: dict[str, float], t_encode: float, job: Any) -> dict[str, float]:
    timings["encode"] = _ms(t_encode)
    timings["total"] = _ms(job.received_s)
    return timings


def freeze_heap() -> None:
    """Collect once, then move every object alive now (modules, models, settings: ~250k objects) into
    the collector's permanent generation (``gc.freeze``). Full collections otherwise walk all of them,
    ~150-200 ms on this machine, every few frames as each analysis allocates thousands of objects: that
    was the ``objects`` stage's p95 of 135 ms. Objects created later are collected as before."""
    gc.collect()
    gc.freeze()


class _AutomaticGc:
    """``gc.disable()`` while at least one server collects between frames itself (``pause``), restored
    by the last ``resume`` to what it was before the first pause. Process-wide, as the collector is."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paused = 0
        self._was_enabled = True

    def pause(self) -> None:
        with self._lock:
            if self._paused == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._paused += 1

    def resume(self) -> None:
        with self._lock:
            self._paused = max(0, self._paused - 1)
            if self._paused == 0 and self._was_enabled:
                gc.enable()

    @property
    def paused(self) -> int:
        return self._paused


_automatic_gc = _AutomaticGc()


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


def _unpack_meta(raw: bytes) -> dict[str, Any]:
    import msgpack

    return msgpack.unpackb(raw, raw=False)
