"""Render a result into its output files: <stem>.json, .segments.json, .srt, .vtt.

SRT/VTT come from whisperx's own writers (``whisperx.utils.WriteSRT``/``WriteVTT``), so cue
splitting, speaker prefixes and timestamp formatting match the ``whisperx`` CLI.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

from speech.schema import TranscriptionResult

SUBTITLE_OPTIONS = {"max_line_width": None, "max_line_count": None, "highlight_words": False}


def _subtitles(writer_cls: Any, data: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer_cls(output_dir=".").write_result(data, file=buf, options=dict(SUBTITLE_OPTIONS))
    return buf.getvalue()


def render(result: TranscriptionResult, stem: str, extra: Optional[dict[str, Any]] = None) -> dict[str, bytes]:
    """All output files of one result, as name -> bytes (rendered fully before any write).

    ``extra`` adds helper artefacts by file name (e.g. ``<stem>.pyannote.job.json``)."""
    from whisperx.utils import WriteSRT, WriteVTT

    full = result.to_json()
    sub_input = {"segments": full["segments"], "language": full.get("detected_language") or "en"}
    files = {name: _dumps(obj) for name, obj in (extra or {}).items()}
    return files | {
        f"{stem}.json": _dumps(full),
        f"{stem}.segments.json": _dumps(full["segments"]),
        f"{stem}.srt": _subtitles(WriteSRT, sub_input).encode(),
        f"{stem}.vtt": _subtitles(WriteVTT, sub_input).encode(),
    }


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def load_saved_json(path: "str | Path", what: str) -> dict:
    """A saved API response (``<stem>.deepgram.json``, ``<stem>.pyannote.job.json``) for reuse."""
    from speech.errors import InvalidRequest

    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidRequest(f"{what} not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {what} {p}: {exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{what} {p} is not an object")
    return data
