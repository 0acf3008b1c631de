"""``stm-feedback adapter {simulated,files,nanonis}``: feed an instrument's frames to a running daemon."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class AdapterKind(str, Enum):
    simulated = "simulated"
    files = "files"
    nanonis = "nanonis"


def register(app: typer.Typer) -> None:
    @app.command()
    def adapter(
        kind: Annotated[AdapterKind, typer.Argument(help="Frame source.")],
        endpoint: Annotated[str, typer.Option(help="Daemon endpoint.")] = "tcp://127.0.0.1:5555",
        instrument_id: Annotated[str, typer.Option(help="Instrument id (default: the adapter kind).")] = "",
        frames: Annotated[int, typer.Option(help="Stop after this many analysed frames (0 = never).")] = 0,
        folder: Annotated[Path, typer.Option(help="files: folder to watch.")] = Path("."),
        pixel_size_nm: Annotated[
            float | None, typer.Option(help="files: pixel size for .npy without a sidecar.")
        ] = None,
        idle_timeout_s: Annotated[
            float | None, typer.Option(help="files: stop after this long without a new file.")
        ] = None,
        host: Annotated[str, typer.Option(help="nanonis: controller host.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="nanonis: controller TCP port.")] = 6501,
        seed: Annotated[int, typer.Option(help="simulated: sample seed.")] = 0,
        preset: Annotated[str, typer.Option(help="simulated: simulator preset.")] = "realistic",
        pixels: Annotated[int, typer.Option(help="simulated: pixels per line (square frames).")] = 256,
        size_nm: Annotated[float, typer.Option(help="simulated: frame size in nm.")] = 25.6,
        lines_every: Annotated[int, typer.Option(help="simulated: partial frame every N lines, 0 = off")] = 0,
        timeout_ms: Annotated[int, typer.Option(help="Daemon reply timeout per attempt (ms).")] = 30_000,
    ) -> None:
        """Stream frames from a simulated STM, a watched folder or a Nanonis controller to the daemon and
        print one summary line per analysed frame."""
        from instrument_adapters.base import InstrumentAdapter, stream
        from stm_feedback.client import Client

        client = Client(endpoint, timeout_ms=timeout_ms)
        iid = instrument_id or kind.value
        src: InstrumentAdapter
        if kind is AdapterKind.simulated:
            from instrument_adapters.simulated import SimulatedAdapter

            src = SimulatedAdapter(
                seed=seed,
                preset=preset,
                size_nm=size_nm,
                pixels=pixels,
                instrument_id=iid,
                client=client,
                lines_every=lines_every,
            )
        elif kind is AdapterKind.files:
            from instrument_adapters.files import FolderAdapter

            src = FolderAdapter(
                folder, instrument_id=iid, idle_timeout_s=idle_timeout_s, pixel_size_nm=pixel_size_nm
            )
        else:
            from instrument_adapters.nanonis import NanonisAdapter

            src = NanonisAdapter(host, port, instrument_id=iid)

        def show(frame, analysis) -> None:  # noqa: ANN001 - Frame, Analysis
            ms = analysis.timings_ms.get("total", float("nan"))
            typer.echo(
                f"{frame.meta.get('frame_id', frame.source)}: {frame.height_px}x{frame.width_px} px "
                f"@ {frame.pixel_size_nm:.3f} nm, atoms={len(analysis.atoms)} "
                f"defects={len(analysis.defects)} "
                f"terraces={len(analysis.terraces)} sites={len(analysis.sites)} total={ms:.0f} ms"
            )

        try:
            n = stream(src, client, max_frames=frames or None, on_result=show)
        except KeyboardInterrupt:
            n = -1
        finally:
            src.close()
            client.close()
        if n >= 0:
            typer.echo(f"{n} frame(s) analysed")
