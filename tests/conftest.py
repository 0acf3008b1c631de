"""Test-session settings shared by every test module."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# `stm-feedback serve` (and `bench` with its daemon) record analysed defects into settings.library.path,
# by default a file in the working directory: point the subprocesses the tests start at a scratch file
_scratch = tempfile.mkdtemp(prefix="stm-feedback-tests-")
atexit.register(shutil.rmtree, _scratch, True)
os.environ.setdefault("STM_FEEDBACK_LIBRARY__PATH", os.path.join(_scratch, "library.sqlite"))
