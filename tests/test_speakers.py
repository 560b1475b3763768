"""Speaker verification: names, enrolment, embeddings, one-to-one matching, relabelling.

Real encoder (resemblyzer GE2E, shipped in its wheel), real fixture audio: each voice is enrolled
from its turns in align_3spk.wav (clips written at test time), then the ground-truth turns of
other conversations (different sentences) are matched under arbitrary SPEAKER_XX labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SR
from conftest import samples as fixture_audio
from speech.errors import AudioError, InvalidRequest, ModelError
from speech.io.decode import write_wav as _write_wav
from speech.contracts import Segment, SpeakerInfo, TimedWord
from speech.schema import SpeakerSample
from speech.speakers import encoders, verify


def write_wav(path: Path, samples: np.ndarray) -> Path:
    _write_wav(samples, path)
    return path


def cut(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    return audio[int(start * SR):int(end * SR)]


@pytest.fixture(scope="module")
def encoder():
    return encoders.get_encoder("builtin")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, manifest):
    """Per voice: its turns of align_3spk.wav joined by 0.2 s pauses, as <voice>.wav."""
    audio = fixture_audio("align_3spk.wav")
    out = tmp_path_factory.mktemp("enrol")
    voices = sorted({t["speaker"] for t in manifest["align_3spk.wav"]["turns"]})
    for voice in voices:
        parts = []
        for t in manifest["align_3spk.wav"]["turns"]:
            if t["speaker"] == voice:
                parts += [cut(audio, t["start"], t["end"]), np.zeros(int(0.2 * SR), np.float32)]
        write_wav(out / f"{voice}.wav", np.concatenate(parts))
    return out


@pytest.fixture(scope="module")
def enrolled(clip_dir, encoder):
    # no names given: each is derived from the clip's file stem
    return verify.enroll([SpeakerSample(url=str(p)) for p in sorted(clip_dir.glob("*.wav"))], encoder)


def labelled_turns(manifest, name: str) -> tuple[list[tuple[float, float, str]], dict[str, str]]:
    """Ground-truth turns under arbitrary labels (voices in reverse order -> SPEAKER_00..)."""
    turns = manifest[name]["turns"]
    voices = sorted({t["speaker"] for t in turns}, reverse=True)
    label_of = {v: f"SPEAKER_{i:02d}" for i, v in enumerate(voices)}
    return [(t["start"], t["end"], label_of[t["speaker"]]) for t in turns], {l: v for v, l in label_of.items()}


def segments_from(manifest, name: str, label_of_voice: dict[str, str]) -> list[Segment]:
    segs = []
    for t in manifest[name]["turns"]:
        label = label_of_voice[t["speaker"]]
        words = [
            TimedWord(word=w["word"], start=w["start"], end=w["end"], speaker=label)
            for w in manifest[name]["words"]
            if t["start"] - 1e-3 <= w["start"] < t["end"]
        ]
        segs.append(Segment(start=t["start"], end=t["end"], text=t["text"], words=words, speaker=label))
    return segs


# ----------------------------------------------------------------------------------
# accuracy on the fixtures


@pytest.mark.parametrize("name", ["heldout_3spk.wav", "sample_2spk.wav"])
def test_enrolled_names_cover_the_speech_time(manifest, encoder, enrolled, name):
    assert sorted(enrolled) == ["awb", "rms", "slt"]
    turns, truth = labelled_turns(manifest, name)
    centroids = verify.speaker_embeddings(fixture_audio(name), turns, encoder)
    assert set(centroids) == set(truth)
    for vec in centroids.values():
        assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-4

    # the similarity bands the defaults were chosen from: same voice well above, others well below
    labels, names, sim = verify.similarity_matrix(centroids, enrolled)
    same = [sim[i, j] for i, l in enumerate(labels) for j, n in enumerate(names) if truth[l] == n]
    other = [sim[i, j] for i, l in enumerate(labels) for j, n in enumerate(names) if truth[l] != n]
    assert min(same) >= encoders.BUILTIN_THRESHOLD + 0.05, (labels, names, sim)
    assert max(other) <= encoders.BUILTIN_THRESHOLD - 0.03, (labels, names, sim)

    mapping = verify.match_names(centroids, enrolled)
    assert mapping == truth

    label_of_voice = {v: l for l, v in truth.items()}
    segs, speakers = verify.relabel(
        segments_from(manifest, name, label_of_voice),
        {l: SpeakerInfo(name=l, time=1.0) for l in truth},
        mapping,
    )
    total = sum(t["end"] - t["start"] for t in manifest[name]["turns"])
    right = sum(
        s.end - s.start for s, t in zip(segs, manifest[name]["turns"]) if s.speaker == t["speaker"]
    )
    assert right / total >= 0.95
    assert all(w.speaker == s.speaker for s in segs for w in s.words)
    assert {l: i.name for l, i in speakers.items()} == truth


def test_an_unenrolled_voice_keeps_its_label(manifest, encoder, enrolled):
    turns, truth = labelled_turns(manifest, "heldout_3spk.wav")
    centroids = verify.speaker_embeddings(fixture_audio("heldout_3spk.wav"), turns, encoder)
    two = {n: v for n, v in enrolled.items() if n != "awb"}
    mapping = verify.match_names(centroids, two)
    awb_label = next(l for l, v in truth.items() if v == "awb")
    assert mapping == {l: v for l, v in truth.items() if v != "awb"}
    label_of_voice = {v: l for l, v in truth.items()}
    segs, speakers = verify.relabel(
        segments_from(manifest, "heldout_3spk.wav", label_of_voice),
        {l: SpeakerInfo(name=l, time=1.0) for l in truth},
        mapping,
    )
    awb_segs = [s for s in segs if s.start < 3.0]  # awb speaks the first turn
    assert awb_segs and all(s.speaker == awb_label for s in awb_segs)
    assert speakers[awb_label].name == awb_label
    assert {s.speaker for s in segs} == {awb_label, "slt", "rms"}


def test_a_voice_clustered_into_another_is_named_turn_by_turn(manifest, clip_dir):
    """An under-merge (awb's turn put under slt's speaker): the speaker keeps slt's name, and awb,
    enrolled but given to no speaker, is found on its own turn under a new label (CAM++, the
    offline default encoder: bar = threshold + margin). Not enrolled, awb's turn is left alone."""
    enc = encoders.get_encoder("campplus")
    audio = fixture_audio("heldout_3spk.wav")
    turns, truth = labelled_turns(manifest, "heldout_3spk.wav")
    slt = next(l for l, v in truth.items() if v == "slt")
    merged = [(s, e, slt if truth[l] == "awb" else l) for s, e, l in turns]
    enrolled = verify.enroll([SpeakerSample(url=str(p)) for p in sorted(clip_dir.glob("*.wav"))], enc)
    centroids = verify.speaker_embeddings(audio, merged, enc)
    mapping = verify.match_names(centroids, enrolled, threshold=enc.threshold, margin=enc.margin)
    assert "awb" not in mapping.values() and mapping[slt] == "slt"

    out, named, scores = verify.name_turns(audio, merged, mapping, enrolled, enc, enc.threshold, enc.margin)
    assert [named[l] if l in named else l for _, _, l in out] == [truth[l] for _, _, l in turns]
    (new,) = scores
    assert new not in {l for _, _, l in merged} and named[new] == "awb" and scores[new] >= enc.threshold + enc.margin
    assert {l: n for l, n in named.items() if l != new} == mapping

    two = {n: v for n, v in enrolled.items() if n != "awb"}
    mapping = verify.match_names(centroids, two, threshold=enc.threshold, margin=enc.margin)
    assert verify.name_turns(audio, merged, mapping, two, enc, enc.threshold, enc.margin) == (merged, mapping, {})


