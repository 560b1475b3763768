"""Deepgram confidence: the real deepgram-sdk against a local server that speaks POST /v1/listen,
and the word matching / flags / unclear intervals on constructed word lists."""
from __future__ import annotations

import json
import logging

import pytest
from deepgram_stub import KEY, DeepgramServer, listen_response

from conftest import DATA
from speech.confidence.deepgram import deepgram_transcribe, deepgram_words
from speech.confidence.match import annotate, match_words
from speech.errors import ConfidenceError, InvalidRequest
from speech.contracts import DeepgramOptions, Segment, TimedWord
AUDIO = DATA / "heldout_3spk.wav"


@pytest.fixture
def fast_backoff(monkeypatch):
    """The SDK's own backoff starts at 1 s; shrink it so the retry test stays fast."""
    import deepgram.core.http_client as hc

    monkeypatch.setattr(hc, "INITIAL_RETRY_DELAY_SECONDS", 0.01)


# ----------------------------------------------------------------------------------
# the request, through the real SDK


def test_file_bytes_with_query_options(caplog):
    caplog.set_level(logging.DEBUG)
    opts = DeepgramOptions(model="nova-2", tier="enhanced", version="latest", language="de")
    with DeepgramServer(["ok"]) as srv:
        out = deepgram_transcribe(api_key=KEY, audio_path=str(AUDIO), options=opts, base_url=srv.url)
    assert len(srv.requests) == 1
    req = srv.requests[0]
    assert req["path"] == "/v1/listen"
    assert req["auth"] == f"Token {KEY}"
    assert req["query"]["model"] == ["nova-2"]
    assert req["query"]["tier"] == ["enhanced"]
    assert req["query"]["version"] == ["latest"]
    assert req["query"]["language"] == ["de"]
    assert req["body"] == AUDIO.read_bytes()  # the raw audio, nothing else in the body
    assert req["content_type"] == "audio/wav"
    assert out["metadata"]["model_info"]["30089e05-99d1-4376-b32e-c263170674af"]["name"] == "nova-2"
    words = deepgram_words(out)
    assert [w["word"] for w in words] == ["hello", "world"]
    assert words[0] == {"word": "hello", "start": 0.1, "end": 0.4, "confidence": 0.98, "punctuated_word": "Hello"}
    assert KEY not in json.dumps(out) and KEY not in caplog.text


def test_url_in_json_body_options_in_query(monkeypatch):
    presigned = "https://bucket.example.com/audio/x.wav?X-Amz-Signature=abc&X-Amz-Expires=3600"
    with DeepgramServer(["ok"]) as srv:
        monkeypatch.setenv("DEEPGRAM_BASE_URL", srv.url)  # env fallback for the base URL
        out = deepgram_transcribe(api_key=KEY, url=presigned, options=DeepgramOptions())
    req = srv.requests[0]
    assert json.loads(req["body"]) == {"url": presigned}  # model/tier/version NOT in the body
    assert req["content_type"].startswith("application/json")
    assert req["query"]["model"] == ["nova-3"]
    assert "tier" not in req["query"] and "version" not in req["query"]
    assert len(deepgram_words(out)) == 2


def test_429_then_success_is_retried(fast_backoff):
    with DeepgramServer(["429", "500", "ok"]) as srv:
        out = deepgram_transcribe(api_key=KEY, audio_path=str(AUDIO), options=DeepgramOptions(),
                                  base_url=srv.url, max_retries=3)
    assert len(srv.requests) == 3
    assert len(deepgram_words(out)) == 2


def test_429_exhausts_retries_retryable_error(fast_backoff):
    with DeepgramServer(["429"]) as srv:
        with pytest.raises(ConfidenceError) as ei:
            deepgram_transcribe(api_key=KEY, audio_path=str(AUDIO), options=DeepgramOptions(),
                                base_url=srv.url, max_retries=2)
    assert len(srv.requests) == 3  # 1 + 2 retries
    assert ei.value.retryable and "429" in str(ei.value)


def test_401_clear_error_not_retried(fast_backoff, caplog):
    caplog.set_level(logging.DEBUG)
    with DeepgramServer(["401"]) as srv:
        with pytest.raises(ConfidenceError) as ei:
            deepgram_transcribe(api_key=KEY, audio_path=str(AUDIO), options=DeepgramOptions(), base_url=srv.url)
    assert len(srv.requests) == 1
    err = ei.value
    assert not err.retryable
    msg = str(err)
    assert "401" in msg and "DEEPGRAM_API_KEY" in msg and "\n" not in msg
    assert KEY not in msg and KEY not in caplog.text  # the server echoed the key back: scrubbed
    assert err.__context__ is None and err.__cause__ is None


