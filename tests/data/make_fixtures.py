#!/usr/bin/env python3
"""Regenerate the committed speech fixtures in tests/data.

Needs the Debian packages `flite` and `espeak-ng` (``apt-get install flite espeak-ng``);
the tests themselves only read the committed WAVs and ``fixtures.json``, so they need no TTS.

Every fixture is 16 kHz mono 16-bit PCM. ``fixtures.json`` records, per file, the spoken
text and the ground-truth turns (speaker, start, end, text) so tests can assert WER and,
later, diarization error against known answers.

Usage: python tests/data/make_fixtures.py   (writes next to this script)
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SR = 16000

# Harvard sentences (IEEE 1969, public domain), the usual speech-test material.
CONVERSATION = [
    ("slt", "The birch canoe slid on the smooth planks."),
    ("rms", "Glue the sheet to the dark blue background."),
    ("slt", "It is easy to tell the depth of a well."),
    ("rms", "These days a chicken leg is a rare dish."),
    ("slt", "Rice is often served in round bowls."),
    ("rms", "The juice of lemons makes fine punch."),
    ("slt", "The box was thrown beside the parked truck."),
    ("rms", "Four hours of steady work faced us."),
]

HELDOUT = [
    ("awb", "A large size in stockings is hard to sell."),
    ("slt", "The boy was there when the sun rose."),
    ("rms", "A rod is used to catch pink salmon."),
    ("slt", "The source of the huge river is the clear spring."),
]

FOREIGN = {
    "de_espeak.wav": (
        "de",
        "Guten Morgen. Heute ist das Wetter schön, und wir gehen zusammen in den Park. "
        "Am Nachmittag trinken wir Kaffee und essen ein Stück Kuchen.",
    ),
    "es_espeak.wav": (
        "es",
        "Buenos días. Hoy hace muy buen tiempo y vamos a caminar por la ciudad. "
        "Por la tarde tomamos un café con nuestros amigos.",
    ),
}

GAP_S = 0.6  # silence between turns
LEAD_S = 0.3  # silence at start/end


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == SR and w.getnchannels() == 1 and w.getsampwidth() == 2, path
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(samples.astype(np.int16).tobytes())


def flite(voice: str, text: str, tmp: Path) -> np.ndarray:
    out = tmp / "u.wav"
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(out)], check=True)
    return read_wav(out)


def espeak(lang: str, text: str, tmp: Path) -> np.ndarray:
    raw = tmp / "e.wav"
    subprocess.run(["espeak-ng", "-v", lang, "-s", "150", "-w", str(raw), text], check=True)
    # espeak-ng writes 22.05 kHz; resample with sox to 16 kHz.
    out = tmp / "e16.wav"
    subprocess.run(["sox", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(out)], check=True)
    return read_wav(out)


def conversation(turns, tmp: Path) -> tuple[np.ndarray, list[dict]]:
    pieces = [np.zeros(int(LEAD_S * SR), np.int16)]
    t = LEAD_S
    meta = []
    for voice, text in turns:
        audio = flite(voice, text, tmp)
        # trim flite's own leading/trailing near-silence so turn bounds are tight
        nz = np.flatnonzero(np.abs(audio) > 200)
        audio = audio[nz[0] : nz[-1] + 1] if nz.size else audio
        dur = len(audio) / SR
        meta.append({"speaker": voice, "start": round(t, 3), "end": round(t + dur, 3), "text": text})
        pieces += [audio, np.zeros(int(GAP_S * SR), np.int16)]
        t += dur + GAP_S
    pieces[-1] = np.zeros(int(LEAD_S * SR), np.int16)
    return np.concatenate(pieces), meta


def main() -> None:
    manifest: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, turns in (("sample_2spk.wav", CONVERSATION), ("heldout_3spk.wav", HELDOUT)):
            audio, turns_meta = conversation(turns, tmp)
            write_wav(HERE / name, audio)
            manifest[name] = {
                "language": "en",
                "text": " ".join(t for _, t in turns),
                "turns": turns_meta,
                "duration": round(len(audio) / SR, 3),
            }
        for name, (lang, text) in FOREIGN.items():
            audio = espeak(lang, text, tmp)
            write_wav(HERE / name, audio)
            manifest[name] = {"language": lang, "text": text, "duration": round(len(audio) / SR, 3)}
    (HERE / "fixtures.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    for k, v in manifest.items():
        print(f"{k}: {v['duration']} s")


if __name__ == "__main__":
    main()
