"""The align stage: backends, fallbacks and word-time accuracy on synthesized speech."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import samples
from speech.align.stage import align
from speech.align.words import split_sentences
from speech.asr.transcribe import transcribe
from speech.contracts import AlignParams, Segment, TimedWord, TranscribeParams, Transcript


def transcript_of(segments: list[tuple[float, float, str]], language: str = "en") -> Transcript:
    from speech.asr.whisper import resolve_model

    spec = resolve_model(None)
    return Transcript(
        segments=[Segment(start=a, end=b, text=t) for a, b, t in segments], language=language,
        model=spec.label, model_source=spec.source, device="cpu", compute_type="int8",
    )


def assert_well_formed(outcome, span: tuple[float, float]):
    assert outcome.segments
    last = span[0] - 1e-6
    for seg in outcome.segments:
        assert seg.words, seg
        for w in seg.words:
            assert w.start is not None and w.end is not None, w
            assert span[0] - 0.25 <= w.start <= w.end <= span[1] + 0.25, (w, span)
            assert w.start >= last - 1e-6, (w, last)  # monotonic
            last = w.start
        assert seg.start == seg.words[0].start and seg.end == max(w.end for w in seg.words)


@pytest.fixture(scope="module")
def sample_transcript():
    audio = samples("sample_2spk.wav")
    return audio, transcribe(audio, TranscribeParams(language="en", batch_size=8))


def test_whisper_backend_times_every_word(sample_transcript):
    audio, tr = sample_transcript
    out = align(audio, tr, AlignParams(backend="whisper"))
    assert out.backend == "whisper" and out.error is None
    assert_well_formed(out, (0.0, len(audio) / 16000))
    # punctuation kept, sentences become segments
    assert len(out.segments) == 8 and out.segments[0].words[-1].word.endswith(".")
    text = " ".join(w.word for s in out.segments for w in s.words)
    assert text == " ".join(s.text for s in tr.segments)


def test_whisper_backend_other_language():
    audio = samples("de_espeak.wav")
    tr = transcribe(audio, TranscribeParams())
    out = align(audio, tr, AlignParams(backend="whisper"))
    assert out.backend == "whisper" and tr.language == "de"
    assert_well_formed(out, (0.0, len(audio) / 16000))


def test_unavailable_backend_keeps_segment_times(sample_transcript):
    audio, tr = sample_transcript
    out = align(audio, tr, AlignParams(backend="wav2vec2"))  # default model needs the network here
    assert out.backend is None and "wav2vec2" in out.error
    assert out.segments == tr.segments
    assert out.summary() == {"backend": None, "error": out.error}


def test_auto_falls_back_offline(sample_transcript):
    audio, tr = sample_transcript
    out = align(audio, tr, AlignParams())
    assert out.backend in ("pocketsphinx", "whisper")
    assert_well_formed(out, (0.0, len(audio) / 16000))


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory) -> str:
    """A randomly initialised Wav2Vec2ForCTC + processor saved like a hub model directory."""
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    d = tmp_path_factory.mktemp("tiny-w2v2")
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, "'": 3, **{c: i + 4 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    (d / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(d / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    processor = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(), tokenizer=tokenizer)
    config = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
    )
    import torch

    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).save_pretrained(str(d))
    processor.save_pretrained(str(d))
    return str(d)


def test_wav2vec2_loads_a_local_directory_and_aligns(sample_transcript, tiny_wav2vec2):
    audio, tr = sample_transcript
    out = align(audio, tr, AlignParams(backend="wav2vec2", align_model=tiny_wav2vec2))
    assert out.backend == "wav2vec2", out.error
    assert_well_formed(out, (0.0, len(audio) / 16000))
    words = [w.word for s in out.segments for w in s.words]
    assert words == " ".join(s.text for s in tr.segments).split()


def test_edge_cases_digits_single_word_long_segment_and_silence():
    audio = samples("sample_2spk.wav")
    long_audio = np.concatenate([audio, audio])  # a 46 s segment
    text = "The birch canoe slid on the smooth planks. " * 2
    tr = transcript_of([(0.3, 2.9, "The 2 birch-canoes slid, 100% smooth!"), (3.2, 6.0, "Glue."),
                        (7.0, 45.0, text.strip())])
    out = align(long_audio, tr, AlignParams(backend="whisper"))
    assert_well_formed(out, (0.0, len(long_audio) / 16000))
    words = [w.word for s in out.segments for w in s.words]
    assert words[:6] == ["The", "2", "birch-canoes", "slid,", "100%", "smooth!"] and "Glue." in words
    assert len(words) == 6 + 1 + len(text.split())
    silence = transcript_of([])
    assert align(np.zeros(16000, np.float32), silence).segments == []


def test_split_sentences_keeps_words():
    seg = Segment(start=0, end=3, text="Hi there. How are you?",
                  words=[TimedWord(word=w, start=i * 0.5, end=i * 0.5 + 0.4) for i, w in enumerate("Hi there. How are you?".split())])
    parts = split_sentences(seg)
    assert [p.text for p in parts] == ["Hi there.", "How are you?"]
    assert parts[1].start == 1.0 and parts[1].end == 2.4


@pytest.mark.parametrize("name", ["heldout_3spk.wav", "align_3spk.wav"])
def test_pipeline_word_times_within_30ms(name, manifest):
    """Transcribe + align (auto, offline) vs flite's ground truth: the acceptance metric."""
    from conftest import word_time_error

    audio = samples(name)
    tr = transcribe(audio, TranscribeParams(language="en", batch_size=8))
    out = align(audio, tr, AlignParams())
    assert out.backend == "pocketsphinx"
    hyp = [w.model_dump() for s in out.segments for w in s.words]
    start_err, end_err, matched = word_time_error(manifest[name]["words"], hyp)
    print(f"{name}: start MAE {start_err * 1000:.1f} ms, end MAE {end_err * 1000:.1f} ms over {matched} words")
    assert matched >= 0.85 * len(manifest[name]["words"])
    assert start_err <= 0.030 and end_err <= 0.030


