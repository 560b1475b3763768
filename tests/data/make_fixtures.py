#!/usr/bin/env python3
"""Regenerate the committed speech fixtures in tests/data.

Needs the Debian packages `flite` and `espeak-ng` (``apt-get install flite espeak-ng``);
the tests themselves only read the committed WAVs and ``fixtures.json``, so they need no TTS.

Every fixture is 16 kHz mono 16-bit PCM. ``fixtures.json`` records, per file, the spoken
text and the ground-truth turns (speaker, start, end, text) so tests can assert WER and
diarization error against known answers. ``diar_{2,3,4}spk.wav`` are conversations of 2-4 flite
voices with recurring speakers and short varied gaps; ``enrol_<voice>.wav`` are single-voice
enrolment clips whose sentences occur in no conversation.

For the flite conversations it also records ``words``: one entry per whitespace token of each
turn's text (punctuation kept) with ground-truth ``start``/``end`` in absolute file time and the
``speaker``. They come from the very flite call that makes the audio (``-psdur`` prints each
phone's end time; it does not change the waveform): ``pau`` phones are dropped and the rest are
assigned to tokens in order, each token owning as many phones as ``t2p`` gives for it (phone
identities are checked; where flite's post-lexical rules change the sentence's phones, an
edit-distance alignment of the two phone strings decides). A word starts where the phone before
its first phone ends and ends where its last phone ends; the trimmed leading silence and the turn
offset are applied.

Usage: python tests/data/make_fixtures.py [--force-espeak]   (writes next to this script;
existing espeak WAVs are kept unless --force-espeak, see main())
"""
from __future__ import annotations

import json
import re
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

# Alignment fixture: digits, a one-word turn, a hyphenated word and an out-of-vocabulary name.
ALIGN = [
    ("slt", "The 2 dogs ran 40 yards."),
    ("rms", "Yes."),
    ("awb", "A pot of tea helps to pass the evening."),
    ("slt", "The well-worn path led to Zorvath's hut."),
    ("rms", "The small pup gnawed a hole in the sock."),
    ("awb", "The fish twisted and turned on the bent hook."),
    ("slt", "Press the pants and sew a button on the vest."),
    ("rms", "Her purse was full of 12 useless coins."),
]

# Diarization fixtures: 2, 3 and 4 distinct flite voices, several turns per speaker (speakers
# recur, in varied order), one two-sentence turn, short and varied gaps (DIAR_GAPS).
DIAR_2SPK = [
    ("slt", "Kick the ball straight and follow through."),
    ("rms", "Help the woman get back to her feet."),
    ("slt", "Smoky fires lack flame and heat."),
    ("rms", "The salt breeze came across from the sea."),
    ("slt", "The swan dive was far short of perfect."),
    ("rms", "The beauty of the view stunned the young boy."),
    ("slt", "Two blue fish swam in the tank."),
    ("rms", "The colt reared and threw the tall rider."),
    ("slt", "Read verse out loud for pleasure. Hoist the load to your left shoulder."),
    ("rms", "Take the winding path to reach the lake."),
    ("slt", "Note closely the size of the gas tank."),
    ("rms", "Wipe the grease off his dirty face."),
    ("slt", "Mend the coat before you go out."),
    ("rms", "The stray cat gave birth to kittens."),
]

DIAR_3SPK = [
    ("awb", "The young girl gave no clear response."),
    ("slt", "The meal was cooked before the bell rang."),
    ("rms", "A king ruled the state in the early days."),
    ("awb", "The ship was torn apart on the sharp reef."),
    ("rms", "Sickness kept him home the third week."),
    ("slt", "The wide road shimmered in the hot sun."),
    ("awb", "The lazy cow lay in the cool grass."),
    ("slt", "Lift the square stone over the fence."),
    ("rms", "The rope will bind the seven books at once."),
    ("awb", "Hop over the fence and plunge in."),
    ("slt", "The friendly gang left the drug store."),
    ("rms", "The frosty air passed through the coat."),
    ("slt", "The crooked maze failed to fool the mouse."),
    ("awb", "The show was a flop from the very start."),
    ("rms", "A saw is a tool used for making boards."),
]

