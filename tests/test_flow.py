"""Real Prefect flow runs (one shared test harness): outputs, S3, caching, artifacts, secrets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from speech import models
from speech.errors import AudioError, FetchError, InvalidRequest
from speech.contracts import TranscriptionResult
from conftest import DATA, wer, wer_limit

pytestmark = pytest.mark.prefect


def run(**kwargs):
    from flows.transcribe import transcribe_audio

    state = transcribe_audio(return_state=True, **kwargs)
    return state, state.result(raise_on_failure=False)


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def task_states(flow_run_id) -> dict[str, str]:
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in _task_runs(flow_run_id)}


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _completed_event(sha256: str, flow_run_id):
    """The whisperx.transcript.completed event of an audio in one flow run, read back from the API
    (other tests transcribe the same audio: the event names its flow run as a related resource)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.clients import get_events_client  # noqa: F401 - registers the worker's client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)
    flt = EventFilter(event=EventNameFilter(name=["whisperx.transcript.completed"]),
                      resource=EventResourceFilter(id=[f"whisperx.audio.{sha256}"]),
                      related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]))
    deadline = time.monotonic() + 20
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=flt, limit=10).events
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert events, "no whisperx.transcript.completed event"
    return events[0]


def read_flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_flow_writes_worker_outputs_and_artifacts(prefect_harness, tmp_path, manifest):
    out = tmp_path / "out"
    state, result = run(audio_file=str(DATA / "sample_2spk.wav"), download_dir=str(out), debug=True,
                        huggingface_access_token="hf_do_not_store_me")
    assert state.is_completed(), state
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_2spk.json", "sample_2spk.segments.json", "sample_2spk.srt", "sample_2spk.vtt",
    ]
    stored = json.loads((out / "sample_2spk.json").read_text())
    TranscriptionResult.model_validate(stored)
    assert stored == result
    assert stored["detected_language"] == "en" and stored["language_probability"] > 0.9
    assert wer(manifest["sample_2spk.wav"]["text"], " ".join(s["text"] for s in stored["segments"])) <= wer_limit("sample_2spk.wav")
    assert set(stored["debug"]) >= {"transcribe_timings", "model_load_seconds", "peak_memory_mb", "stage_seconds"}
    assert "-->" in (out / "sample_2spk.srt").read_text()

    # the token was used but is stored nowhere: not in parameters, results or outputs
    flow_run = read_flow_run(state.state_details.flow_run_id)
    assert "hf_do_not_store_me" not in json.dumps(flow_run.parameters)
    assert all("hf_do_not_store_me" not in p.read_text() for p in out.iterdir())

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    kinds = {a.type for a in arts}
    assert {"markdown", "table", "progress"} <= kinds
    summary = next(a for a in arts if a.type == "markdown").data
    assert "language" in summary and "real-time factor" in summary and "sample_2spk.json" in summary
    progress = next(a for a in arts if a.type == "progress")
    assert float(progress.data) == 100.0

    # an event for automations: resource = the audio's sha256, payload = where the outputs went
    event = _completed_event(stored["debug"]["audio_sha256"], flow_run.id)
    assert event.resource.name == "sample_2spk" and event.payload["language"] == "en"
    assert sorted(event.payload["outputs"]) == sorted(str(p.resolve()) for p in out.iterdir())