def test_duplicate_names_are_pooled(tmp_path, manifest, encoder, enrolled):
    """Several clips with one name enrol one voice: the renormalised mean of their embeddings."""
    audio = fixture_audio("align_3spk.wav")
    slt_turns = [t for t in manifest["align_3spk.wav"]["turns"] if t["speaker"] == "slt"]
    clips = [write_wav(tmp_path / f"turn{i}.wav", cut(audio, t["start"], t["end"])) for i, t in enumerate(slt_turns)]
    samples = [SpeakerSample(name="Sally", url=str(p)) for p in clips]
    pooled = verify.enroll(samples, encoder)
    assert list(pooled) == ["Sally"]
    singles = [verify.enroll([s], encoder)["Sally"] for s in samples]
    expected = np.mean(singles, axis=0)
    expected /= np.linalg.norm(expected)
    assert np.allclose(pooled["Sally"], expected, atol=1e-5)
    # and the pooled voice is still slt's
    assert float(pooled["Sally"] @ enrolled["slt"]) > 0.9


def test_sample_over_http_named_by_query(http_server, encoder):
    out = verify.enroll([SpeakerSample(url=f"{http_server}/sample_2spk.wav?name=Guest%20Host")], encoder)
    assert list(out) == ["Guest Host"] and out["Guest Host"].shape == (256,)


