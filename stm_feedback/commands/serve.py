"""``stm-feedback serve``: the resident daemon (see stm_feedback/server.py and docs/protocol.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        bind: Annotated[
            str | None, typer.Option(help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:5555).")
        ] = None,
        config: Annotated[
            Path | None,
            typer.Option(help="Settings file (TOML or JSON); env STM_FEEDBACK_* also applies."),
        ] = None,
        max_inflight: Annotated[
            int | None, typer.Option(help="Queued + running analyze requests before 'overloaded'.")
        ] = None,
    ) -> None:
        """Load the analyzer once, warm it up, serve protocol v1 until SIGTERM/SIGINT; then drain, exit 0."""
        import logging
        import signal
        import threading

        from stm_feedback.config import load_settings
        from stm_feedback.errors import ModelError
        from stm_feedback.logging_setup import setup_logging
        from stm_feedback.server import Server, load_analyzer

        overrides: dict[str, object] = {}
        if bind:
            overrides["server__bind"] = bind
        if max_inflight is not None:
            overrides["server__max_inflight"] = max_inflight
        settings = load_settings(config, **overrides)
        setup_logging(settings.log_level, settings.log_json)
        log = logging.getLogger("stm_feedback.serve")

        stop = threading.Event()
        # handlers only set a flag: the main thread then drains the server outside signal context
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

        try:
            analyzer = load_analyzer(settings)
        except ModelError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        if settings.library.path.exists() and hasattr(analyzer, "use_library"):
            # the expert's stored clusters and trained classifier name the defects (`library cluster|train`)
            from stm_feedback.library import DefectLibrary

            analyzer.use_library(DefectLibrary(settings.library.path))
            log.info("defect classes from the library", extra={"fields": {"models": analyzer.models()}})
        server = Server(analyzer, settings.server)
        server.start()  # the synthetic warm-up frame runs before the recorder is attached: not recorded
        recorder = None
        if settings.library.record and hasattr(analyzer, "recorder"):
            from stm_feedback.library import LibraryRecorder

            recorder = LibraryRecorder.from_settings(settings, idle=server.idle)
            analyzer.recorder = recorder
            log.info("recording analysed defects", extra={"fields": {"library": str(settings.library.path)}})
        print(f"stm-feedback serving on {server.endpoint}", flush=True)
        while not stop.wait(0.2):
            if not server.is_alive():
                log.error("I/O thread ended unexpectedly")
                raise typer.Exit(1)
        log.info("signal received: draining in-flight work")
        server.stop()
        if recorder is not None:  # after the last analysis: every accepted frame is written before exit
            recorder.close()
            log.info(
                "library recorder closed",
                extra={"fields": {"written": recorder.written, "failed": recorder.failed}},
            )
        log.info("stopped")
