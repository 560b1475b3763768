"""The ``transcribe-audio`` flow: one audio file through the DAG of :mod:`flows.pipeline`.

Python:  ``from flows.transcribe import transcribe_audio; transcribe_audio(audio_file="x.wav")``
CLI:     ``whisperx-prefect AUDIO [flags]`` (or ``python -m flows``, ``python -m flows.transcribe``; see ``--help``)

The flow's keyword arguments are exactly the fields of
:class:`speech.schema.TranscriptionRequest`, with its defaults (a test keeps the two in step),
so the Prefect UI shows a typed form and Python callers pass the worker's inputs by name.
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m flows.transcribe` is `python -m flows` (the command), run before the
    import runpy            # heavy imports below so --help stays instant; this module never imports the CLI

    runpy.run_module("flows", run_name="__main__", alter_sys=True)

from typing import Any, Optional

from prefect import flow
from pydantic import SecretStr

from flows.pipeline import run_pipeline
from flows.local_api import record_run_process
from flows.runtime import apply_runtime_switches, keep_result_with_task_results, redact_stored_secrets
from speech.contracts import request_default as _d
from speech.schema import (
    AlignBackend,
    ComputeType,
    DeviceName,
    DiarizationBackend,
    OutputFormat,
    PyannoteModel,
    SegmentResolution,
    SpeakerEncoder,
    TaskName,
    TranscriptionRequest,
    VadMethod,
)


# persist_result: a run's result (the worker's JSON) stays readable from the Prefect API after the
# run, beside the task results (RESULTS_STORAGE_BLOCK / RESULTS_STORAGE; else Prefect's default,
# $PREFECT_HOME/storage): how deployments/runpod_api.py answers /status for deployment runs
@flow(name="transcribe-audio", validate_parameters=False, log_prints=False, persist_result=True)
def transcribe_audio(
    audio_file: str,
    language: Optional[str] = None,
    language_detection_min_prob: float = _d("language_detection_min_prob"),
    language_detection_max_tries: int = _d("language_detection_max_tries"),
    initial_prompt: Optional[str] = None,
    batch_size: int = _d("batch_size"),
    temperature: float = _d("temperature"),
    vad_onset: float = _d("vad_onset"),
    vad_offset: float = _d("vad_offset"),
    align_output: bool = _d("align_output"),
    diarization: bool = _d("diarization"),
    huggingface_access_token: Optional[SecretStr] = None,
    min_speakers: Optional[int] = None,
    max_speakers: Optional[int] = None,
    debug: bool = _d("debug"),
    speaker_verification: bool = _d("speaker_verification"),
    speaker_samples: Optional[list[dict[str, Any]]] = None,
    align_backend: AlignBackend = _d("align_backend"),
    align_model: Optional[str] = None,
    diarization_backend: DiarizationBackend = _d("diarization_backend"),
    diarization_model: Optional[str] = None,
    pyannote_api_key: Optional[SecretStr] = None,
    pyannote_model: PyannoteModel = _d("pyannote_model"),
    pyannote_exclusive: bool = _d("pyannote_exclusive"),
    pyannote_poll_interval: float = _d("pyannote_poll_interval"),
    pyannote_timeout: float = _d("pyannote_timeout"),
    pyannote_json_in: Optional[str] = None,
    deepgram_api_key: Optional[SecretStr] = None,
    deepgram_json_in: Optional[str] = None,
    deepgram_model: str = _d("deepgram_model"),
    deepgram_tier: Optional[str] = None,
    deepgram_version: Optional[str] = None,
    word_confidence_low_threshold: float = _d("word_confidence_low_threshold"),
    word_confidence_high_threshold: float = _d("word_confidence_high_threshold"),
    low_confidence_min_dur: float = _d("low_confidence_min_dur"),
    s3_endpoint: Optional[str] = None,
    access_key: Optional[SecretStr] = None,
    secret_key: Optional[SecretStr] = None,
    upload: bool = _d("upload"),
    prefix_audio: Optional[str] = None,
    url_expiry: int = _d("url_expiry"),
    download_transcript: bool = _d("download_transcript"),
    speaker_encoder: SpeakerEncoder = _d("speaker_encoder"),
    speaker_threshold: Optional[float] = None,
    model: Optional[str] = None,
    beam_size: Optional[int] = None,
    patience: float = _d("patience"),
    length_penalty: float = _d("length_penalty"),
    no_speech_threshold: float = _d("no_speech_threshold"),
    log_prob_threshold: float = _d("log_prob_threshold"),
    compression_ratio_threshold: float = _d("compression_ratio_threshold"),
    condition_on_previous_text: Optional[bool] = None,
    suppress_numerals: bool = _d("suppress_numerals"),
    hotwords: Optional[str] = None,
    temperature_increment_on_fallback: Optional[float] = None,
    task: TaskName = _d("task"),
    chunk_size: int = _d("chunk_size"),
    device: Optional[DeviceName] = None,
    compute_type: Optional[ComputeType] = None,
    vad_method: VadMethod = _d("vad_method"),
    threads: Optional[int] = None,
    segment_resolution: SegmentResolution = _d("segment_resolution"),
    return_char_alignments: bool = _d("return_char_alignments"),
    num_speakers: Optional[int] = None,
    download_dir: Optional[str] = None,
    bucket: Optional[str] = None,
    prefix_transcripts: Optional[str] = None,
    output_name: Optional[str] = None,
    audio_sha256: Optional[str] = None,
    force: bool = _d("force"),
    output_format: Optional[OutputFormat] = None,
    highlight_words: bool = _d("highlight_words"),
    max_line_width: Optional[int] = None,
    max_line_count: Optional[int] = None,
) -> dict[str, Any]:
    """Transcribe one audio file with WhisperX and store JSON, SRT and VTT outputs.

    Args:
        audio_file: Local path, http(s) URL or s3://bucket/key of the audio.
        language: ISO code of the spoken language (e.g. 'en'); leave empty to detect it.
        language_detection_min_prob: Detect on successive 30 s windows of speech until one reaches this probability.
        language_detection_max_tries: At most this many detection windows; then the most probable language wins.
        initial_prompt: Text to prompt the first decoding window with.
        batch_size: Parallel decoding batch size.
        temperature: Sampling temperature (0 = deterministic).
        vad_onset: VAD onset threshold, in (0, 1).
        vad_offset: VAD offset threshold, in (0, 1).
        align_output: Align words for accurate word-level timestamps.
        diarization: Label segments and words with speakers.
        huggingface_access_token: Hugging Face token for gated models (prefer the HF_TOKEN env var, the hf-token Secret block, or 'prefect-secret:<block name>').
        min_speakers: Minimum number of speakers.
        max_speakers: Maximum number of speakers.
        debug: Add stage timings, model load time and peak memory to the result.
        speaker_verification: Relabel speakers with enrolled names.
        speaker_samples: Enrolment clips, a list of {name?, url}.
        align_backend: Word aligner: auto, wav2vec2 (WhisperX), pocketsphinx (English, offline) or whisper.
        align_model: wav2vec2 align model name or local directory (default: the language's WhisperX model).
        diarization_backend: Diarizer: auto, pyannote (local pipeline), pyannote-api (hosted pyannoteAI), segmented (offline, from the audio) or builtin (offline GE2E).
        diarization_model: Local pyannote pipeline, hub name or directory (default WhisperX's community-1).
        pyannote_api_key: pyannoteAI API key (prefer the PYANNOTE_API_KEY env var, the pyannote-api-key Secret block, or 'prefect-secret:<block name>').
        pyannote_model: pyannoteAI model, precision-2 or community-1.
        pyannote_exclusive: Use pyannoteAI's exclusive (non-overlapping) diarization.
        pyannote_poll_interval: Seconds between pyannoteAI job polls.
        pyannote_timeout: Give up on a pyannoteAI job after this many seconds (upload and polling included).
        pyannote_json_in: Reuse a saved <stem>.pyannote.job.json instead of calling the API.
        deepgram_api_key: Deepgram key for word confidence (prefer the DEEPGRAM_API_KEY env var, the deepgram-api-key Secret block, or 'prefect-secret:<block name>').
        deepgram_json_in: Reuse a saved <stem>.deepgram.json instead of calling Deepgram.
        deepgram_model: Deepgram model (default nova-3).
        deepgram_tier: Deepgram tier (older models only).
        deepgram_version: Deepgram model version.
        word_confidence_low_threshold: A segment is flagged low below this average word confidence.
        word_confidence_high_threshold: A segment is flagged high at or above this average word confidence.
        low_confidence_min_dur: Seconds of contiguous low-confidence speech that flag a segment low.
        s3_endpoint: S3-compatible endpoint URL (MinIO, R2); default from the environment.
        access_key: S3 access key id (prefer AWS_ACCESS_KEY_ID or an AwsCredentials block).
        secret_key: S3 secret key (prefer AWS_SECRET_ACCESS_KEY or an AwsCredentials block).
        upload: Upload the audio to the bucket under prefix_audio (skipped when already there) and presign it.
        prefix_audio: Key prefix for uploaded audio (default audio/).
        url_expiry: Presigned URL lifetime in seconds.
        download_transcript: With a bucket, also write the outputs to download_dir.
        speaker_encoder: Speaker-verification encoder: auto, ecapa (SpeechBrain), campplus (CAM++, offline) or builtin (offline GE2E).
        speaker_threshold: Similarity needed to take an enrolled name (default: the encoder's own); raise it when not everyone is enrolled.
        model: Whisper model name (large-v3, ...), model directory, or bundled:base / bundled:tiny.en.
        beam_size: Beam size (default 5); clipped to 1..10 as the RunPod worker did.
        patience: Beam search patience factor (default 1).
        length_penalty: Exponential length penalty of beam search (default 1).
        no_speech_threshold: A window above this no-speech probability (and below log_prob_threshold) counts as silence.
        log_prob_threshold: Decoding below this average log probability is retried at a higher temperature.
        compression_ratio_threshold: Decoding above this gzip compression ratio is retried at a higher temperature.
        condition_on_previous_text: Prompt each window with the previous text (default off; on in the worker's envelope).
        suppress_numerals: Suppress numeric and symbol tokens (numbers spelled out).
        hotwords: Words or phrases to favour, given as a hint to the decoder.
        temperature_increment_on_fallback: Retry failed windows at temperature + this, up to 1.0 (default: no fallback).
        task: transcribe (in the spoken language) or translate (to English).
        chunk_size: Merge VAD speech into chunks of at most this many seconds (default 30); shorter chunks, shorter segments.
        device: Device for transcription, wav2vec2 alignment and local pyannote diarization: auto, cpu or cuda (default WHISPERX_DEVICE).
        compute_type: CTranslate2 compute type for transcription (default WHISPERX_COMPUTE_TYPE, else float16 on CUDA, int8 on CPU).
        vad_method: Voice activity detection: pyannote (default) or silero (Silero VAD v6 bundled with faster-whisper).
        threads: CPU threads for this run's inference (default WHISPERX_CPU_THREADS, else all cores).
        segment_resolution: With word alignment: one segment per sentence (default) or per transcription chunk.
        return_char_alignments: With the wav2vec2 aligner: also return per-character times (segments[].chars).
        num_speakers: Exact number of speakers, when known.
        download_dir: Local folder for the outputs (default RESULTS_DIR or ./out).
        bucket: S3 bucket for the outputs (default RESULTS_BUCKET).
        prefix_transcripts: Key prefix for outputs in the bucket.
        output_name: Stem of the output files (default: the audio file's stem).
        audio_sha256: SHA-256 (hex) the audio's bytes must have; the run fails, writing nothing, if they differ.
        force: Recompute every stage even when a cached result exists.
        output_format: Files besides <stem>.json: json (.segments.json), srt, vtt, txt, tsv, aud or all (default: the worker's .segments.json, .srt, .vtt).
        highlight_words: Underline each word in .srt/.vtt as it is spoken (needs word times).
        max_line_width: Subtitle line width in characters (needs word times).
        max_line_count: Lines per subtitle cue (needs max_line_width).
    """
    args = dict(locals())
    args["speaker_samples"] = args["speaker_samples"] or []
    record_run_process()  # first: a run killed from here on is found abandoned by the next CLI run
    redact_stored_secrets()
    apply_runtime_switches()
    keep_result_with_task_results()
    return run_pipeline(TranscriptionRequest.parse(args)).result