# ----------------------------------------------------------------------------------
# bad samples


def test_404_sample_is_named(http_server, clip_dir, encoder):
    samples = [SpeakerSample(url=str(clip_dir / "slt.wav")), SpeakerSample(url=f"{http_server}/nobody.wav")]
    with pytest.raises(InvalidRequest, match=r"speaker sample 'nobody'.*404"):
        verify.enroll(samples, encoder)


def test_missing_local_sample(tmp_path, encoder):
    with pytest.raises(InvalidRequest, match=r"speaker sample 'Ann'.*not found"):
        verify.enroll([SpeakerSample(name="Ann", url=str(tmp_path / "gone.wav"))], encoder)


def test_non_audio_sample(tmp_path, encoder):
    notes = tmp_path / "notes.wav"
    notes.write_text("these are meeting notes, not audio\n" * 20)
    with pytest.raises(AudioError, match=r"speaker sample 'notes'.*not a readable audio file"):
        verify.enroll([SpeakerSample(url=str(notes))], encoder)


def test_too_short_sample(tmp_path, encoder):
    short = write_wav(tmp_path / "blip.wav", cut(fixture_audio("sample_2spk.wav"), 0.5, 1.0))
    with pytest.raises(AudioError, match=r"speaker sample 'blip'.*at least 1 s"):
        verify.enroll([SpeakerSample(url=str(short))], encoder)


def test_silent_sample(tmp_path, encoder):
    quiet = write_wav(tmp_path / "quiet.wav", np.zeros(2 * SR, np.float32))
    with pytest.raises(AudioError, match=r"speaker sample 'quiet'.*silent"):
        verify.enroll([SpeakerSample(url=str(quiet))], encoder)


def test_local_sample_with_name_fragment(clip_dir, encoder):
    out = verify.enroll([SpeakerSample(url=f"{clip_dir / 'rms.wav'}#Richard")], encoder)
    assert list(out) == ["Richard"]


# ----------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    "name, url, expected",
    [
        ("Alice", "http://h/clips/x.wav?name=Bob#Carol", "Alice"),
        (None, "http://h/clips/x.wav?name=Bob#Carol", "Bob"),
        (None, "https://h/clips/x.wav?X-Amz-Signature=abc#Carol%20King", "Carol King"),
        (None, "s3://bucket/voices/dave.mp3", "dave"),
        (None, "/srv/clips/Eve Smith.wav", "Eve Smith"),
        (None, "clips/frank.v2.flac", "frank.v2"),
        ("  José  Núñez ", "x.wav", "José Núñez"),
        ("../../etc/passwd", "x.wav", "etc passwd"),
        (None, "http://h/x.wav?name=..%2F..%2Fetc%2Fpasswd", "etc passwd"),
        (None, "http://h/a/..%2F..%2Fsecret.wav", "secret"),
        (None, "C:\\voices\\gina.wav", "gina"),
        ("Bob\x00\x1b[31m\nRed\u200b", "x.wav", "Bob [31m Red"),
        ("x" * 200, "x.wav", "x" * 64),
    ],
)
def test_derive_name(name, url, expected):
    got = verify.derive_name(SpeakerSample(name=name, url=url))
    assert got == expected
    assert "/" not in got and "\\" not in got and not got.startswith(".")
    assert all(ch.isprintable() for ch in got) and len(got) <= 64


@pytest.mark.parametrize(
    "name, url",
    [("   ", "x.wav"), ("../", "x.wav"), ("\x00\x07", "x.wav"), (None, "http://h/"), (None, "http://h/x/..%2F")],
)
def test_underivable_name_is_an_invalid_request(name, url):
    with pytest.raises(InvalidRequest, match="speaker name"):
        verify.derive_name(SpeakerSample(name=name, url=url))


# ----------------------------------------------------------------------------------
# matching and relabelling (unit level)


def unit(*xs):
    v = np.asarray(xs, np.float32)
    return v / np.linalg.norm(v)