def test_s3_outputs_and_content_addressed_cache(prefect_harness, s3, tmp_path):
    s3.create_bucket(Bucket="results")
    s3.create_bucket(Bucket="media")
    s3.upload_file(str(DATA / "heldout_3spk.wav"), "media", "in/held.wav")
    state, result = run(audio_file="s3://media/in/held.wav", bucket="results", prefix_transcripts="tx/", language="en")
    assert state.is_completed(), state
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="results")["Contents"])
    assert keys == ["tx/held.json", "tx/held.segments.json", "tx/held.srt", "tx/held.vtt"]
    body = json.loads(s3.get_object(Bucket="results", Key="tx/held.json")["Body"].read())
    assert body == result and body["segments"]
    # the run's outputs table links each object on the store's endpoint (not presigned)
    table = next(a for a in _artifacts(state.state_details.flow_run_id) if a.type == "table")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    urls = {r["file"]: r["url"] for r in rows}
    assert urls["held.json"] == f"{s3.meta.endpoint_url}/results/tx/held.json"
    assert all("Signature" not in u for u in urls.values())
    assert task_states(state.state_details.flow_run_id)["transcribe"] == "Completed"

    # same bytes, another path and name: the transcription is a cache hit, no model loads
    copy = tmp_path / "another name.wav"
    shutil.copy(DATA / "heldout_3spk.wav", copy)
    loads = models.CACHE.load_count
    state2, result2 = run(audio_file=str(copy), bucket="results", prefix_transcripts="tx/", language="en")
    assert state2.is_completed()
    assert task_states(state2.state_details.flow_run_id)["transcribe"] == "Cached"
    assert models.CACHE.load_count == loads
    assert result2["segments"] == result["segments"]
    assert "tx/another_name.json" in {o["Key"] for o in s3.list_objects_v2(Bucket="results")["Contents"]}

    # changing a transcription parameter is a miss
    state3, _ = run(audio_file=str(copy), bucket="results", prefix_transcripts="tx/", language="en", beam_size=2)
    assert task_states(state3.state_details.flow_run_id)["transcribe"] == "Completed"


def _bad_inputs(tmp_path: Path, http_server: str) -> list[tuple[dict, type, str]]:
    data = (DATA / "sample_2spk.wav").read_bytes()
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.wav").write_text("not audio at all\n" * 40)
    return [
        ({"audio_file": str(tmp_path / "missing.wav")}, FetchError, "not found"),
        ({"audio_file": f"{http_server}/missing.wav"}, FetchError, "404"),
        ({"audio_file": str(tmp_path / "empty.wav")}, AudioError, "empty"),
        ({"audio_file": str(tmp_path / "cut.wav")}, AudioError, "truncated"),
        ({"audio_file": str(tmp_path / "text.wav")}, AudioError, "not a readable audio file"),
        ({"audio_file": str(DATA / "sample_2spk.wav"), "batch_size": 0}, InvalidRequest, "batch_size"),
        ({"audio_file": str(DATA / "sample_2spk.wav"), "language": "xx"}, InvalidRequest, "unknown language"),
    ]


def test_bad_inputs_fail_clearly_and_write_nothing(prefect_harness, tmp_path, http_server):
    out = tmp_path / "out"
    for params, exc_type, fragment in _bad_inputs(tmp_path, http_server):
        state, exc = run(download_dir=str(out), **params)
        assert state.is_failed(), params
        assert isinstance(exc, exc_type) and fragment in str(exc), (params, exc)
        assert not out.exists() or not any(out.iterdir()), params


def test_silence_is_an_empty_transcript_not_an_error(prefect_harness, tmp_path):
    import wave

    path = tmp_path / "silence.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000 * 3)
    state, result = run(audio_file=str(path), download_dir=str(tmp_path / "out"))
    assert state.is_completed()
    assert result["segments"] == []
    assert json.loads((tmp_path / "out" / "silence.json").read_text())["segments"] == []


