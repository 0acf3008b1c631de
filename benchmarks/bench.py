"""Thin wrapper: ``python benchmarks/bench.py [options]`` == ``stm-feedback bench [options]``."""

from __future__ import annotations

import sys

from stm_feedback.cli import app

if __name__ == "__main__":
    sys.exit(app(["bench", *sys.argv[1:]]))
