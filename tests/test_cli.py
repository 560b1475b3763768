"""The command line, as users and the acceptance check run it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, wer_limit

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.transcribe", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture
def prefect_api(prefect_harness) -> dict[str, str]:
    """The session's Prefect API for CLI processes (a CLI with none starts a server of its own:
    ~20 s here, tested in test_cli_transcribes_and_writes_outputs)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


def test_help_lists_the_pipeline_flags():
    proc = cli("--help")
    assert proc.returncode == 0
    for flag in ("--model", "--language", "--batch-size", "--beam-size", "--temperature", "--initial-prompt",
                 "--vad-onset", "--vad-offset", "--params-json", "--download-dir", "--debug"):
        assert flag in proc.stdout


def test_every_request_field_has_a_flag_from_the_schema():
    """The CLI is generated from the schema: a new field gets its flag, type, choices and help
    without a second list to keep in step (issue 14)."""
    from flows.cli import NOT_FLAGS, build_parser, request_from_args
    from speech.schema import TranscriptionRequest

    parser = build_parser()
    flags: dict[str, list[str]] = {}
    for action in parser._actions:
        flags.setdefault(action.dest, []).extend(action.option_strings)
    for name in TranscriptionRequest.model_fields:
        if name not in NOT_FLAGS:
            assert f"--{name.replace('_', '-')}" in flags.get(name, []), f"no flag for {name}"
    choices = {a.dest: a.choices for a in parser._actions}
    assert choices["diarization_backend"] == ["auto", "pyannote", "pyannote-api", "segmented", "builtin"]
    args = parser.parse_args(["a.wav", "--beam-size", "3", "--no-align", "--diarization", "--vad-onset", "0.4",
                              "--speaker-encoder", "campplus", "--deepgram-api-key", "k"])
    req = TranscriptionRequest.parse(request_from_args(args))
    assert (req.beam_size, req.align_output, req.diarization, req.vad_onset, req.speaker_encoder) == (
        3, False, True, 0.4, "campplus")
    assert req.deepgram_api_key.get_secret_value() == "k"
    assert req.batch_size == TranscriptionRequest.model_fields["batch_size"].default  # not given: the schema's
    with pytest.raises(SystemExit):
        parser.parse_args(["a.wav", "--diarization-backend", "nope"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["x.wav", "--batch-size", "0"], "batch_size"),
        (["x.wav", "--vad-onset", "1.5"], "vad_onset"),
        (["x.wav", "--language", "xx"], "unknown language"),
        (["--params-json", '{"input": {"audio_file": "x.wav", "temperature": 3}}'], "temperature"),
        (["/nonexistent/audio.wav"], "not found"),
        (["--params-json", '{"id": "job-1", "input": {"audio_file": "/nonexistent/a.wav"}}'], "not found"),
        ([], "required"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, fragment):
    proc = cli(*args)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_cli_transcribes_and_writes_outputs(tmp_path, manifest):
    from conftest import wer

    out = tmp_path / "out"
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"input": {"language": "en", "batch_size": 8}}))
    proc = cli(str(DATA / "heldout_3spk.wav"), "--params-json", str(params), "--download-dir", str(out),
               "--print-progress", env={"PREFECT_HOME": str(tmp_path / "prefect-home")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "heldout_3spk.json", "heldout_3spk.segments.json", "heldout_3spk.srt", "heldout_3spk.vtt",
    ]
    result = json.loads((out / "heldout_3spk.json").read_text())
    assert wer(manifest["heldout_3spk.wav"]["text"], " ".join(s["text"] for s in result["segments"])) <= wer_limit("heldout_3spk.wav")
    assert "-->" in proc.stdout and str(out) in proc.stderr
    # --print-progress: whisperx's own lines, on stdout as whisperx prints them, ending at 100 %
    progress = [line for line in proc.stdout.splitlines() if line.startswith("Progress: ")]
    assert progress and progress[-1] == "Progress: 100.00%..." and all(re.fullmatch(r"Progress: \d+\.\d\d%\.\.\.", p)
                                                                     for p in progress)


def test_cache_on_s3_is_shared_by_separate_processes(tmp_path, s3, prefect_api):
    """RESULTS_STORAGE=s3://...: two CLI processes with their own PREFECT_HOME and SPEECH_CACHE_DIR
    (two containers, as far as either can tell; one Prefect API, as in production); the second
    finds every stage in the first's cache, loads no model and decodes no audio."""
    s3.create_bucket(Bucket="prefect-cache")
    runs = []
    for name in ("first", "second"):
        home = tmp_path / name
        home.mkdir()
        proc = cli(str(DATA / "diar_2spk.wav"), "--language", "en", "--diarization", "--debug", "--json",
                   "--download-dir", str(home / "out"),
                   env={"PREFECT_HOME": str(home / "prefect"), "SPEECH_CACHE_DIR": str(home / "cache"),
                        "RESULTS_STORAGE": "s3://prefect-cache/results", **prefect_api})
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout))  # --json: stdout holds the JSON alone
    first, second = runs
    assert first["debug"]["cached_stages"] == [] and first["debug"]["model_loads"] >= 2  # Whisper + VAD
    assert set(second["debug"]["cached_stages"]) == {"transcribe", "align", "diarize"}
    assert second["debug"]["model_loads"] == 0
    assert second["segments"] == first["segments"] and second["speakers"] == first["speakers"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="prefect-cache")["Contents"]]
    for stage in ("transcribe", "align", "diarize"):
        assert any(k.startswith(f"results/{stage}-") for k in keys), keys
    assert not list((tmp_path / "first" / "prefect").glob("storage/*"))  # nothing kept on the machine
    # the first process decoded the audio; the second, with every stage cached, never did
    assert list((tmp_path / "first" / "cache" / "audio").glob("*.npy"))
    assert not list((tmp_path / "second" / "cache" / "audio").glob("*.npy"))


