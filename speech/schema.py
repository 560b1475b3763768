"""The request users send, and the choices it shares with the stages.

``TranscriptionRequest`` mirrors the original WhisperX worker's inputs (same names, types,
defaults) plus the pipeline script's controls; it is the only place that holds their defaults.
What the stages pass each other, built from it, is :mod:`speech.contracts`.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from speech.errors import InvalidRequest
from speech.settings import SECRETS

# Whisper's language table, straight from whisperx (a light, dependency-free module).
from whisperx.utils import LANGUAGES as WHISPER_LANGUAGES, TO_LANGUAGE_CODE


def normalize_language(value: Optional[str]) -> Optional[str]:
    """'en', 'EN', 'english' -> 'en'; None/''/'auto'/'None' -> None (detect)."""
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("", "auto", "none", "null"):
        return None
    if v in WHISPER_LANGUAGES:
        return v
    if v in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[v]
    raise ValueError(f"unknown language {value!r}; use a Whisper language code such as 'en', 'de', 'es'")


SAMPLE_RATE = 16000  # every stage works on 16 kHz mono float32 samples


# Choices shared by the request, the engine stages and the flow signature (UI dropdowns).
AlignBackend = Literal["auto", "wav2vec2", "pocketsphinx", "whisper"]
DiarizationBackend = Literal["auto", "pyannote", "pyannote-api", "segmented", "builtin"]
PyannoteModel = Literal["precision-2", "community-1"]
SpeakerEncoder = Literal["auto", "builtin", "ecapa", "campplus"]
AudioBand = Literal["wideband", "narrowband", "telephone"]  # as the segmented diarizer measures it
OutputFormat = Literal["all", "json", "srt", "vtt", "txt", "tsv", "aud"]
TaskName = Literal["transcribe", "translate"]
DeviceName = Literal["auto", "cpu", "cuda"]
VadMethod = Literal["pyannote", "silero"]
SegmentResolution = Literal["sentence", "chunk"]
ComputeType = Literal["default", "auto", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16",
                      "float16", "float32", "bfloat16"]

SECRET_FIELDS = tuple(spec.request_field for spec in SECRETS)
SECRET_REF_PREFIX = "prefect-secret:"
# a URL whose credentials stay in this process's memory while its run's parameters hold the masked
# URL plus this mark and a key (flows.runtime.hand_over); never accepted from someone else
HANDOVER_MARK = "#whisperx-handover="


def plain_secrets(values: dict[str, Any]) -> list[str]:
    """The secret fields of ``values`` that hold a token itself rather than a
    ``prefect-secret:<block>`` reference: refused where parameters are stored (sweeps, queued runs)."""
    def text(v: Any) -> str:
        return v.get_secret_value() if isinstance(v, SecretStr) else str(v)

    return [k for k in SECRET_FIELDS if values.get(k) and not text(values[k]).startswith(SECRET_REF_PREFIX)]


def check_speaker_counts(n: Optional[int], lo: Optional[int], hi: Optional[int]) -> None:
    """Each count a positive integer, and min_speakers <= num_speakers <= max_speakers, where given."""
    for name, value in (("num_speakers", n), ("min_speakers", lo), ("max_speakers", hi)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer (got {value!r})")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min_speakers ({lo}) is greater than max_speakers ({hi}); it must not exceed it")
    if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
        raise ValueError(f"num_speakers ({n}) is outside min_speakers..max_speakers ({lo}..{hi})")


class SpeakerSample(BaseModel):
    """An enrolment clip for speaker verification: ``{name?, url}``."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, description="Speaker name; derived from the URL when omitted.")
    url: str = Field(..., min_length=1, description="Local path, http(s) URL or s3:// URI of a clip.")


RUNPOD_JOB_KEYS = {"input", "id", "webhook", "policy", "s3Config"}


def unwrap_envelope(data: Any) -> Any:
    """The RunPod worker's ``{"input": {...}}`` (a whole job, ``{"id", "input", ...}``, too): its
    fields, with the worker's forced ``condition_on_previous_text`` unless given; anything else
    unchanged."""
    if isinstance(data, dict) and isinstance(data.get("input"), dict) and set(data) <= RUNPOD_JOB_KEYS:
        inner = dict(data["input"])
        inner.setdefault("condition_on_previous_text", True)
        return inner
    return data


