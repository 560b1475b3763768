"""The request/result contract: worker-compatible names, defaults, envelope and validation."""
from __future__ import annotations

import inspect

import pytest

from speech.errors import InvalidRequest
from speech.contracts import TranscribeParams, TranscriptionResult
from speech.schema import TranscriptionRequest

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
        ({"beam_size": "wide"}, "beam_size"),
        ({"patience": 0}, "patience"),
        ({"temperature_increment_on_fallback": 2}, "temperature_increment_on_fallback"),
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


def test_flow_docstring_describes_every_field():
    """Prefect reads parameter descriptions from the flow's docstring (statically, at deploy):
    every request field has its line."""
    from flows.transcribe import transcribe_audio

    doc = transcribe_audio.fn.__doc__
    missing = [name for name in TranscriptionRequest.model_fields if f"\n        {name}: " not in doc]
    assert not missing, missing


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


def test_the_original_workers_environment_names(monkeypatch, caplog):
    """STORAGE_*, PREFIX_TRANSCRIPTS and PRESIGN_TTL read as the settings they name; and
    WHISPERX_DEVICE=cuda on a machine without a GPU runs on the CPU with a warning, as the
    worker did (issue 14)."""
    import logging

    import ctranslate2

    from speech import models
    from speech.settings import Settings

    if ctranslate2.get_cuda_device_count() > 0:
        pytest.skip("a GPU is visible: nothing to fall back from")
    for k in ("RESULTS_BUCKET", "S3_BUCKET", "SWAMI_STORAGE_BUCKET", "RESULTS_PREFIX", "S3_PREFIX", "URL_EXPIRY",
              "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "SWAMI_STORAGE_ENDPOINT",
              "AWS_ACCESS_KEY_ID", "SWAMI_STORAGE_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "SWAMI_STORAGE_SECRET_KEY"):
        monkeypatch.delenv(k, raising=False)
    env = {"STORAGE_BUCKET": "b", "STORAGE_ENDPOINT": "http://minio:9000", "STORAGE_ACCESS_KEY": "ak",
           "STORAGE_SECRET_KEY": "sk", "PREFIX_TRANSCRIPTS": "tx/", "PRESIGN_TTL": "600", "WHISPERX_DEVICE": "cuda"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert (s.s3_bucket, s.s3_endpoint_url, s.s3_access_key, s.s3_secret_key.get_secret_value(), s.s3_prefix,
            s.url_expiry) == ("b", "http://minio:9000", "ak", "sk", "tx/", 600)
    with caplog.at_level(logging.WARNING, logger="speech.models"):
        assert models.resolve_device(s) == ("cpu", "int8")  # this machine has no GPU
    assert "WHISPERX_DEVICE=cuda but no CUDA device is visible: running on the CPU" in caplog.text


def test_the_workers_request_forms():
    """A whole RunPod job ({"id", "input"}), beam_size clipped like the worker, speaker samples as
    plain URLs or {name, file_path}, samples turning verification on, condition_on_previous_text
    on in the worker's envelope only (issue 14)."""
    job = {"id": "sync-123", "input": {"audio_file": "a.wav", "beam_size": 50,
                                       "speaker_samples": ["https://h/x.wav?name=ann", {"name": "bo", "file_path": "/b.wav"}]}}
    req = TranscriptionRequest.parse(job)
    assert req.beam_size == 10 and req.condition_on_previous_text is True and req.speaker_verification is True
    assert [(s.name, s.url) for s in req.speaker_samples] == [(None, "https://h/x.wav?name=ann"), ("bo", "/b.wav")]
    plain = TranscriptionRequest.parse({"audio_file": "a.wav", "beam_size": 0})
    assert plain.beam_size == 1 and plain.condition_on_previous_text is None
    opts = TranscribeParams.from_request(TranscriptionRequest.parse(
        {"audio_file": "a.wav", "temperature": 0.4, "temperature_increment_on_fallback": 0.3, "hotwords": "Prefect",
         "suppress_numerals": True, "patience": 2})).asr_options()
    assert opts["temperatures"] == [0.4, 0.7, 1.0] and opts["hotwords"] == "Prefect" and opts["patience"] == 2
    assert opts["condition_on_previous_text"] is False and opts["suppress_numerals"] is True