def test_match_names_threshold_margin_and_one_to_one():
    enrolled = {"Alice": unit(1, 0, 0), "Bob": unit(0, 1, 0)}
    # both labels are closest to Alice: the closer gets her, the other is never Bob; it shares
    # Alice (one voice split in two) only at threshold + margin (0.962 >= 0.9; 0.845 < 0.9)
    centroids = {"SPEAKER_00": unit(1, 0.05, 0.1), "SPEAKER_01": unit(1, 0.2, 0.2)}
    assert verify.match_names(centroids, enrolled, threshold=0.8, margin=0.1) == {"SPEAKER_00": "Alice",
                                                                                "SPEAKER_01": "Alice"}
    centroids = {"SPEAKER_00": unit(1, 0.05, 0.1), "SPEAKER_01": unit(1, 0.2, 0.6)}
    assert verify.match_names(centroids, enrolled, threshold=0.8, margin=0.1) == {"SPEAKER_00": "Alice"}
    # below the threshold
    assert verify.match_names({"SPEAKER_00": unit(1, 0, 1.2)}, enrolled, threshold=0.8, margin=0.0) == {}
    # above the threshold but too close to a second name
    between = {"SPEAKER_00": unit(1, 0.95, 0)}  # 0.725 vs 0.689
    assert verify.match_names(between, enrolled, threshold=0.6, margin=0.1) == {}
    assert verify.match_names(between, enrolled, threshold=0.6, margin=0.0) == {"SPEAKER_00": "Alice"}
    # one enrolled name: no second best to beat
    assert verify.match_names({"SPEAKER_03": unit(0, 1, 0.1)}, {"Bob": unit(0, 1, 0)}) == {"SPEAKER_03": "Bob"}
    assert verify.match_names({}, enrolled) == {} and verify.match_names(centroids, {}) == {}


def test_relabel_puts_names_everywhere_and_keeps_keys():
    segs = [
        Segment(start=0, end=1, text="hi there", speaker="SPEAKER_00", words=[
            TimedWord(word="hi", start=0, end=0.4, speaker="SPEAKER_00"),
            TimedWord(word="there", start=0.5, end=1, speaker="SPEAKER_01"),
        ]),
        Segment(start=1, end=2, text="yes", speaker="SPEAKER_01", words=[TimedWord(word="yes", start=1, end=2, speaker="SPEAKER_01")]),
        Segment(start=2, end=3, text="hmm", speaker="SPEAKER_02", words=None),
        Segment(start=3, end=4, text="no speaker"),
    ]
    speakers = {f"SPEAKER_0{i}": SpeakerInfo(name=f"SPEAKER_0{i}", time=1.0 + i) for i in range(3)}
    new_segs, new_speakers = verify.relabel(segs, speakers, {"SPEAKER_00": "Alice", "SPEAKER_02": "Carol"},
                                            {"SPEAKER_00": 0.812345, "SPEAKER_02": 0.6})
    assert [s.speaker for s in new_segs] == ["Alice", "SPEAKER_01", "Carol", None]
    # the worker's per-segment keys beside the name: the label it came from and its similarity
    assert [(s.speaker_id, s.similarity) for s in new_segs] == [
        ("SPEAKER_00", 0.8123), (None, None), ("SPEAKER_02", 0.6), (None, None)]
    assert [w.speaker for w in new_segs[0].words] == ["Alice", "SPEAKER_01"]
    assert new_segs[1].words[0].speaker == "SPEAKER_01"
    assert list(new_speakers) == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_02"]
    assert {k: (v.name, v.time) for k, v in new_speakers.items()} == {
        "SPEAKER_00": ("Alice", 1.0), "SPEAKER_01": ("SPEAKER_01", 2.0), "SPEAKER_02": ("Carol", 3.0)
    }
    assert segs[0].speaker == "SPEAKER_00" and speakers["SPEAKER_00"].name == "SPEAKER_00"  # inputs untouched


def test_short_turns_are_skipped_and_long_ones_windowed(encoder):
    assert verify._windows(0.0, 0.4) == []
    wins = verify._windows(1.0, 8.5)
    assert len(wins) == 3 and all(e - s <= 3.0 + 1e-9 for s, e in wins) and wins[-1][1] == pytest.approx(8.5)
    audio = fixture_audio("sample_2spk.wav")
    out = verify.speaker_embeddings(audio, [(0.3, 2.4, "SPEAKER_00"), (3.1, 3.4, "SPEAKER_01")], encoder)
    assert list(out) == ["SPEAKER_00"]  # SPEAKER_01 has no turn of 0.5 s or more


# ----------------------------------------------------------------------------------
# encoder selection