def test_results_to_a_saved_prefect_aws_block(prefect_harness, s3, s3_server, tmp_path, monkeypatch):
    """RESULTS_S3_BLOCK names a saved S3Bucket block; its credentials and folder are used."""
    from prefect_aws import AwsCredentials, S3Bucket

    from speech.settings import get_settings

    s3.create_bucket(Bucket="block-results")
    creds = AwsCredentials(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
        aws_client_parameters={"endpoint_url": s3_server},
    )
    S3Bucket(bucket_name="block-results", credentials=creds, bucket_folder="from-block/").save(
        "test-results", overwrite=True
    )
    monkeypatch.setenv("RESULTS_S3_BLOCK", "test-results")
    # the block, not the environment, points at the server: without it boto3 would go to AWS
    monkeypatch.delenv("S3_ENDPOINT_URL")
    get_settings.cache_clear()
    try:
        state, result = run(audio_file=str(DATA / "heldout_3spk.wav"), language="en")
    finally:
        get_settings.cache_clear()
    assert state.is_completed(), state
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="block-results")["Contents"]}
    assert keys == {f"from-block/heldout_3spk.{ext}" for ext in ("json", "segments.json", "srt", "vtt")}


def test_fetch_retries_transient_errors_only(prefect_harness, http_server):
    """5xx is retried (1 + 3 attempts); a 404 fails at once: deterministic errors never retry."""
    from speech.errors import TransientFetchError
    from tasks.fetch import fetch_audio

    fast = fetch_audio.with_options(retry_delay_seconds=0)
    before = dict(http_server.hits)  # the counter is per session
    with pytest.raises(TransientFetchError):
        fast(f"{http_server}/error500")
    assert http_server.hits["/error500"] - before.get("/error500", 0) == 4
    with pytest.raises(FetchError, match="404"):
        fast(f"{http_server}/nothing-here.wav")
    assert http_server.hits["/nothing-here.wav"] - before.get("/nothing-here.wav", 0) == 1


def test_alignment_stage_in_the_flow(prefect_harness, tmp_path):
    """align_output adds word times; changing align settings reuses the cached transcript."""
    out = tmp_path / "out"
    audio = str(DATA / "heldout_3spk.wav")
    state, result = run(audio_file=audio, language="en", align_output=True, download_dir=str(out))
    assert state.is_completed(), state
    assert result["alignment"]["backend"] in ("pocketsphinx", "whisper", "wav2vec2")
    words = [w for s in result["segments"] for w in s["words"]]
    assert len(words) == len(" ".join(s["text"] for s in result["segments"]).split())
    assert all(w["start"] <= w["end"] for w in words)
    assert result["word_segments"] == words and result["language"] == "en"  # whisperx's keys too
    assert len(result["segments"]) == 4  # one per sentence
    assert (out / "heldout_3spk.srt").read_text().count("-->") == 4

    state2, result2 = run(audio_file=audio, language="en", align_output=True, align_backend="whisper",
                          download_dir=str(out))
    states = task_states(state2.state_details.flow_run_id)
    assert states["transcribe"] == "Cached" and states["align"] == "Completed"
    assert result2["alignment"] == {"backend": "whisper"}


