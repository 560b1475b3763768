"""The speech engine: pure Python, no Prefect.

Every stage is a function with a typed input and output (see :mod:`speech.schema`).
Heavy dependencies (torch, whisperx, faster-whisper) are imported lazily inside the
functions that need them, so importing this package is cheap.
"""

__version__ = "0.1.0"