@pytest.fixture
def fresh_encoders(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPEAKER_ENCODER_DIR", raising=False)
    encoders.clear_encoders()
    yield monkeypatch
    encoders.clear_encoders()


def test_auto_prefers_campplus_offline_and_falls_back_to_builtin(fresh_encoders, tmp_path):
    """Offline, no ECAPA: auto takes CAM++ (installed by `make setup`), with its own calibration;
    without CAM++ weights, the builtin GE2E."""
    enc = encoders.get_encoder("auto")
    assert enc.name == "campplus" and encoders.encoder_defaults(enc) == (enc.threshold, enc.margin) == (0.45, 0.10)
    assert encoders.get_encoder("campplus") is enc
    fresh_encoders.setenv("CAMPPLUS_WEIGHTS", str(tmp_path / "missing.pt"))
    from speech.settings import get_settings

    get_settings.cache_clear()
    encoders.clear_encoders()
    with pytest.raises(ModelError, match="CAMPPLUS_WEIGHTS"):
        encoders.get_encoder("campplus")
    enc = encoders.get_encoder("auto")
    fresh_encoders.delenv("CAMPPLUS_WEIGHTS")
    get_settings.cache_clear()
    assert enc.name.startswith("builtin") and encoders.encoder_defaults(enc) == (encoders.BUILTIN_THRESHOLD, encoders.BUILTIN_MARGIN)
    assert encoders.get_encoder("auto") is enc and encoders.get_encoder("builtin") is enc
    with pytest.raises(InvalidRequest, match="unknown speaker encoder"):
        encoders.get_encoder("xvector")


def test_ecapa_dir_without_model(fresh_encoders, tmp_path):
    fresh_encoders.setenv("SPEAKER_ENCODER_DIR", str(tmp_path))
    with pytest.raises(ModelError, match="hyperparams.yaml"):
        encoders.get_encoder("ecapa")
    assert encoders.get_encoder("auto").name == "campplus"  # the next in line


TINY_ECAPA = """\
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
n_mels: 80
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [32, 32, 32, 32, 96]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 8
    lin_neurons: 24
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


def test_ecapa_loads_from_a_local_directory(fresh_encoders, tmp_path):
    """A local copy laid out like the hub repo (its yaml still names the hub) loads offline.

    The weights are random (the real ones are not available offline); this checks the loading
    path and the embedding contract, not accuracy."""
    import torch
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    model_dir = tmp_path / "ecapa"
    model_dir.mkdir()
    (model_dir / "hyperparams.yaml").write_text(TINY_ECAPA)
    torch.manual_seed(0)
    net = ECAPA_TDNN(80, channels=[32, 32, 32, 32, 96], attention_channels=8, lin_neurons=24)
    torch.save(net.state_dict(), model_dir / "embedding_model.ckpt")
    fresh_encoders.setenv("SPEAKER_ENCODER_DIR", str(model_dir))

    enc = encoders.get_encoder("ecapa")
    assert enc.name == f"ecapa:{model_dir}" and encoders.encoder_defaults(enc) == (encoders.ECAPA_THRESHOLD, encoders.ECAPA_MARGIN)
    assert encoders.get_encoder("auto") is enc
    vec = enc.embed(fixture_audio("sample_2spk.wav")[: 2 * SR])
    assert vec.shape == (24,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    again = enc.embed(fixture_audio("sample_2spk.wav")[: 2 * SR])
    assert np.allclose(vec, again, atol=1e-5)


def test_explain_says_why_a_speaker_kept_its_label():
    enrolled = {"Alice": np.array([1.0, 0.0, 0.0]), "Bob": np.array([0.0, 1.0, 0.0]), "Cleo": np.array([0.0, 0.0, 1.0])}
    centroids = {"SPEAKER_00": np.array([0.98, 0.1, 0.0]), "SPEAKER_01": np.array([0.4, 0.4, 0.8])}
    mapping = verify.match_names(centroids, enrolled, threshold=0.9, margin=0.1)
    out = verify.explain(centroids, enrolled, mapping, threshold=0.9, margin=0.1)
    assert out["names"] == {"SPEAKER_00": "Alice"}
    why = out["unnamed"]["SPEAKER_01"]
    assert why["closest"] == "Cleo" and why["score"] < 0.9 and "below the threshold 0.90" in why["reason"]
    assert "found 2 speaker(s) for 3 enrolled names" in out["note"] and "Bob" in out["note"]