def test_diarization_and_enrolled_names_in_the_flow(prefect_harness, tmp_path, manifest):
    """diarization + verification offline: every word gets a speaker, speakers carry names."""
    out = tmp_path / "out"
    samples = [{"name": voice, "url": str(DATA / f"enrol_{voice}.wav")} for voice in ("slt", "rms", "awb")]
    state, result = run(audio_file=str(DATA / "diar_3spk.wav"), language="en", align_output=True, diarization=True,
                        speaker_verification=True, speaker_samples=samples, download_dir=str(out), debug=True)
    assert state.is_completed(), state
    assert set(result["speakers"]) == {"SPEAKER_00", "SPEAKER_01", "SPEAKER_02"}
    assert {s["name"] for s in result["speakers"].values()} == {"slt", "rms", "awb"}
    assert result["debug"]["diarization"]["backend"] == "segmented"
    assert result["debug"]["diarization"]["band"] == "wideband"  # the band the diarizer measured
    for seg in result["segments"]:  # the worker's keys beside each name
        assert seg["speaker_id"].startswith("SPEAKER_") and seg["similarity"] >= 0.45, seg
    verification = result["verification"]  # which speaker got which name, by which encoder
    assert verification["encoder"] == "campplus" and sorted(verification["names"].values()) == ["awb", "rms", "slt"]
    assert "unnamed" not in verification and "note" not in verification
    # share of reference speech time whose words carry the right name
    ref = manifest["diar_3spk.wav"]["turns"]
    right = total = 0.0
    for seg in result["segments"]:
        for w in seg["words"]:
            mid = (w["start"] + w["end"]) / 2
            truth = next((t["speaker"] for t in ref if t["start"] <= mid <= t["end"]), None)
            if truth:
                total += w["end"] - w["start"]
                right += (w["end"] - w["start"]) * (w["speaker"] == truth)
            assert w["speaker"] == seg["speaker"]
    assert right / total >= 0.95
    assert "[slt]" in (out / "diar_3spk.srt").read_text() or "[rms]" in (out / "diar_3spk.srt").read_text()

    # changing only speaker settings reuses transcription and alignment
    state2, _ = run(audio_file=str(DATA / "diar_3spk.wav"), language="en", align_output=True, diarization=True,
                    num_speakers=3, download_dir=str(out))
    states = task_states(state2.state_details.flow_run_id)
    assert states["transcribe"] == "Cached" and states["align"] == "Cached" and states["diarize"] == "Completed"

    # a run's own naming threshold (speaker_threshold): above every score, every speaker keeps its label
    state3, strict = run(audio_file=str(DATA / "diar_3spk.wav"), language="en", align_output=True, diarization=True,
                         speaker_verification=True, speaker_samples=samples, speaker_threshold=0.99,
                         download_dir=str(tmp_path / "strict"))
    assert state3.is_completed(), state3
    assert strict["verification"]["threshold"] == 0.99 and strict["verification"]["names"] == {}
    assert all("below the threshold 0.99" in u["reason"] for u in strict["verification"]["unnamed"].values())
    assert {s["speaker"] for s in strict["segments"]} <= set(strict["speakers"])  # SPEAKER_XX everywhere


def test_bad_speaker_sample_fails_before_transcribing(prefect_harness, tmp_path, http_server):
    out = tmp_path / "out"
    state, exc = run(audio_file=str(DATA / "diar_2spk.wav"), diarization=True, speaker_verification=True,
                     speaker_samples=[{"name": "x", "url": f"{http_server}/missing.wav"}], download_dir=str(out))
    assert state.is_failed() and "404" in str(exc) and "speaker sample" in str(exc)
    assert not out.exists()
    assert "transcribe" not in task_states(state.state_details.flow_run_id)


