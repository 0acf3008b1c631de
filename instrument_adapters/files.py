"""Watched-folder adapter: every new or rewritten .sxm/.gwy/.npy/.Z_mtrx file in a folder becomes one frame.

watchdog reports created/closed/moved files; a file is read once its size has stopped changing for
``settle_s`` seconds (acquisition software writes files in several chunks), then remembered by
(path, size, mtime) so the same content is never sent twice. A corrupt file is logged, listed in ``errors``
and skipped: the watcher keeps going.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from instrument_adapters.base import InstrumentAdapter
from stm_feedback.errors import InputError
from stm_feedback.readers import Frame, is_supported, read_frame

log = logging.getLogger(__name__)


class _Enqueue(FileSystemEventHandler):
    def __init__(self, q: queue.Queue[Path]) -> None:
        self.q = q

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "closed", "moved"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        if isinstance(path, bytes):
            path = path.decode()
        if path and is_supported(path):
            self.q.put(Path(path))


class FolderAdapter(InstrumentAdapter):
    """Frames from files appearing in ``folder`` (not recursive).

    ``include_existing`` also yields files already there at start (oldest first); ``idle_timeout_s`` ends
    ``frames()`` after that long without a new file (None = watch forever); ``pixel_size_nm`` / ``bias_v``
    are defaults for .npy files without a sidecar.
    """

    def __init__(
        self,
        folder: str | Path,
        instrument_id: str = "folder",
        include_existing: bool = True,
        idle_timeout_s: float | None = None,
        settle_s: float = 0.2,
        pixel_size_nm: float | None = None,
        bias_v: float | None = None,
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: not a directory")
        self.instrument_id = instrument_id
        self.idle_timeout_s = idle_timeout_s
        self.settle_s = settle_s
        self.pixel_size_nm = pixel_size_nm
        self.bias_v = bias_v
        self.errors: list[tuple[str, str]] = []  # (path, message) of files that could not be read
        self._seen: set[tuple[str, int, int]] = set()
        self._queue: queue.Queue[Path] = queue.Queue()
        self._closed = threading.Event()
        self._observer = Observer()
        self._observer.schedule(_Enqueue(self._queue), str(self.folder), recursive=False)
        self._observer.start()
        if include_existing:
            existing = [p for p in self.folder.iterdir() if p.is_file() and is_supported(p)]
            for p in sorted(existing, key=lambda p: p.stat().st_mtime):
                self._queue.put(p)

    def frames(self) -> Iterator[Frame]:
        last_new = time.monotonic()
        while not self._closed.is_set():
            try:
                path = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.idle_timeout_s is not None and time.monotonic() - last_new > self.idle_timeout_s:
                    return
                continue
            frame = self._take(path)
            if frame is not None:
                last_new = time.monotonic()
                yield frame

    def _take(self, path: Path) -> Frame | None:
        """The frame in ``path`` if it is new, complete and readable; None otherwise."""
        key = self._settled_key(path)
        if key is None or key in self._seen:
            return None
        self._seen.add(key)
        try:
            frame = self._read(path)
        except InputError as exc:
            log.warning("skipping %s: %s", path, exc)
            self.errors.append((str(path), str(exc)))
            return None
        frame.meta.setdefault("frame_id", f"{path.stem}-{key[2]}")
        return frame

    def _read(self, path: Path) -> Frame:
        sidecar = path.with_name(path.stem + ".meta.json")
        if path.suffix.lower() == ".npy" and not sidecar.exists() and self.pixel_size_nm is not None:
            return read_frame(path, pixel_size_nm=self.pixel_size_nm, bias_v=self.bias_v)
        return read_frame(path)

    def _settled_key(self, path: Path) -> tuple[str, int, int] | None:
        """(path, size, mtime_ns) once the size is stable for ``settle_s``; None if the file vanished."""
        try:
            st = path.stat()
            while True:
                time.sleep(self.settle_s)
                st2 = path.stat()
                if (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                    return (str(path.resolve()), st2.st_size, st2.st_mtime_ns)
                st = st2
        except FileNotFoundError:
            return None

    def close(self) -> None:
        self._closed.set()
        self._observer.stop()
        self._observer.join(timeout=5)