def test_chunk_segment_resolution_keeps_the_transcripts_segments(sample_transcript):
    """segment_resolution=chunk (whisperx CLI's --segment_resolution): one aligned segment per
    transcription segment, the same words and times as the sentence split."""
    audio, tr = sample_transcript
    by_sentence = align(audio, tr, AlignParams(backend="pocketsphinx"))
    by_chunk = align(audio, tr, AlignParams(backend="pocketsphinx", segment_resolution="chunk"))
    assert len(by_sentence.segments) == 8 and len(by_chunk.segments) == len(tr.segments)
    def timed(outcome):
        return [(w.word, w.start, w.end) for s in outcome.segments for w in s.words]

    assert timed(by_chunk) == timed(by_sentence)
    assert by_chunk.segments[0].start == by_sentence.segments[0].start


def test_char_alignments_from_wav2vec2_in_both_resolutions(sample_transcript, tiny_wav2vec2):
    """return_char_alignments: every character of each segment's text, in order, times within
    the segment; chunk resolution joins whisperx's sentences again, chars included; a backend
    without character times says so instead of failing."""
    audio, tr = sample_transcript
    for resolution in ("sentence", "chunk"):
        out = align(audio, tr, AlignParams(backend="wav2vec2", align_model=tiny_wav2vec2,
                                           segment_resolution=resolution, return_char_alignments=True))
        assert out.backend == "wav2vec2", out.error
        if resolution == "chunk":
            assert len(out.segments) == len(tr.segments)
        for seg in out.segments:
            assert "".join(c.char for c in seg.chars) == seg.text, (resolution, seg.text)
            timed = [c for c in seg.chars if c.start is not None]
            assert len(timed) >= len(seg.text.replace(" ", "")) * 0.8
            assert all(seg.start - 0.05 <= c.start <= c.end <= seg.end + 0.05 for c in timed)
    plain = align(audio, tr, AlignParams(backend="wav2vec2", align_model=tiny_wav2vec2))
    assert all(s.chars is None for s in plain.segments)
    sphinx = align(audio, tr, AlignParams(backend="pocketsphinx", return_char_alignments=True))
    assert sphinx.backend == "pocketsphinx" and "wav2vec2" in sphinx.summary()["chars_error"]
    assert all(s.chars is None for s in sphinx.segments)


def test_sentence_split_carries_chars():
    from speech.contracts import TimedChar

    text = "Hi there. How are you?"
    seg = Segment(start=0, end=3, text=text, chars=[TimedChar(char=c, start=i * 0.1) for i, c in enumerate(text)],
                  words=[TimedWord(word=w, start=i * 0.5, end=i * 0.5 + 0.4) for i, w in enumerate(text.split())])
    parts = split_sentences(seg)
    assert ["".join(c.char for c in p.chars) for p in parts] == ["Hi there.", "How are you?"]


def test_the_whisper_aligner_reuses_the_model_that_transcribed():
    """A run's own threads/compute type load a Whisper model of their own; the whisper aligner
    finds that one again instead of loading the default (and a run's device reaches the stages
    that have one)."""
    from speech.models import CACHE
    from speech.contracts import DiarizeParams
    from speech.schema import TranscriptionRequest

    audio = samples("sample_2spk.wav")[: 16000 * 6]
    tr = transcribe(audio, TranscribeParams(language="en", threads=1, compute_type="float32"))
    assert tr.threads == 1 and tr.compute_type == "float32"
    loads = CACHE.load_count
    out = align(audio, tr, AlignParams(backend="whisper"))
    assert out.backend == "whisper" and CACHE.load_count == loads
    req = TranscriptionRequest.parse({"audio_file": "a.wav", "device": "cpu"})
    assert AlignParams.from_request(req).device == "cpu" and DiarizeParams.from_request(req).device == "cpu"