def test_saved_pyannote_job_is_reused_without_a_request(prefect_harness, tmp_path, manifest):
    turns = manifest["diar_2spk.wav"]["turns"]
    job = {"jobId": "j1", "status": "succeeded",
           "output": {"diarization": [{"start": t["start"], "end": t["end"], "speaker": t["speaker"]} for t in turns]}}
    saved = tmp_path / "job.json"
    saved.write_text(json.dumps(job))
    out = tmp_path / "out"
    state, result = run(audio_file=str(DATA / "diar_2spk.wav"), language="en", diarization=True,
                        pyannote_json_in=str(saved), download_dir=str(out))
    assert state.is_completed(), state
    assert {s["name"] for s in result["speakers"].values()} == {"slt", "rms"}  # the job's own labels
    assert json.loads((out / "diar_2spk.pyannote.job.json").read_text())["jobId"] == "j1"

    # enrolled names also apply to the hosted API's speakers
    samples = [{"url": str(DATA / "enrol_slt.wav") + "#Sally"}, {"name": "Rob", "url": str(DATA / "enrol_rms.wav")}]
    job["output"]["diarization"] = [{**d, "speaker": {"slt": "A", "rms": "B"}[d["speaker"]]}
                                    for d in job["output"]["diarization"]]
    saved.write_text(json.dumps(job))
    state, result = run(audio_file=str(DATA / "diar_2spk.wav"), language="en", diarization=True,
                        speaker_verification=True, speaker_samples=samples, pyannote_json_in=str(saved),
                        download_dir=str(out))
    assert state.is_completed(), state
    assert {s["name"] for s in result["speakers"].values()} == {"Sally", "Rob"}
    assert task_states(state.state_details.flow_run_id)["diarize-hosted"] == "Completed"  # new job content: no stale hit

    # a diarization that put both voices under one speaker (an under-merge): an enrolled person no
    # speaker was named for is found turn by turn (verify.name_turns; here the mixed speaker sits
    # between both voices, so both are: 7 turns each, similarity 0.86 / 0.82)
    job["output"]["diarization"] = [{**d, "speaker": "A"} for d in job["output"]["diarization"]]
    saved.write_text(json.dumps(job))
    state, result = run(audio_file=str(DATA / "diar_2spk.wav"), language="en", diarization=True,
                        speaker_verification=True, speaker_samples=samples, pyannote_json_in=str(saved),
                        download_dir=str(out), debug=True)
    assert state.is_completed(), state
    assert {s["name"] for s in result["speakers"].values()} == {"Sally", "Rob"}
    by_turn = result["debug"]["diarization"]["verification"]["named_by_turn"]
    assert by_turn and {v["name"] for v in by_turn.values()} <= {"Sally", "Rob"}
    assert min(v["similarity"] for v in by_turn.values()) >= 0.55  # CAM++'s threshold + margin
    assert "note" not in result["debug"]["diarization"]["verification"]  # nobody enrolled is left unheard
    said = {"slt": "Sally", "rms": "Rob"}
    for seg in result["segments"]:  # each word carries the name of the voice that said it
        for w in seg["words"]:
            truth = [t["speaker"] for t in turns if t["start"] - 0.05 <= w["start"] and w["end"] <= t["end"] + 0.05]
            if len(truth) == 1:
                assert w["speaker"] == said[truth[0]], (w, truth)


def test_upload_and_deepgram_confidence_in_the_flow(prefect_harness, s3, tmp_path, manifest):
    """upload (skip-if-same) + presign, a saved Deepgram response merged into words and segments."""
    s3.create_bucket(Bucket="pipeline")
    words = manifest["heldout_3spk.wav"]["words"]
    dg = {"metadata": {"request_id": "r1"}, "results": {"channels": [{"alternatives": [{"words": [
        {"word": w["word"].strip(".,").lower(), "punctuated_word": w["word"], "start": w["start"], "end": w["end"],
         "confidence": 0.3 if i < 9 else 0.97} for i, w in enumerate(words)]}]}]}}
    saved = tmp_path / "dg.json"
    saved.write_text(json.dumps(dg))
    out = tmp_path / "local"
    kwargs = dict(audio_file=str(DATA / "heldout_3spk.wav"), language="en", bucket="pipeline", upload=True,
                  deepgram_json_in=str(saved), download_transcript=True, download_dir=str(out))
    state, result = run(**kwargs)
    assert state.is_completed(), state
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="pipeline")["Contents"]}
    assert "audio/heldout_3spk.wav" in keys and "transcripts/heldout_3spk.deepgram.json" in keys
    assert (out / "heldout_3spk.json").exists()  # --download-transcript
    flags = [s.get("confidence_flag") for s in result["segments"]]
    assert flags[0] == "low" and flags[-1] == "high"
    assert result["unclear_intervals"] and result["unclear_intervals"][0]["start"] < 1.0
    assert result["confidence"]["matched"] >= 30
    assert all("confidence" in w for s in result["segments"] for w in s["words"][:3])
    head = s3.head_object(Bucket="pipeline", Key="audio/heldout_3spk.wav")
    state2, _ = run(**kwargs)  # same content: no second upload
    assert s3.head_object(Bucket="pipeline", Key="audio/heldout_3spk.wav")["LastModified"] == head["LastModified"]
    assert task_states(state2.state_details.flow_run_id)["deepgram"] == "Cached"