DIAR_4SPK = [
    ("slt", "The wagon moved on well oiled wheels."),
    ("kal16", "March the soldiers past the next hill."),
    ("rms", "A cup of sugar makes sweet fudge."),
    ("awb", "Place a rosebush near the porch steps."),
    ("kal16", "We talked of the side show in the circus."),
    ("slt", "Use a pencil to write the first draft."),
    ("awb", "He ran half way to the hardware store."),
    ("rms", "The clock struck to mark the third period."),
    ("kal16", "A small creek cut across the field."),
    ("slt", "Cars and busses stalled in snow drifts."),
    ("rms", "The set of china hit the floor with a crash."),
    ("awb", "This is a grand season for hikes on the road."),
    ("slt", "The dune rose from the edge of the water."),
    ("kal16", "Those words were the cue for the actor to leave."),
    ("awb", "A yacht slid around the point into the bay."),
    ("rms", "The two met while playing on the sand."),
]

# Silence after each turn of the diarization conversations, cycled (0.3-0.8 s).
DIAR_GAPS = (0.45, 0.3, 0.7, 0.5, 0.8, 0.35, 0.6, 0.4, 0.75, 0.55, 0.3, 0.65)

# Enrolment clips for speaker verification: one voice each, sentences used in no conversation.
ENROL = {
    "enrol_slt.wav": ("slt", "The ink stain dried on the finished page. The walled town was seized without a fight."),
    "enrol_rms.wav": ("rms", "A tame squirrel makes a nice pet. The heart beat strongly and with firm strokes."),
    "enrol_awb.wav": ("awb", "The pearl was worn in a thin silver ring. The fruit peel was cut in thick slices."),
    "enrol_kal16.wav": ("kal16", "The Navy attacked the big task force. See the cat glaring at the scared mouse."),
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


def flite(voice: str, text: str, tmp: Path) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """Synthesize ``text``; return the samples and flite's phones as (phone, end time)."""
    out = tmp / "u.wav"
    # -psdur only prints the phone segmentation; the waveform is the same as without it.
    proc = subprocess.run(
        ["flite", "-voice", voice, "-psdur", "-t", text, "-o", str(out)],
        check=True, capture_output=True, text=True,
    )
    phones = [(ph, float(t)) for ph, t in re.findall(r"(\S+?):([0-9.]+)", proc.stdout)]
    return read_wav(out), phones


def t2p(token: str) -> list[str]:
    """flite's phones for one token, without pauses and stress digits."""
    out = subprocess.run(["t2p", token], check=True, capture_output=True, text=True).stdout
    return [re.sub(r"\d", "", ph) for ph in out.split() if ph != "pau"]


def _assign_phones(sent: list[str], per_token: list[list[str]]) -> list[int]:
    """Token index for each phone of ``sent`` (the sentence's phones, pauses removed).

    When every phone matches the tokens' own phones (the usual case) this is a plain count;
    otherwise (post-lexical changes, e.g. a reduced or inserted phone) a minimum edit-distance
    alignment of the two strings maps each sentence phone to a token.
    """
    ref = [(ph, i) for i, phs in enumerate(per_token) for ph in phs]
    if [p for p, _ in ref] == sent:
        return [i for _, i in ref]
    n, m = len(sent), len(ref)
    cost = np.zeros((n + 1, m + 1))
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    for a in range(1, n + 1):
        for b in range(1, m + 1):
            sub = 0.0 if sent[a - 1] == ref[b - 1][0] else 1.0
            cost[a, b] = min(cost[a - 1, b - 1] + sub, cost[a - 1, b] + 1, cost[a, b - 1] + 1)
    if cost[n, m] > max(2, 0.2 * n):
        raise RuntimeError(f"flite's phones {sent} are too far from t2p's {[p for p, _ in ref]}")
    owner: list[int | None] = [None] * n
    a, b = n, m
    while a > 0 and b > 0:
        sub = 0.0 if sent[a - 1] == ref[b - 1][0] else 1.0
        if cost[a, b] == cost[a - 1, b - 1] + sub:
            owner[a - 1] = ref[b - 1][1]
            a, b = a - 1, b - 1
        elif cost[a, b] == cost[a - 1, b] + 1:
            a -= 1  # phone only in the sentence: owned by a neighbour below
        else:
            b -= 1
    last = 0
    for k in range(n):  # inserted phones belong to the preceding word
        if owner[k] is None:
            owner[k] = last
        last = owner[k]
    return owner  # type: ignore[return-value]


def word_times(text: str, phones: list[tuple[str, float]]) -> list[tuple[str, float, float]]:
    """(token, start, end) per whitespace token, in the time base of flite's output."""
    tokens = text.split()
    per_token = [t2p(tok) for tok in tokens]
    prev_end: list[float] = []  # end time of the phone before each non-pause phone
    sent: list[tuple[str, float]] = []
    t_prev = 0.0
    for ph, t in phones:
        if ph != "pau":
            prev_end.append(t_prev)
            sent.append((ph, t))
        t_prev = t
    owner = _assign_phones([p for p, _ in sent], per_token)
    words = []
    for i, tok in enumerate(tokens):
        idx = [k for k, o in enumerate(owner) if o == i]
        if not idx:
            raise RuntimeError(f"no phones for token {tok!r} in {text!r}")
        words.append((tok, prev_end[idx[0]], sent[idx[-1]][1]))
    return words


def espeak(lang: str, text: str, tmp: Path) -> np.ndarray:
    raw = tmp / "e.wav"
    subprocess.run(["espeak-ng", "-v", lang, "-s", "150", "-w", str(raw), text], check=True)
    # espeak-ng writes 22.05 kHz; resample with sox to 16 kHz. sox dithers with a random seed
    # unless -R (repeatable) is given; -R keeps reruns byte-identical from now on.
    out = tmp / "e16.wav"
    subprocess.run(["sox", "-R", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(out)], check=True)
    return read_wav(out)


def conversation(turns, tmp: Path, gaps=None) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Concatenate the turns with ``gaps`` (cycled; default GAP_S) of silence between them."""
    pieces = [np.zeros(int(LEAD_S * SR), np.int16)]
    t = LEAD_S
    meta = []
    words = []
    for k, (voice, text) in enumerate(turns):
        gap = GAP_S if gaps is None else gaps[k % len(gaps)]
        audio, phones = flite(voice, text, tmp)
        # trim flite's own leading/trailing near-silence so turn bounds are tight
        nz = np.flatnonzero(np.abs(audio) > 200)
        lead = nz[0] / SR if nz.size else 0.0
        audio = audio[nz[0] : nz[-1] + 1] if nz.size else audio
        dur = len(audio) / SR
        meta.append({"speaker": voice, "start": round(t, 3), "end": round(t + dur, 3), "text": text})
        for tok, ws, we in word_times(text, phones):
            # flite time -> file time; clip to the (trimmed) turn
            ws = min(max(t + ws - lead, t), t + dur)
            we = min(max(t + we - lead, t), t + dur)
            words.append({"word": tok, "start": round(ws, 3), "end": round(we, 3), "speaker": voice})
        pieces += [audio, np.zeros(int(gap * SR), np.int16)]
        t += dur + gap
    pieces[-1] = np.zeros(int(LEAD_S * SR), np.int16)
    return np.concatenate(pieces), meta, words


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Regenerate the speech fixtures in tests/data.")
    ap.add_argument("--force-espeak", action="store_true",
                    help="also remake the espeak-ng WAVs (kept as committed by default)")
    force_espeak = ap.parse_args(argv).force_espeak
    manifest: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)

        def flite_fixture(name: str, turns, gaps=None) -> None:
            audio, turns_meta, words = conversation(turns, tmp, gaps)
            write_wav(HERE / name, audio)
            manifest[name] = {
                "language": "en",
                "text": " ".join(t for _, t in turns),
                "turns": turns_meta,
                "words": words,
                "duration": round(len(audio) / SR, 3),
            }

        for name, turns in (
            ("sample_2spk.wav", CONVERSATION),
            ("heldout_3spk.wav", HELDOUT),
            ("align_3spk.wav", ALIGN),
        ):
            flite_fixture(name, turns)
        for name, (lang, text) in FOREIGN.items():
            if (HERE / name).exists() and not force_espeak:
                # The committed espeak WAVs were made with sox's random dither, so a rerun
                # cannot reproduce their bytes; keep them unless asked to remake them.
                audio = read_wav(HERE / name)
            else:
                audio = espeak(lang, text, tmp)
                write_wav(HERE / name, audio)
            manifest[name] = {"language": lang, "text": text, "duration": round(len(audio) / SR, 3)}
        # diarization conversations and enrolment clips (speaker verification)
        for name, turns in (("diar_2spk.wav", DIAR_2SPK), ("diar_3spk.wav", DIAR_3SPK), ("diar_4spk.wav", DIAR_4SPK)):
            flite_fixture(name, turns, DIAR_GAPS)
        for name, turn in ENROL.items():
            flite_fixture(name, [turn])
    (HERE / "fixtures.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    for k, v in manifest.items():
        print(f"{k}: {v['duration']} s")


if __name__ == "__main__":
    main()