def test_malformed_json_clear_error():
    with DeepgramServer(["malformed"]) as srv:
        with pytest.raises(ConfidenceError, match="malformed JSON") as ei:
            deepgram_transcribe(api_key=KEY, audio_path=str(AUDIO), options=DeepgramOptions(), base_url=srv.url)
    assert len(srv.requests) == 1 and not ei.value.retryable


def test_json_in_makes_no_request(tmp_path):
    saved = tmp_path / "x.deepgram.json"
    saved.write_text(json.dumps(listen_response("nova-3")))
    with DeepgramServer(["ok"]) as srv:
        out = deepgram_transcribe(api_key="", options=DeepgramOptions(), base_url=srv.url, json_in=str(saved))
    assert srv.requests == []
    assert [w["confidence"] for w in deepgram_words(out)] == [0.98, 0.42]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        deepgram_transcribe(api_key="", options=DeepgramOptions(), json_in=str(bad))


def test_missing_key_and_bad_base_url(monkeypatch):
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    from speech.settings import get_settings

    clear = getattr(get_settings, "cache_clear", lambda: None)
    clear()
    try:
        with pytest.raises(InvalidRequest, match="DEEPGRAM_API_KEY"):
            deepgram_transcribe(api_key=None, audio_path=str(AUDIO), options=DeepgramOptions())
    finally:
        monkeypatch.undo()
        clear()  # no settings cached without the key outlive this test
    with pytest.raises(InvalidRequest, match="base URL"):
        deepgram_transcribe(api_key=KEY, audio_path=str(AUDIO), options=DeepgramOptions(), base_url="ftp://x")


# ----------------------------------------------------------------------------------
# matching, flags, unclear intervals


def dgw(start, end, conf, word="w"):
    return {"word": word, "start": start, "end": end, "confidence": conf}


def seg(words, speaker=None):
    tw = [TimedWord(word=w[0], start=w[1], end=w[2], speaker=w[3] if len(w) > 3 else None) for w in words]
    return Segment(start=tw[0].start, end=tw[-1].end, text=" ".join(w.word for w in tw), words=tw, speaker=speaker)


def test_match_one_to_one_window_and_midpoint_fallback():
    whisper = [(0.0, 0.3), (0.32, 0.5), (1.0, 1.2), (3.0, 3.2)]
    dg = [(0.0, 0.45), (1.30, 1.5), (2.0, 2.1), (9.0, 9.1)]
    # w0 and w1 both overlap dg0; w0 overlaps it more and takes it (one-to-one). w2 reaches dg1
    # within the 0.12 s window (gap 0.10) and takes it in pass 1. w1's nearest free midpoint
    # (dg2, 1.64 s away) and w3's (dg2, 1.05 s) are beyond the 1.0 s fallback cap -> None.
    assert match_words(whisper, dg) == [0, None, 1, None]
    # nearest midpoint fallback: w at 3.0-3.2 (mid 3.1), dg at 3.5-3.6 (gap 0.3 > 0.12) and 4.0-4.1
    assert match_words([(3.0, 3.2)], [(4.0, 4.1), (3.5, 3.6)]) == [1]
    # the window: a gap of 0.10 s is a candidate (w1), a gap of 0.40 s is not (w0); the only
    # Deepgram word is then taken, so w0 gets nothing from the fallback
    assert match_words([(0.0, 0.2), (0.3, 0.5)], [(0.6, 0.7)]) == [None, 0]
    # each Deepgram word once: two Whisper words, one Deepgram word
    assert match_words([(0.0, 0.2), (0.0, 0.2)], [(0.0, 0.2)]).count(0) == 1