# request fields that describe one file: a command or batch of several files cannot give them
ONE_FILE_FIELDS = {"output_name": "names one file's outputs (with several files each is named after it)",
                   "audio_sha256": "is one file's content"}


def check_one_file_fields(request: dict[str, Any], files: int) -> None:
    """InvalidRequest when ``request`` sets a field of :data:`ONE_FILE_FIELDS` for several files."""
    for name, why in ONE_FILE_FIELDS.items():
        if request.get(name) and files > 1:
            raise InvalidRequest(f"{name} {why}: it cannot be given for {files} files")


class TranscriptionRequest(BaseModel):
    """Every input of a transcription run. Accepts the worker's ``{"input": {...}}`` envelope."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # ---- the original worker's inputs (names, types, defaults kept) ---------------
    audio_file: str = Field(..., min_length=1, description="Local path, http(s) URL or s3://bucket/key of the audio.")
    language: Optional[str] = Field(
        None, description="ISO code of the spoken language (e.g. 'en'); empty to detect it."
    )
    language_detection_min_prob: float = Field(
        0, ge=0, le=1,
        description="Detect the language on successive 30 s windows of speech until one reaches this probability.",
    )
    language_detection_max_tries: int = Field(
        5, ge=1, le=100, description="At most this many detection windows; then the most probable language wins."
    )
    initial_prompt: Optional[str] = Field(None, description="Text to prompt the first decoding window with.")
    batch_size: int = Field(64, ge=1, le=1024, description="Parallel decoding batch size.")
    temperature: float = Field(0, ge=0, le=1, description="Sampling temperature (0 = greedy/beam search).")
    vad_onset: float = Field(0.500, gt=0, lt=1, description="VAD onset threshold, in (0, 1).")
    vad_offset: float = Field(0.363, gt=0, lt=1, description="VAD offset threshold, in (0, 1).")
    align_output: bool = Field(False, description="Align words for accurate word-level timestamps.")
    diarization: bool = Field(False, description="Label segments and words with speakers.")
    huggingface_access_token: Optional[SecretStr] = Field(
        None, description="Hugging Face token for gated models (prefer the HF_TOKEN env var)."
    )
    min_speakers: Optional[int] = Field(None, ge=1, description="Minimum number of speakers.")
    max_speakers: Optional[int] = Field(None, ge=1, description="Maximum number of speakers.")
    debug: bool = Field(False, description="Add stage timings, model load time and peak memory to the result.")
    speaker_verification: bool = Field(False, description="Relabel speakers with enrolled names.")
    speaker_samples: list[SpeakerSample] = Field(default_factory=list, description="Enrolment clips [{name?, url}].")

    # ---- the pipeline script's controls --------------------------------------------
    align_backend: AlignBackend = Field(
        "auto", description="Word aligner: wav2vec2 (WhisperX), pocketsphinx (English, offline), whisper, or auto."
    )
    align_model: Optional[str] = Field(None, description="wav2vec2 align model name or local directory.")
    diarization_backend: DiarizationBackend = Field(
        "auto", description="Diarizer: pyannote (local pipeline), pyannote-api (hosted pyannoteAI), segmented "
        "(offline: segmentation + CAM++ + clustering on the audio), builtin (offline GE2E on the speech regions), or "
        "auto (the API when a key or pyannote_json_in is at hand, else pyannote if it loads, else segmented, else "
        "builtin)."
    )
    diarization_model: Optional[str] = Field(
        None, description="Local pyannote pipeline: hub name or directory (default WhisperX's community-1)."
    )
    pyannote_api_key: Optional[SecretStr] = Field(None, description="pyannoteAI key (prefer PYANNOTE_API_KEY).")
    pyannote_model: PyannoteModel = Field("precision-2", description="pyannoteAI model.")
    pyannote_exclusive: bool = Field(False, description="Use pyannoteAI's exclusive (non-overlapping) output.")
    pyannote_poll_interval: float = Field(5.0, gt=0, le=600, description="Seconds between pyannoteAI job polls.")
    pyannote_timeout: float = Field(
        1800.0, gt=0, le=6 * 3600,
        description="Give up on a pyannoteAI job after this many seconds (upload and polling included).",
    )
    pyannote_json_in: Optional[str] = Field(None, description="Reuse a saved <stem>.pyannote.job.json (no request).")
    deepgram_api_key: Optional[SecretStr] = Field(None, description="Deepgram key (prefer DEEPGRAM_API_KEY).")
    deepgram_json_in: Optional[str] = Field(None, description="Reuse a saved <stem>.deepgram.json (no request).")
    deepgram_model: str = Field("nova-3", min_length=1, description="Deepgram model for word confidence.")
    deepgram_tier: Optional[str] = Field(None, description="Deepgram tier (older models).")
    deepgram_version: Optional[str] = Field(None, description="Deepgram model version.")
    word_confidence_low_threshold: float = Field(0.6, ge=0, le=1, description="Segment flag 'low' below this average.")
    word_confidence_high_threshold: float = Field(0.85, ge=0, le=1, description="Segment flag 'high' at or above this.")
    low_confidence_min_dur: float = Field(0.5, ge=0, description="Seconds of contiguous low confidence that flag a segment low.")
    s3_endpoint: Optional[str] = Field(None, description="S3-compatible endpoint URL (MinIO, R2); default from env.")
    access_key: Optional[SecretStr] = Field(None, description="S3 access key id (prefer AWS_ACCESS_KEY_ID).")
    secret_key: Optional[SecretStr] = Field(None, description="S3 secret key (prefer AWS_SECRET_ACCESS_KEY).")
    upload: bool = Field(False, description="Upload the audio to the bucket under prefix_audio and presign it.")
    prefix_audio: Optional[str] = Field(None, description="Key prefix for uploaded audio (default audio/).")
    url_expiry: int = Field(3600, ge=1, le=604800, description="Presigned URL lifetime in seconds.")
    download_transcript: bool = Field(False, description="With a bucket: also write the outputs to download_dir.")
    speaker_encoder: SpeakerEncoder = Field(
        "auto", description="Verification encoder: SpeechBrain ECAPA, CAM++ (installed), the builtin GE2E, or auto "
        "(ECAPA if it loads, else CAM++, else builtin)."
    )
    speaker_threshold: Optional[float] = Field(
        None, ge=-1, le=1, description="Cosine similarity a diarized speaker (or turn) needs to take an enrolled name; "
        "default: the encoder's own (CAM++ 0.45, GE2E 0.80, ECAPA 0.25), calibrated for recordings whose people are all "
        "enrolled. Raise it when some people in a recording are not enrolled: their voices then keep SPEAKER_XX "
        "instead of taking the closest enrolled name.")
    model: Optional[str] = Field(
        None, description="Whisper model: a name (large-v3, base, ...), a directory, or bundled:base / bundled:tiny.en."
    )
    beam_size: Optional[int] = Field(None, description="Beam size (default 5); clipped to 1..10 as the worker did.")
    patience: float = Field(1.0, gt=0, le=10, description="Beam search patience factor.")
    length_penalty: float = Field(1.0, ge=0, le=10, description="Exponential length penalty of beam search.")
    no_speech_threshold: float = Field(
        0.6, ge=0, le=1, description="A window whose no-speech probability is above this (and whose average log "
        "probability is below log_prob_threshold) is treated as silence.")
    log_prob_threshold: float = Field(
        -1.0, le=0, description="Decoding below this average log probability is retried at a higher temperature.")
    compression_ratio_threshold: float = Field(
        2.4, gt=0, description="Decoding whose gzip compression ratio is above this is retried at a higher temperature.")
    condition_on_previous_text: Optional[bool] = Field(
        None, description="Prompt each window with the previous window's text (default off, as whisperx; on for "
        "requests in the RunPod worker's {\"input\": ...} envelope, as the worker forced it).")
    suppress_numerals: bool = Field(False, description="Suppress numeric and symbol tokens (numbers spelled out).")
    hotwords: Optional[str] = Field(None, description="Words or phrases to favour, given as a hint to the decoder.")
    temperature_increment_on_fallback: Optional[float] = Field(
        None, gt=0, le=1, description="When decoding fails the thresholds, retry at temperature + this, up to 1.0 "
        "(whisperx CLI: 0.2); default: no fallback.")
    task: TaskName = Field(
        "transcribe", description="transcribe (in the spoken language) or translate (to English).")
    chunk_size: int = Field(
        30, ge=1, le=30, description="Merge VAD speech into chunks of at most this many seconds (whisperx's "
        "--chunk_size); shorter chunks give shorter segments.")
    device: Optional[DeviceName] = Field(
        None, description="Device for transcription, wav2vec2 alignment and local pyannote diarization: auto, cpu "
        "or cuda (default WHISPERX_DEVICE; cuda without a GPU runs on the CPU with a warning).")
    compute_type: Optional[ComputeType] = Field(
        None, description="CTranslate2 compute type for transcription (default WHISPERX_COMPUTE_TYPE, else "
        "float16 on CUDA, int8 on CPU).")
    vad_method: VadMethod = Field(
        "pyannote", description="Voice activity detection: pyannote (whisperx's default; weights in the whisperx "
        "wheel) or silero (Silero VAD v6, the ONNX model bundled with faster-whisper; vad_onset is its speech "
        "threshold, vad_offset the level speech must fall below to end; far-field audio wants both lower).")
    threads: Optional[int] = Field(
        None, ge=1, le=256, description="CPU threads for this run's inference (whisperx's --threads; default "
        "WHISPERX_CPU_THREADS, else all cores); does not change the result.")
    segment_resolution: SegmentResolution = Field(
        "sentence", description="With word alignment: one segment per sentence (whisperx's default) or per "
        "transcription chunk, words aligned within it.")
    return_char_alignments: bool = Field(
        False, description="With word alignment by wav2vec2: also return per-character times (segments[].chars), "
        "as whisperx's --return_char_alignments.")
    num_speakers: Optional[int] = Field(None, ge=1, description="Exact number of speakers, when known: worth giving "
                                        "for telephone audio, where an estimated count is less reliable.")
    download_dir: Optional[str] = Field(
        None, description="Local folder for the outputs (default RESULTS_DIR or ./out); ignored when bucket is set."
    )
    bucket: Optional[str] = Field(None, description="S3 bucket for the outputs (default RESULTS_BUCKET).")
    prefix_transcripts: Optional[str] = Field(None, description="Key prefix for outputs in the bucket.")
    output_name: Optional[str] = Field(None, description="Stem of the output files (default: the audio's stem).")
    audio_sha256: Optional[str] = Field(
        None, description="The SHA-256 (hex) the audio's bytes must have: a run whose fetched audio differs fails and "
        "writes nothing (the object was replaced after the request was sent). The command line's remote mode sends "
        "it for every local file it uploads.")
    force: bool = Field(False, description="Recompute every stage even when a cached result exists.")
    output_format: Optional[OutputFormat] = Field(
        None, description="Files besides <stem>.json (always written): json (.segments.json), srt, vtt, txt, tsv or "
        "aud (Audacity labels), through whisperx's writers, or all of them; default: the worker's .segments.json, "
        ".srt and .vtt.")
    highlight_words: bool = Field(False, description="Underline each word in .srt/.vtt as it is spoken (needs word times).")
    max_line_width: Optional[int] = Field(None, ge=1, description="Subtitle line width in characters (needs word times).")
    max_line_count: Optional[int] = Field(None, ge=1, description="Lines per subtitle cue (needs max_line_width).")

    @model_validator(mode="before")
    @classmethod
    def _unwrap_envelope(cls, data: Any) -> Any:
        return unwrap_envelope(data)

    @field_validator("beam_size", mode="before")
    @classmethod
    def _clip_beam(cls, v: Any) -> Any:
        """The worker clipped beam_size to 1..10 instead of refusing it."""
        if v is None or isinstance(v, bool):
            return v
        try:
            return max(1, min(10, int(v)))
        except (TypeError, ValueError):
            return v  # pydantic reports it

    @field_validator("speaker_samples", mode="before")
    @classmethod
    def _sample_forms(cls, v: Any) -> Any:
        """Plain URL strings, and the worker's ``file_path`` key, as ``{name?, url}``."""
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, str):
                item = {"url": item}
            elif isinstance(item, dict) and "file_path" in item:
                item = dict(item)
                path = item.pop("file_path")
                item.setdefault("url", path)
                if not item.get("url"):
                    item["url"] = path
            out.append(item)
        return out

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, v: Any) -> Optional[str]:
        return normalize_language(v)

    @field_validator("initial_prompt", "model", "align_model", "diarization_model", "pyannote_json_in", "download_dir",
                     "bucket", "prefix_transcripts", "deepgram_json_in", "deepgram_tier", "deepgram_version",
                     "s3_endpoint", "prefix_audio", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator(*SECRET_FIELDS, mode="before")
    @classmethod
    def _blank_token(cls, v: Any) -> Any:
        return None if v in ("", None) else v

    @field_validator("audio_file")
    @classmethod
    def _audio_file(cls, v: str) -> str:
        v = v.strip()
        scheme = urlsplit(v).scheme.lower()
        if scheme and len(scheme) > 1 and scheme not in ("http", "https", "s3", "file"):
            raise ValueError(f"unsupported URL scheme {scheme!r}; use a local path, http(s):// or s3://")
        return v

    @field_validator("audio_sha256")
    @classmethod
    def _audio_sha256(cls, v: Optional[str]) -> Optional[str]:
        if v in (None, ""):
            return None
        if not re.fullmatch(r"[0-9a-fA-F]{64}", v.strip()):
            raise ValueError("audio_sha256 must be 64 hexadecimal digits (a SHA-256 digest)")
        return v.strip().lower()

    @field_validator("output_name")
    @classmethod
    def _output_name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("output_name may hold letters, digits, '.', '_' and '-' only (max 128)")
        return v

    @model_validator(mode="after")
    def _speakers(self) -> "TranscriptionRequest":
        check_speaker_counts(self.num_speakers, self.min_speakers, self.max_speakers)
        if self.word_confidence_low_threshold > self.word_confidence_high_threshold:
            raise ValueError("word_confidence_low_threshold must not exceed word_confidence_high_threshold")
        if self.speaker_verification and not self.speaker_samples:
            raise ValueError("speaker_verification needs at least one entry in speaker_samples")
        if self.speaker_samples and not self.speaker_verification:
            self.__dict__["speaker_verification"] = True  # as the worker: samples mean "name the speakers"
        return self

    @classmethod
    def parse(cls, data: Any = None, **kwargs: Any) -> "TranscriptionRequest":
        """Validate user input, turning pydantic's report into one clear ``InvalidRequest``."""
        payload = dict(data or {}, **kwargs) if isinstance(data, dict) or data is None else data
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None

    def public_dict(self) -> dict[str, Any]:
        """Parameters safe to log or store: secrets dropped, not just masked; credentials inside
        URLs (user-info, signed query parameters) masked."""
        from speech.redact import mask_url_credentials

        out = self.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        out["audio_file"] = mask_url_credentials(out["audio_file"])
        for sample in out.get("speaker_samples") or []:
            sample["url"] = mask_url_credentials(sample["url"])
        return out


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{loc}: {msg}")
    return "invalid request: " + "; ".join(parts)


_MOVED = frozenset({'AudioRef', 'TimedChar', 'TimedWord', 'Segment', 'Transcript', 'SpeakerInfo', 'SpeakerLabels', 'ConfidenceLabels', 'TranscriptionResult', 'OutputOptions', 'OutputRef', 'request_default', 'TranscribeParams', 'AlignParams', 'AlignOutcome', 'Turn', 'DiarizeParams', 'DiarizationOutcome', 'DeepgramOptions', 'ConfidenceThresholds', 'S3Options'})


def __getattr__(name: str) -> Any:
    """The stage contract lives in :mod:`speech.contracts`; its old place still resolves, for task
    results and cache records pickled before the move."""
    if name in _MOVED:
        from speech import contracts

        return getattr(contracts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