def test_tokens_come_from_secret_blocks_only_when_not_given(prefect_harness, monkeypatch):
    """parameter > env var > Secret block; blocks are read only for the stages that use them."""
    from prefect import flow
    from prefect.blocks.system import Secret

    from flows.pipeline import with_block_secrets
    from speech.schema import TranscriptionRequest
    from speech.settings import get_settings

    @flow
    def resolve(fields: dict) -> dict:
        req = with_block_secrets(TranscriptionRequest.parse({"audio_file": "a.wav", **fields}))
        return {k: getattr(req, k).get_secret_value() if getattr(req, k) else None
                for k in ("deepgram_api_key", "pyannote_api_key")}

    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    monkeypatch.delenv("PYANNOTE_API_KEY", raising=False)
    get_settings.cache_clear()
    Secret(value="dg-from-block").save("deepgram-api-key", overwrite=True)
    Secret(value="pa-from-block").save("pyannote-api-key", overwrite=True)
    try:
        assert resolve({}) == {"deepgram_api_key": "dg-from-block", "pyannote_api_key": None}
        assert resolve({"diarization": True}) == {"deepgram_api_key": "dg-from-block",
                                                  "pyannote_api_key": "pa-from-block"}
        assert resolve({"deepgram_api_key": "dg-param"})["deepgram_api_key"] == "dg-param"
        monkeypatch.setenv("DEEPGRAM_API_KEY", "dg-env")
        get_settings.cache_clear()
        assert resolve({})["deepgram_api_key"] is None  # the env var is used downstream, not copied
    finally:
        for name in ("deepgram-api-key", "pyannote-api-key"):
            Secret.delete(name)
        get_settings.cache_clear()


def test_worker_env_switches_print_mounts_and_console_level(prefect_harness, monkeypatch, tmp_path):
    """PRINT_MOUNTS=1 logs the mounts to the run's logs; CONSOLE_LOG_LEVEL sets the console
    handler's level only."""
    import logging

    from prefect import flow

    from flows.runtime import apply_runtime_switches
    from speech.output.report import mounted_volumes
    from speech.settings import get_settings

    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n/dev/sdb1 /models ext4 ro,relatime 0 0\n"
                      "tmpfs /dev/shm tmpfs rw 0 0\noverlay / overlay rw 0 0\n")
    lines = mounted_volumes(str(mounts))
    assert [line.split(" (")[0] for line in lines] == ["/models", "/dev/shm", "/"]
    assert lines[0].startswith("/models (ext4, ro, ") and lines[0].endswith("<- /dev/sdb1")

    @flow
    def switches() -> None:
        apply_runtime_switches()

    monkeypatch.setenv("PRINT_MOUNTS", "1")
    monkeypatch.setenv("CONSOLE_LOG_LEVEL", "error")
    get_settings.cache_clear()
    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    levels = [h.level for h in handlers]
    try:
        state = switches(return_state=True)
        assert handlers and all(h.level == logging.ERROR for h in handlers)
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)
        get_settings.cache_clear()
    logs = _run_logs(state.state_details.flow_run_id)
    assert any(m.startswith("mounts:\n") for m in logs)  # the API got it despite the console level


def _run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [r.message for r in logs]


@pytest.fixture
def pyannote_api(monkeypatch):
    """The pyannoteAI stub as the run's hosted diarizer (key and URL from the environment),
    with task retries that do not wait."""
    from pyannote_stub import KEY, PyannoteServer
    from speech.settings import get_settings
    from tasks.speakers import diarize_hosted

    monkeypatch.setenv("PYANNOTE_API_KEY", KEY)
    get_settings.cache_clear()
    monkeypatch.setattr(diarize_hosted, "retry_delay_seconds", [0.1, 0.1, 0.1])
    with PyannoteServer() as server:
        monkeypatch.setenv("PYANNOTE_API_URL", server.url)
        get_settings.cache_clear()
        yield server
    get_settings.cache_clear()