def test_annotate_sets_word_confidence_and_flags():
    segments = [
        seg([("a", 0.0, 0.2), ("b", 0.3, 0.5), ("c", 0.6, 0.8)]),  # avg 0.9 -> high
        seg([("d", 2.0, 2.2), ("e", 2.3, 2.5)]),  # avg 0.5 -> low by average
        # avg (0.95*4 + 0.3 + 0.3)/6 = 0.733 but 0.1..? contiguous low 3.0-3.6 = 0.6 s -> low
        seg([("f", 3.0, 3.3), ("g", 3.35, 3.6), ("h", 3.7, 3.9), ("i", 4.0, 4.2), ("j", 4.3, 4.5), ("k", 4.6, 4.8)]),
        seg([("l", 6.0, 6.2), ("m", 6.3, 6.5)]),  # avg 0.7 -> neither -> None
        seg([("n", 8.0, 8.2)]),  # no Deepgram word near -> no confidence
    ]
    dg = [dgw(0.0, 0.2, 0.9), dgw(0.3, 0.5, 0.95), dgw(0.6, 0.8, 0.85),
          dgw(2.0, 2.2, 0.5), dgw(2.3, 2.5, 0.5),
          dgw(3.0, 3.3, 0.3), dgw(3.35, 3.6, 0.3), dgw(3.7, 3.9, 0.95), dgw(4.0, 4.2, 0.95), dgw(4.3, 4.5, 0.95),
          dgw(4.6, 4.8, 0.95),
          dgw(6.0, 6.2, 0.7), dgw(6.3, 6.5, 0.7)]
    out, summary, unclear = annotate(segments, dg, model="nova-3")
    assert segments[0].words[0].confidence is None  # inputs untouched
    assert [w.confidence for w in out[0].words] == [0.9, 0.95, 0.85]
    assert [s.confidence_flag for s in out] == ["high", "low", "low", None, None]
    assert out[0].confidence == pytest.approx(0.9)
    assert out[2].confidence == pytest.approx((0.3 * 2 + 0.95 * 4) / 6, abs=1e-4)
    assert out[4].confidence is None and out[4].words[0].confidence is None
    assert summary["matched"] == 13 and summary["unmatched"] == 1 and summary["low_words"] == 4
    assert summary["model"] == "nova-3"
    assert summary["mean"] == pytest.approx(sum(d["confidence"] for d in dg) / 13, abs=1e-4)
    # a short low run does not flag: 0.25 s of low confidence in an otherwise high segment
    short = annotate([seg([("x", 0.0, 0.25), ("y", 0.3, 0.5), ("z", 0.6, 0.8), ("q", 0.9, 1.1)])],
                     [dgw(0.0, 0.25, 0.2), dgw(0.3, 0.5, 1.0), dgw(0.6, 0.8, 1.0), dgw(0.9, 1.1, 1.0)])[0]
    assert short[0].confidence_flag is None  # avg 0.8: not low, not high


def test_unclear_intervals_join_gap_and_speaker():
    segments = [
        seg([("one", 0.0, 0.3, "S1"), ("two", 0.5, 0.8, "S1"),  # gap 0.2 -> joined
             ("three", 1.3, 1.6, "S1"),  # gap 0.5 -> new interval
             ("four", 1.7, 1.9, "S2")], speaker=None),  # speaker change -> new interval
        seg([("five", 2.0, 2.2), ("six", 2.3, 2.5), ("seven", 2.6, 2.8)], speaker="S2"),
    ]
    dg = [dgw(0.0, 0.3, 0.1), dgw(0.5, 0.8, 0.2), dgw(1.3, 1.6, 0.3), dgw(1.7, 1.9, 0.4),
          dgw(2.0, 2.2, 0.5), dgw(2.3, 2.5, 0.99), dgw(2.6, 2.8, 0.1)]
    _, _, unclear = annotate(segments, dg)
    assert unclear == [
        {"start": 0.0, "end": 0.8, "speaker": "S1", "text": "one two"},
        {"start": 1.3, "end": 1.6, "speaker": "S1", "text": "three"},
        # "four" (word speaker S2) joins "five" (segment speaker S2) across the segment boundary
        {"start": 1.7, "end": 2.2, "speaker": "S2", "text": "four five"},
        # "six" is clear: it ends the run
        {"start": 2.6, "end": 2.8, "speaker": "S2", "text": "seven"},
    ]


def test_a_job_stopped_while_deepgram_answers_writes_nothing(prefect_harness, tmp_path, monkeypatch):
    """A task-worker job cancelled (or out of time) while it waits on Deepgram: the word stages
    are long done, the stop is seen at the checkpoint before the outputs, and nothing is written
    (before, the outputs were written and the job reported done)."""
    from prefect import flow

    from conftest import DATA
    from flows.pipeline import run_pipeline
    from speech.errors import SpeechError, Stopped
    from speech.schema import TranscriptionRequest
    from tasks.progress import checkpointing

    with DeepgramServer(["ok"], delay=12.0) as srv:
        monkeypatch.setenv("DEEPGRAM_BASE_URL", srv.url)
        monkeypatch.setenv("DEEPGRAM_API_KEY", KEY)

        def check() -> None:  # the job's guard: cancelled from outside once Deepgram has answered
            if srv.answered.is_set():
                raise Stopped("transcribe-job of a.wav was stopped: its run is Cancelled")

        @flow
        def job(request: dict) -> str:
            with checkpointing(check):
                try:
                    run_pipeline(TranscriptionRequest.parse(request))
                except SpeechError as exc:
                    return f"{type(exc).__name__}: {exc}"
            return "written"

        out = job({"audio_file": str(DATA / "sample_2spk.wav"), "language": "en", "download_dir": str(tmp_path)})
    assert srv.requests and out.startswith("Stopped") and "Cancelled" in out, out
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
