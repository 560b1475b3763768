"""Render a result into its output files: <stem>.json always, then by ``output_format``
(default: the worker's .segments.json, .srt, .vtt; or json, srt, vtt, txt, tsv, aud, all).

SRT/VTT/TXT/TSV/AUD come from whisperx's own writers (``whisperx.utils.Write*``), so cue
splitting, speaker prefixes, word highlighting, line limits and timestamp formatting match the
``whisperx`` CLI.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

from speech.contracts import OutputOptions, TranscriptionResult

DEFAULT_FORMATS = ("json", "srt", "vtt")  # the worker's: .segments.json, .srt, .vtt beside <stem>.json
ALL_FORMATS = ("json", "srt", "vtt", "txt", "tsv", "aud")


def _written(writer_cls: Any, data: dict[str, Any], options: OutputOptions) -> bytes:
    buf = io.StringIO()
    writer_cls(output_dir=".").write_result(data, file=buf, options={
        "highlight_words": options.highlight_words, "max_line_width": options.max_line_width,
        "max_line_count": options.max_line_count})
    return buf.getvalue().encode()


def render(result: TranscriptionResult, stem: str, extra: Optional[dict[str, Any]] = None,
           options: Optional[OutputOptions] = None) -> dict[str, bytes]:
    """All output files of one result, as name -> bytes (rendered fully before any write).

    ``extra`` adds helper artefacts by file name (e.g. ``<stem>.pyannote.job.json``)."""
    from whisperx.utils import WriteAudacity, WriteSRT, WriteTSV, WriteTXT, WriteVTT

    options = options or OutputOptions()
    chosen = {None: DEFAULT_FORMATS, "all": ALL_FORMATS}.get(options.output_format, (options.output_format,))
    full = result.to_json()
    data = {"segments": full["segments"], "language": full.get("detected_language") or "en"}
    writers = {"srt": WriteSRT, "vtt": WriteVTT, "txt": WriteTXT, "tsv": WriteTSV, "aud": WriteAudacity}
    files = {name: _dumps(obj) for name, obj in (extra or {}).items()}
    files[f"{stem}.json"] = _dumps(full)
    for fmt in chosen:
        files[f"{stem}.segments.json" if fmt == "json" else f"{stem}.{fmt}"] = (
            _dumps(full["segments"]) if fmt == "json" else _written(writers[fmt], data, options))
    return files


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def load_saved_json(path: "str | Path", what: str) -> dict:
    """A saved API response (``<stem>.deepgram.json``, ``<stem>.pyannote.job.json``) for reuse."""
    from speech.errors import FetchError, InvalidRequest
    from speech.io.fetch import open_local
    from speech.settings import get_settings

    p = Path(path).expanduser()
    settings = get_settings()
    try:
        with open_local(p, settings, what) as (f, _):  # checked where it is opened, like any local input
            raw = f.read(settings.max_audio_bytes + 1)
    except FetchError as exc:
        raise InvalidRequest(str(exc)) from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read {what} {p}: {exc.__class__.__name__}") from None
    if len(raw) > settings.max_audio_bytes:
        raise InvalidRequest(f"{what} {p} is larger than MAX_AUDIO_BYTES ({settings.max_audio_bytes} bytes)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {what} {p}: {exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{what} {p} is not an object")
    return data