def test_several_files_run_as_one_batch(tmp_path, manifest, prefect_api):
    """whisperx's CLI takes several files: here one transcribe-batch flow run (models loaded once),
    each file's outputs named after it; a file that fails makes the exit code 1, the others land."""
    from conftest import wer

    out = tmp_path / "out"
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot audio at all" * 20)
    proc = cli(str(DATA / "heldout_3spk.wav"), str(DATA / "sample_2spk.wav"), str(bad), "--language", "en",
               "--download-dir", str(out), "--json", env={"PREFECT_HOME": str(tmp_path / "prefect-home"), **prefect_api})
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert [f.rsplit("/", 1)[1] for f in summary["succeeded"]] == ["heldout_3spk.wav", "sample_2spk.wav"]
    assert summary["failed"][0]["audio_file"] == str(bad) and "broken.wav" in proc.stderr
    for name in ("heldout_3spk", "sample_2spk"):
        result = json.loads((out / f"{name}.json").read_text())
        assert wer(manifest[f"{name}.wav"]["text"], " ".join(s["text"] for s in result["segments"])) <= wer_limit(f"{name}.wav")
    assert not list(out.glob("broken*"))
    assert f"{out}/heldout_3spk.{{json,segments.json,srt,vtt}}" in "".join(proc.stderr.split())  # rich wraps


def test_json_pipes_into_json_tool_with_whisperx_options(tmp_path, manifest, prefect_api):
    """`--json | python -m json.tool` (stdout holds the JSON alone) with whisperx CLI options:
    Silero VAD, chunk segment resolution, one thread, char alignments asked of an aligner that
    has none (said in the result, not a failure)."""
    from conftest import wer

    out = tmp_path / "out"
    cmd = (f"{sys.executable} -m flows.transcribe {DATA / 'heldout_3spk.wav'} --language en --align-output "
           f"--align-backend pocketsphinx --vad-method silero --segment-resolution chunk --threads 1 "
           f"--return-char-alignments --output-format txt --download-dir {out} --json "
           f"| {sys.executable} -m json.tool")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), **prefect_api})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert len(result["segments"]) == 1 and len(result["segments"][0]["words"]) >= 30  # one chunk, not 4 sentences
    assert wer(manifest["heldout_3spk.wav"]["text"], result["segments"][0]["text"]) <= wer_limit("heldout_3spk.wav")
    assert result["alignment"]["backend"] == "pocketsphinx" and "wav2vec2" in result["alignment"]["chars_error"]
    assert sorted(p.name for p in out.iterdir()) == ["heldout_3spk.json", "heldout_3spk.txt"]
