"""The single command-line interface, ``stm-feedback``. Each subsystem registers its commands from
``stm_feedback/commands/<name>.py`` (heavy imports stay inside the command functions so ``--help`` is fast).
"""

from __future__ import annotations

import typer

from stm_feedback.commands import adapter, analysis, bench, demo, evaluate, library, nets, serve, simulate

app = typer.Typer(
    name="stm-feedback",
    help="Real-time analysis of H-Si(100)-2x1 STM frames: atoms, defects, terraces and safe-to-write sites.",
    no_args_is_help=True,
    add_completion=False,
)

for _module in (demo, simulate, nets, evaluate, analysis, library, serve, bench, adapter):
    _module.register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