def test_hosted_diarization_retries_transient_errors_and_never_caches_a_fallback(prefect_harness, pyannote_api,
                                                                                  tmp_path):
    """auto with a pyannoteAI key: the API first; a 503 is retried by the task; an API that keeps
    failing falls back to this machine's diarizer, and that fallback is not cached: the next run
    with a healthy API gets the API's speakers. The engine's log records are in the run's logs."""
    kwargs = dict(language="en", diarization=True, pyannote_poll_interval=0.05, debug=True,
                  download_dir=str(tmp_path / "out"))
    api = pyannote_api.reset()
    api.submit_failures = 1
    state, result = run(audio_file=str(DATA / "heldout_3spk.wav"), force=True, **kwargs)  # transcribe runs
    assert state.is_completed(), state
    assert result["debug"]["diarization"]["backend"] == "pyannote-api" and api.submits == 2
    assert len(result["speakers"]) == 3
    # the hosted job runs beside the GPU stages: it started before transcription ended
    runs = {r.name.rsplit("-", 1)[0]: r for r in _task_runs(state.state_details.flow_run_id)}
    assert runs["diarize-hosted"].start_time < runs["transcribe"].end_time

    api = pyannote_api.reset()
    api.submit_failures = 99
    state, result = run(audio_file=str(DATA / "diar_2spk.wav"), **kwargs)
    assert state.is_completed(), state
    diarization = result["debug"]["diarization"]
    assert diarization["backend"] == "segmented" and "pyannote-api" in diarization["error"] and "503" in diarization["error"]
    assert api.submits == 4  # the first try and 3 retries, then the fallback
    assert len(result["speakers"]) == 2
    states = task_states(state.state_details.flow_run_id)
    assert states["diarize-hosted"] == "Failed" and states["diarize"] == "Completed"
    logs = _run_logs(state.state_details.flow_run_id)
    assert any("diarization backend unavailable: pyannote" in m for m in logs)  # a speech.* record
    assert any("not cached" in m for m in logs)
    from pyannote_stub import KEY

    assert pyannote_api.state.requests and not any(KEY in m for m in logs)

    pyannote_api.reset()
    state, result = run(audio_file=str(DATA / "diar_2spk.wav"), **kwargs)
    assert result["debug"]["diarization"]["backend"] == "pyannote-api"
    assert task_states(state.state_details.flow_run_id)["diarize-hosted"] == "Completed"


def test_an_alignment_that_failed_is_not_cached(prefect_harness, tmp_path):
    """wav2vec2 chosen but unavailable offline: segment times are kept, the outcome is not cached
    (a later run with the model tries again); auto's offline answer is cached as usual."""
    kwargs = dict(audio_file=str(DATA / "heldout_3spk.wav"), language="en", align_output=True,
                  download_dir=str(tmp_path))
    for _ in range(2):
        state, result = run(align_backend="wav2vec2", **kwargs)
        assert state.is_completed() and result["alignment"]["backend"] is None
        assert task_states(state.state_details.flow_run_id)["align"] == "Completed"
    run(align_backend="auto", **kwargs)
    state, result = run(align_backend="auto", **kwargs)
    assert result["alignment"]["backend"] == "pocketsphinx"
    assert task_states(state.state_details.flow_run_id)["align"] == "Cached"


