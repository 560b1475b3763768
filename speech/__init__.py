"""The speech engine: pure Python, no Prefect.

Every stage is a function with a typed input and output (see :mod:`speech.schema`).
Heavy dependencies (torch, whisperx, faster-whisper) are imported lazily inside the
functions that need them, so importing this package is cheap.
"""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin while waiting stalled torch's VAD 10-80x on a busy 2-core machine
# (measured: 3 s -> 41-323 s); passive waiting costs nothing measurable when the CPU is free.
# Must be set before torch starts its thread pool, i.e. before the first torch import.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
