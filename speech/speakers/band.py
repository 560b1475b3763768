"""The channel a recording came through, read from its spectrum (16 kHz mono float32), and the
telephone channel itself, to put enrolment clips through the same band as a call.

* :func:`is_narrowband`: almost no power at or above 4 kHz: an 8 kHz source (a phone system's
  file, decoded to 16 kHz), whatever the file's rate says. The share of power at or above
  NARROWBAND_HZ is under 2e-4 on every telephone-band copy and over 1.1e-3 on every wideband
  recording of the project's set (bench/realdata.py).
* :func:`lacks_low_band`: almost no power below 250 Hz, where a voice's fundamental lies: the
  300 Hz high-pass of a classic telephone channel (ITU-T G.712). The share of 60-4000 Hz power
  below 250 Hz is 0.07-0.97 on every recording of the project's set and on their copies
  low-passed at 3400 Hz, and under 5e-3 on every 300-3400 Hz copy.
* :func:`telephone_channel`: 300-3400 Hz band-pass, 8 kHz, G.711 mu-law, decoded back to 16 kHz
  (what ``bench.realdata.telephone_copy`` does to a file, then the pipeline's decoder).
"""
from __future__ import annotations

import numpy as np

from speech.schema import SAMPLE_RATE

NARROWBAND_HZ = 4000.0
NARROWBAND_RATIO = 5e-4
LOW_BAND_HZ = 250.0
LOW_BAND_RATIO = 0.02
TELEPHONE_BAND = (300.0, 3400.0)
TELEPHONE_RATE = 8000


def _power(audio: np.ndarray, seconds: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Power spectrum of the first ``seconds`` (Hann-windowed frames of ``size``) and its frequencies."""
    head = np.asarray(audio[: int(seconds * SAMPLE_RATE)], dtype=np.float64)
    if len(head) < size:
        return np.zeros(size // 2 + 1), np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    frames = head[: len(head) // size * size].reshape(-1, size) * np.hanning(size)
    return (np.abs(np.fft.rfft(frames, axis=1)) ** 2).sum(axis=0), np.fft.rfftfreq(size, 1 / SAMPLE_RATE)


def is_narrowband(audio: np.ndarray, seconds: float = 60.0) -> bool:
    """Whether ``audio`` is telephone band: almost no power at or above 4 kHz in its first minute
    (32 ms frames)."""
    power, freqs = _power(audio, seconds, 512)
    total = power[freqs >= 100].sum()
    return bool(total > 0 and power[freqs >= NARROWBAND_HZ].sum() / total < NARROWBAND_RATIO)


def lacks_low_band(audio: np.ndarray, seconds: float = 60.0) -> bool:
    """Whether ``audio`` has (almost) nothing below 250 Hz in its first minute (64 ms frames)."""
    power, freqs = _power(audio, seconds, 1024)
    total = power[(freqs >= 60) & (freqs < NARROWBAND_HZ)].sum()
    return bool(total > 0 and power[(freqs >= 60) & (freqs < LOW_BAND_HZ)].sum() / total < LOW_BAND_RATIO)


def channel(audio: np.ndarray) -> str:
    """``telephone`` for audio that came through a 300-3400 Hz channel (narrowband with no low
    band), else ``wideband``; the channel enrolment clips are matched to (speech.speakers.verify)."""
    return "telephone" if is_narrowband(audio) and lacks_low_band(audio) else "wideband"


def telephone_channel(audio: np.ndarray) -> np.ndarray:
    """``audio`` (16 kHz) as it comes out of a phone system's file: band-passed to 300-3400 Hz,
    resampled to 8 kHz, G.711 mu-law coded by libsndfile, and decoded back to 16 kHz by the
    pipeline's own decoder (speech.io.decode), as the call itself was. The decoder's resampler
    matters: a steeper one (scipy's polyphase) scores the same clip only 0.81-0.90 against it with
    CAM++, and names enrolled that way were no better than the clips as recorded."""
    import tempfile
    from pathlib import Path

    import soundfile as sf
    from scipy.signal import butter, resample_poly, sosfiltfilt

    from speech.io.decode import decode

    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if x.size < 64:  # too short for the filter: nothing in band
        return np.zeros(x.size, dtype=np.float32)
    sos = butter(6, TELEPHONE_BAND, btype="bandpass", fs=SAMPLE_RATE, output="sos")
    narrow = np.clip(resample_poly(sosfiltfilt(sos, x), TELEPHONE_RATE, SAMPLE_RATE), -1.0, 1.0)
    with tempfile.TemporaryDirectory(prefix="telephone-") as tmp:
        path = Path(tmp) / "channel.wav"
        sf.write(str(path), narrow, TELEPHONE_RATE, subtype="ULAW")
        out, _ = decode(path, "telephone channel", max_seconds=x.size / SAMPLE_RATE + 1.0)
    return out[: x.size].astype(np.float32)