def test_audio_reaches_task_workers_through_s3_result_storage(prefect_harness, s3, tmp_path, monkeypatch):
    """share_audio puts the fetched bytes in the S3 result storage once per content; a task
    worker elsewhere (its own cache dir, no local copy) decodes them from there."""
    import hashlib

    import numpy as np

    from speech.io.audio import load_audio
    from speech.settings import get_settings
    from tasks.audio import audio_samples, share_audio
    from tasks.storage import task_result_storage

    s3.create_bucket(Bucket="shared")
    monkeypatch.setenv("RESULTS_STORAGE", "s3://shared/results")
    monkeypatch.setenv("SPEECH_CACHE_DIR", str(tmp_path / "flow-cache"))
    get_settings.cache_clear()
    try:
        storage = task_result_storage()
        ref = load_audio(str(DATA / "enrol_rms.wav"), decode_now=False, keep_bytes=True)
        shared = share_audio(ref, storage)
        sha = hashlib.sha256((DATA / "enrol_rms.wav").read_bytes()).hexdigest()
        assert shared.shared == f"audio/{sha}"
        head = s3.head_object(Bucket="shared", Key=f"results/audio/{sha}")
        share_audio(ref.model_copy(update={"local_path": None}), storage)  # already there: nothing to send
        assert s3.head_object(Bucket="shared", Key=f"results/audio/{sha}")["LastModified"] == head["LastModified"]

        monkeypatch.setenv("SPEECH_CACHE_DIR", str(tmp_path / "worker-cache"))  # another machine
        get_settings.cache_clear()
        samples = audio_samples(shared.model_copy(update={"local_path": None}))
        expected = np.frombuffer((DATA / "enrol_rms.wav").read_bytes()[44:], np.int16).astype(np.float32) / 32768
        assert samples.shape == expected.shape and np.abs(samples - expected).max() < 1e-3
        assert (tmp_path / "worker-cache" / "audio" / f"{sha}.npy").exists()
        assert not list((tmp_path / "worker-cache" / "downloads").iterdir())  # the copy is gone once decoded
    finally:
        get_settings.cache_clear()


def test_a_short_shared_copy_in_a_folder_is_never_decoded(tmp_path, monkeypatch):
    """Folder result storage (RESULTS_STORAGE=/shared/path): the shared copy is written under a
    temporary name and renamed, so a writer killed mid-copy leaves nothing under audio/<sha256>;
    a short copy left by an older writer is not decoded as the file (a truncated or silently
    shortened transcript cached under the full file's hash): it is refused with one line and
    removed, and the next share writes it whole."""
    import hashlib

    from speech.io.audio import AudioNotHere, load_audio
    from speech.settings import get_settings
    from tasks.audio import audio_samples, share_audio
    from tasks.storage import task_result_storage

    monkeypatch.setenv("RESULTS_STORAGE", str(tmp_path / "shared"))
    monkeypatch.setenv("SPEECH_CACHE_DIR", str(tmp_path / "flow-cache"))
    get_settings.cache_clear()
    storage = task_result_storage()
    wav = (DATA / "enrol_rms.wav").read_bytes()
    sha = hashlib.sha256(wav).hexdigest()
    copy = tmp_path / "shared" / "audio" / sha
    copy.parent.mkdir(parents=True)
    copy.write_bytes(wav[: len(wav) // 2])  # what an in-place write killed half-way left
    ref = load_audio(str(DATA / "enrol_rms.wav"), decode_now=False, keep_bytes=True)
    monkeypatch.setenv("SPEECH_CACHE_DIR", str(tmp_path / "worker-cache"))  # a task worker elsewhere
    get_settings.cache_clear()
    elsewhere = ref.model_copy(update={"local_path": None, "shared": f"audio/{sha}"})
    with pytest.raises(AudioNotHere, match="not the file the run fetched") as refused:
        audio_samples(elsewhere)
    assert "\n" not in str(refused.value) and not copy.exists()
    assert not (tmp_path / "worker-cache" / "audio" / f"{sha}.npy").exists()
    share_audio(ref, storage)
    assert copy.read_bytes() == wav and not [p for p in copy.parent.iterdir() if p.name != sha]
    assert audio_samples(elsewhere).shape[0] == (len(wav) - 44) // 2
    assert not list((tmp_path / "worker-cache" / "downloads").iterdir())
