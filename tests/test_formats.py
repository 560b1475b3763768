"""Output files: worker JSON, segments JSON, SRT and VTT via whisperx's writers."""
from __future__ import annotations

import json

from speech.io.store import LocalStore
from speech.output.formats import render
from speech.contracts import Segment, TimedWord, TranscriptionResult


def result() -> TranscriptionResult:
    return TranscriptionResult(
        segments=[
            Segment(start=0.5, end=2.25, text="Hello there."),
            Segment(start=3661.0, end=3662.5, text="An hour later --> still here."),
        ],
        detected_language="en",
        language_probability=0.98,
    )


def test_render_all_outputs():
    files = render(result(), "talk")
    assert set(files) == {"talk.json", "talk.segments.json", "talk.srt", "talk.vtt"}
    full = json.loads(files["talk.json"])
    assert TranscriptionResult.model_validate(full) == result()
    assert json.loads(files["talk.segments.json"]) == full["segments"]
    srt = files["talk.srt"].decode()
    assert srt.startswith("1\n00:00:00,500 --> 00:00:02,250\nHello there.\n")
    assert "01:01:01,000 --> 01:01:02,500" in srt and "-->" not in srt.split("\n")[6]
    vtt = files["talk.vtt"].decode()
    assert vtt.startswith("WEBVTT\n") and "00:00.500 --> 00:02.250" in vtt


def test_words_and_speakers_drive_subtitles():
    r = TranscriptionResult(
        segments=[
            Segment(start=0.0, end=1.0, text="Hi Bob", speaker="Alice",
                    words=[TimedWord(word="Hi", start=0.1, end=0.4), TimedWord(word="Bob", start=0.5, end=0.9)]),
        ],
        detected_language="en",
    )
    srt = render(r, "x")["x.srt"].decode()
    assert "00:00:00,100 --> 00:00:00,900\n[Alice]: Hi Bob" in srt


def test_whisperx_cli_output_formats_and_subtitle_options():
    """output_format picks whisperx's writers (txt, tsv, aud, all); <stem>.json is always there
    (what consumers poll for); highlight_words and line limits reach the subtitle writers."""
    from speech.contracts import OutputOptions

    words = [TimedWord(word=w, start=0.1 + 0.4 * i, end=0.4 + 0.4 * i) for i, w in enumerate("one two three four".split())]
    r = TranscriptionResult(segments=[Segment(start=0.1, end=1.6, text="one two three four", words=words,
                                              speaker="SPEAKER_00")], detected_language="en")
    assert set(render(r, "t", options=OutputOptions(output_format="txt"))) == {"t.json", "t.txt"}
    every = render(r, "t", options=OutputOptions(output_format="all"))
    assert set(every) == {"t.json", "t.segments.json", "t.srt", "t.vtt", "t.txt", "t.tsv", "t.aud"}
    assert every["t.txt"].decode() == "[SPEAKER_00]: one two three four\n"
    assert every["t.tsv"].decode().splitlines() == ["start\tend\ttext", "100\t1600\tone two three four"]
    assert every["t.aud"].decode().startswith("0.1\t1.6\t[[SPEAKER_00]]one two three four")
    assert set(render(r, "t", options=OutputOptions(output_format="json"))) == {"t.json", "t.segments.json"}
    lit = render(r, "t", options=OutputOptions(output_format="srt", highlight_words=True))["t.srt"].decode()
    assert "<u>two</u>" in lit
    narrow = render(r, "t", options=OutputOptions(output_format="vtt", max_line_width=8, max_line_count=1))["t.vtt"]
    cues = [line for line in narrow.decode().splitlines() if line and "-->" not in line and line != "WEBVTT"]
    assert len(cues) >= 2 and all(len(c) <= len("[SPEAKER_00]: ") + 9 for c in cues), cues


def test_empty_result_renders():
    files = render(TranscriptionResult(segments=[], detected_language=None), "quiet")
    assert json.loads(files["quiet.json"]) == {"segments": [], "detected_language": None, "language_probability": None}
    assert files["quiet.srt"] == b"" and files["quiet.vtt"].startswith(b"WEBVTT")


def test_local_store_writes_all_or_nothing(tmp_path):
    store = LocalStore(tmp_path / "out")
    refs = store.write({"a.json": b"{}", "a.srt": b""})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "a.srt"]
    assert {r.name for r in refs} == {"a.json", "a.srt"}
