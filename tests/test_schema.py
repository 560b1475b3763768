"""The request/result contract: worker-compatible names, defaults, envelope and validation."""
from __future__ import annotations

import inspect

import pytest

from speech.errors import InvalidRequest
from speech.schema import TranscribeParams, TranscriptionRequest, TranscriptionResult

WORKER_DEFAULTS = {
    "language": None,
    "language_detection_min_prob": 0,
    "language_detection_max_tries": 5,
    "initial_prompt": None,
    "batch_size": 64,
    "temperature": 0,
    "vad_onset": 0.500,
    "vad_offset": 0.363,
    "align_output": False,
    "diarization": False,
    "huggingface_access_token": None,
    "min_speakers": None,
    "max_speakers": None,
    "debug": False,
    "speaker_verification": False,
    "speaker_samples": [],
}


def test_worker_inputs_and_defaults():
    req = TranscriptionRequest.parse({"audio_file": "a.wav"})
    for name, default in WORKER_DEFAULTS.items():
        assert getattr(req, name) == default, name


def test_envelope_and_language_names():
    req = TranscriptionRequest.parse({"input": {"audio_file": "a.wav", "language": "German", "batch_size": 8}})
    assert (req.audio_file, req.language, req.batch_size) == ("a.wav", "de", 8)
    assert TranscriptionRequest.parse(audio_file="a.wav", language="").language is None


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"temperature": 1.5}, "temperature"),
        ({"vad_onset": 0}, "vad_onset"),
        ({"vad_offset": 1.0}, "vad_offset"),
        ({"language": "klingon"}, "unknown language"),
        ({"min_speakers": 3, "max_speakers": 2}, "must not exceed"),
        ({"num_speakers": 5, "max_speakers": 2}, "num_speakers"),
        ({"language_detection_max_tries": 0}, "language_detection_max_tries"),
        ({"language_detection_min_prob": 2}, "language_detection_min_prob"),
        ({"beam_size": 0}, "beam_size"),
        ({"langauge": "en"}, "langauge: unknown parameter"),
        ({"speaker_verification": True}, "speaker_samples"),
        ({"output_name": "../etc/passwd"}, "output_name"),
        ({"audio_file": "ftp://host/a.wav"}, "unsupported URL scheme"),
        ({"audio_file": ""}, "audio_file"),
    ],
)
def test_invalid_parameters_give_one_clear_error(params, fragment):
    with pytest.raises(InvalidRequest) as info:
        TranscriptionRequest.parse({"audio_file": "a.wav", **params})
    msg = str(info.value)
    assert msg.startswith("invalid request:") and fragment in msg and "\n" not in msg


def test_token_is_secret_everywhere():
    req = TranscriptionRequest.parse({"audio_file": "a.wav", "huggingface_access_token": "hf_supersecret"})
    assert req.huggingface_access_token.get_secret_value() == "hf_supersecret"
    for text in (repr(req), str(req), str(req.public_dict()), req.model_dump_json()):
        assert "hf_supersecret" not in text
    assert "huggingface_access_token" not in req.public_dict()


def test_transcribe_params_are_the_stage_subset():
    req = TranscriptionRequest.parse({"audio_file": "a.wav", "batch_size": 4, "diarization": True, "model": "x"})
    params = TranscribeParams.from_request(req)
    assert params.batch_size == 4 and params.model == "x"
    assert "diarization" not in params.model_dump()
    # changing a non-transcription setting leaves the transcribe stage's parameters unchanged
    other = TranscribeParams.from_request(req.model_copy(update={"diarization": False, "debug": True}))
    assert other == params


def test_flow_signature_matches_request_fields():
    from flows.transcribe import transcribe_audio

    sig = inspect.signature(transcribe_audio.fn)
    fields = TranscriptionRequest.model_fields
    assert list(sig.parameters) == list(fields)
    for name, param in sig.parameters.items():
        field = fields[name]
        if field.is_required():
            assert param.default is inspect.Parameter.empty, name
        elif name == "speaker_samples":
            assert param.default is None
        else:
            assert param.default == field.default, name


def test_flow_parameter_schema_is_a_typed_form():
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    schema = parameter_schema_from_entrypoint("flows/transcribe.py:transcribe_audio").model_dump()
    props = schema["properties"]
    assert schema["required"] == ["audio_file"]
    assert props["batch_size"]["default"] == 64 and props["batch_size"]["type"] == "integer"
    assert "description" in props["vad_onset"] and "description" in props["language"]
    token = props["huggingface_access_token"]
    assert any(t.get("format") == "password" for t in token.get("anyOf", [token]))


def test_result_schema_matches_worker_shape():
    data = {
        "segments": [
            {"start": 0.0, "end": 1.0, "text": "hi", "words": [{"word": "hi", "start": 0.0, "end": 0.5, "score": 0.9}]}
        ],
        "detected_language": "en",
        "language_probability": 0.99,
    }
    assert TranscriptionResult.model_validate(data).to_json() == data
    with pytest.raises(Exception):
        TranscriptionResult.model_validate({**data, "unexpected": 1})
