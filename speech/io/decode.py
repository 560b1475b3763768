"""Decode any FFmpeg-readable audio to 16 kHz mono float32 with PyAV (FFmpeg's libraries ship
in the wheel; no system ffmpeg), refusing truncated or non-audio files with a clear reason; and
write samples back as a compact 16-bit WAV for hosted APIs."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from speech.errors import AudioError
from speech.schema import SAMPLE_RATE

# Sample rates decoded (telephone 8 kHz .. 384 kHz studio): resampling one frame of a 1 Hz stream
# to 16 kHz multiplies it 16,000 times, so a tiny file could ask for GBs. With these bounds and
# MAX_FRAME_SECONDS of audio per frame, one resampled frame is at most a few MB.
MIN_RATE, MAX_RATE = 4_000, 384_000
MAX_FRAME_SECONDS = 30.0


def _check_rate(rate: Optional[int], samples: int, label: str) -> None:
    if not rate or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{label}: sample rate {rate or 0} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    if samples > MAX_FRAME_SECONDS * rate:
        raise AudioError(f"{label}: one audio frame holds {samples / rate:.0f} s; at most {MAX_FRAME_SECONDS:.0f} s "
                         "per frame is decoded")


@contextlib.contextmanager
def _opened(path: Path, label: str, max_seconds: float) -> Iterator[tuple[Any, Any, Optional[float], str]]:
    """The file opened by PyAV: (container, first audio stream, declared seconds or None,
    "format/codec"); refuses a cut-off WAV, a non-audio file and a declared length over the limit."""
    import av

    cut = _riff_truncation(path)
    if cut is not None:
        raise AudioError(f"{label}: truncated WAV (header declares {cut[0]} data bytes, file holds {cut[1]})")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AudioError(f"{label}: not a readable audio file ({_av_reason(exc)})") from None
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise AudioError(f"{label}: no audio stream in the file")
        stream = streams[0]
        _check_rate(stream.codec_context.sample_rate or stream.rate, 0, label)
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if declared is None and container.duration:
            declared = container.duration / 1_000_000
        if declared is not None and declared > max_seconds:
            raise AudioError(f"{label}: {declared:.0f} s is longer than the {max_seconds:.0f} s limit")
        yield container, stream, declared, f"{container.format.name}/{stream.codec_context.name}"


def probe(path: Path, label: str, max_seconds: float) -> tuple[str, Optional[float]]:
    """("format/codec", declared seconds or None) after decoding the first frame only: a file
    that is not audio fails here, cheaply; the full decode (and its truncation check) can wait
    until a stage needs the samples."""
    import av

    with _opened(path, label, max_seconds) as (container, stream, declared, fmt):
        try:
            next(iter(container.decode(stream)), None)
        except av.FFmpegError as exc:
            raise AudioError(f"{label}: not a readable audio file ({_av_reason(exc)})") from None
    return fmt, declared


def _stream(path: Path, label: str, max_seconds: float, sink: Callable[[np.ndarray], None]) -> tuple[int, str]:
    """Decode to 16 kHz mono float32, handing each resampled chunk to ``sink`` as it comes; the
    sample count is checked on every chunk, so a file without a declared length that decodes to
    more than ``max_seconds`` is refused the moment it passes the limit, never held whole.
    Returns (samples, "format/codec"); refuses non-audio, truncated, empty and non-finite audio."""
    import av

    limit = int(max_seconds * SAMPLE_RATE)
    count = 0

    def take(out: Any) -> None:
        nonlocal count
        chunk = out.to_ndarray().reshape(-1)
        count += chunk.shape[0]
        if count > limit:
            raise AudioError(f"{label}: longer than the {max_seconds:.0f} s limit (MAX_AUDIO_SECONDS)")
        if not np.isfinite(chunk).all():
            raise AudioError(f"{label}: decoded samples are not finite")
        sink(chunk)

    with _opened(path, label, max_seconds) as (container, stream, declared, fmt):
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                _check_rate(frame.sample_rate, frame.samples, label)  # a stream may change rate mid-way
                frame.pts = None
                for out in resampler.resample(frame):
                    take(out)
            for out in resampler.resample(None):
                take(out)
        except av.FFmpegError as exc:
            if not count:
                raise AudioError(f"{label}: not a readable audio file ({_av_reason(exc)})") from None
            raise AudioError(f"{label}: corrupt or truncated audio ({_av_reason(exc)})") from None
    decoded = count / SAMPLE_RATE
    if count == 0:
        raise AudioError(f"{label}: contains no audio samples")
    if declared is not None and declared > 0.5 and decoded < 0.9 * declared - 0.1:
        raise AudioError(
            f"{label}: truncated audio (header declares {declared:.2f} s, only {decoded:.2f} s decodable)"
        )
    return count, fmt


def decode(path: Path, label: str, max_seconds: float) -> tuple[np.ndarray, str]:
    """Decode any FFmpeg-readable audio to 16 kHz mono float32 in memory (one buffer, grown by
    doubling, never past the limit); long files go to :func:`decode_to_npy` instead."""
    buf = np.empty(SAMPLE_RATE * 30, dtype=np.float32)
    used = 0

    def sink(chunk: np.ndarray) -> None:
        nonlocal buf, used
        if used + chunk.shape[0] > buf.shape[0]:
            grown = np.empty(max(2 * buf.shape[0], used + chunk.shape[0]), dtype=np.float32)
            grown[:used] = buf[:used]
            buf = grown
        buf[used:used + chunk.shape[0]] = chunk
        used += chunk.shape[0]

    count, fmt = _stream(path, label, max_seconds, sink)
    return buf[:count].copy() if buf.shape[0] > count else buf, fmt


def decode_to_npy(path: Path, label: str, max_seconds: float, target: Path) -> tuple[int, str]:
    """Decode straight into ``target`` as a ``.npy`` file (a provisional header, the samples
    streamed after it, the real header written last): memory stays at one decoded frame whatever
    the length. Returns (samples, "format/codec"); on failure ``target`` is left half-written for
    the caller to delete."""
    with target.open("wb") as f:
        provisional = _npy_header(int(max_seconds * SAMPLE_RATE) + 1)
        f.write(provisional)
        count, fmt = _stream(path, label, max_seconds, lambda chunk: f.write(chunk.astype("<f4", copy=False).tobytes()))
        final = _npy_header(count)
        if len(final) != len(provisional):  # cannot happen for 1-D float32 below 10**40 samples
            raise AudioError(f"{label}: cannot write the decoded samples (header size changed)")
        f.seek(0)
        f.write(final)
    return count, fmt


def _npy_header(samples: int) -> bytes:
    """The ``.npy`` (version 1.0) header of a 1-D little-endian float32 array of ``samples``."""
    import io

    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (samples,)})
    return out.getvalue()


def _riff_truncation(path: Path) -> Optional[tuple[int, int]]:
    """For RIFF/WAVE files: (declared data bytes, present data bytes) when data is missing.

    FFmpeg quietly decodes what is there, so a cut-off WAV would pass as a shorter file.
    Streaming writers put 0 or 0xFFFFFFFF in the size field; those are not judged.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            hdr = f.read(8)
            cid, clen = hdr[:4], int.from_bytes(hdr[4:8], "little")
            if cid == b"data":
                if clen in (0, 0xFFFFFFFF):
                    return None
                present = size - (pos + 8)
                return (clen, present) if present < clen else None
            pos += 8 + clen + (clen & 1)
    return None


def _av_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc).split(":")[0] or type(exc).__name__


def write_wav(samples: np.ndarray, path: Path) -> None:
    """16 kHz mono 16-bit PCM: a compact upload for hosted APIs, whatever the source format."""
    import wave

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
