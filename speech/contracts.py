"""The typed contract between stages: what each stage gets and gives. Each stage's parameters
(``*Params``, ``DeepgramOptions``: its cache key, with the audio hash) are built from the request
(:class:`speech.schema.TranscriptionRequest`) with ``from_request``; its output (``Transcript``,
``AlignOutcome``, ``DiarizationOutcome`` ...) is what the next stage gets: small references and
metadata, never big arrays. ``TranscriptionResult`` is the worker's JSON output.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from speech.schema import (
    SAMPLE_RATE,
    AlignBackend,
    AudioBand,
    ComputeType,
    DeviceName,
    DiarizationBackend,
    OutputFormat,
    PyannoteModel,
    SegmentResolution,
    TaskName,
    TranscriptionRequest,
    VadMethod,
    check_speaker_counts,
)


class AudioRef(BaseModel):
    """Fetched audio: its identity, and where its 16 kHz mono float32 samples are (or will be,
    once a stage needs them) cached on disk."""

    sha256: str = Field(..., description="sha256 of the source bytes")
    source: str = Field(..., description="where it came from (URL query strings dropped)")
    stem: str = Field(..., description="output file stem")
    decoded_path: str = Field(..., description="float32 .npy of the 16 kHz mono samples")
    duration: float = Field(..., description="seconds: decoded, else as the file's header declares (0 if unknown)")
    sample_rate: int = SAMPLE_RATE
    size_bytes: int
    format: str = Field(..., description="container/codec as PyAV reports it")
    local_path: Optional[str] = Field(None, description="the bytes on this machine, kept until decoded")
    temporary: bool = Field(False, description="local_path is a download of ours, deleted once decoded")
    shared: Optional[str] = Field(None, description="the bytes' path in the shared result storage, for task "
                                  "workers on other machines")


class TimedChar(BaseModel):
    """One character of an aligned segment (whisperx's ``chars``; no times when it has no frames)."""

    model_config = ConfigDict(extra="forbid")
    char: str
    start: Optional[float] = None
    end: Optional[float] = None
    score: Optional[float] = None


class TimedWord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str
    start: Optional[float] = None
    end: Optional[float] = None
    score: Optional[float] = None
    speaker: Optional[str] = None
    confidence: Optional[float] = None


class Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: float
    end: float
    text: str
    words: Optional[list[TimedWord]] = None
    speaker: Optional[str] = None
    speaker_id: Optional[str] = Field(None, description="the diarization label behind an enrolled name (the worker's)")
    similarity: Optional[float] = Field(None, description="that label's cosine similarity to the name (the worker's)")
    confidence: Optional[float] = None
    confidence_flag: Optional[str] = None
    chars: Optional[list[TimedChar]] = Field(None, description="per-character times (return_char_alignments)")


class Transcript(BaseModel):
    """Output of the transcribe stage."""

    segments: list[Segment]
    language: Optional[str]
    language_probability: Optional[float] = None
    language_detection_tries: int = 0
    model: str
    model_source: str = Field("", description="the directory or hub name that was loaded")
    device: str
    compute_type: str
    threads: Optional[int] = Field(None, description="the run's own CPU threads (finds the loaded model again)")
    timings: dict[str, float] = Field(default_factory=dict)
    peak_memory_mb: Optional[float] = None

    def processing_seconds(self) -> float:
        """VAD + language detection + decoding: the part that scales with audio length."""
        return sum(v for k, v in self.timings.items() if k not in ("import", "model_load"))


class SpeakerInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    time: float


class SpeakerLabels(BaseModel):
    """Output of the speaker stages: labelled (and possibly split) segments + talk times."""

    segments: list[Segment]
    speakers: dict[str, SpeakerInfo]
    summary: dict[str, Any] = Field(default_factory=dict, description="backend, errors, names matched")


class ConfidenceLabels(BaseModel):
    """Output of the confidence stage: annotated segments, a summary, unclear intervals."""

    segments: list[Segment]
    summary: dict[str, Any] = Field(default_factory=dict)
    unclear_intervals: list[dict[str, Any]] = Field(default_factory=list)


class TranscriptionResult(BaseModel):
    """The original worker's JSON (plus optional additive keys)."""

    model_config = ConfigDict(extra="forbid")
    segments: list[Segment]
    detected_language: Optional[str] = Field(None, description="None only when the audio holds no speech")
    language_probability: Optional[float] = None
    speakers: Optional[dict[str, SpeakerInfo]] = None
    alignment: Optional[dict[str, Any]] = None
    debug: Optional[dict[str, Any]] = None
    confidence: Optional[dict[str, Any]] = None
    unclear_intervals: Optional[list[dict[str, Any]]] = None
    language: Optional[str] = Field(None, description="whisperx's key: the language of the segments")
    word_segments: Optional[list[TimedWord]] = Field(
        None, description="whisperx's key: every timed word in order (present once words are aligned)")
    verification: Optional[dict[str, Any]] = Field(None, description="enrolled names: which speaker got which, "
                                                   "and why the others kept their SPEAKER_XX label")

    def to_json(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude_none=True)
        out.setdefault("detected_language", None)  # always present, as in the worker's output
        out.setdefault("language_probability", None)  # null when the language was given
        return out


class OutputOptions(BaseModel):
    """Which files the output stage renders, and the subtitle writers' options (whisperx CLI's)."""

    output_format: Optional[OutputFormat] = None
    highlight_words: bool = False
    max_line_width: Optional[int] = None
    max_line_count: Optional[int] = None

    @classmethod
    def from_request(cls, req: "TranscriptionRequest") -> "OutputOptions":
        return cls(**req.model_dump(include=set(cls.model_fields)))


class OutputRef(BaseModel):
    """Where one output file landed."""

    name: str
    uri: str
    size_bytes: int
    url: Optional[str] = Field(None, description="an http(s) address of the object (S3: path-style on the "
                               "store's endpoint, not presigned: opening it needs the bucket's credentials)")


def request_default(field: str) -> Any:
    """A request field's default: stage parameters and the flow signature take theirs from the
    request, never a copy."""
    return TranscriptionRequest.model_fields[field].default


class TranscribeParams(BaseModel):
    """The transcribe stage's own parameters (its cache key, with the audio hash)."""

    model: Optional[str] = None
    language: Optional[str] = None
    language_detection_min_prob: float = request_default("language_detection_min_prob")
    language_detection_max_tries: int = request_default("language_detection_max_tries")
    initial_prompt: Optional[str] = None
    batch_size: int = request_default("batch_size")
    temperature: float = request_default("temperature")
    beam_size: Optional[int] = None
    vad_onset: float = request_default("vad_onset")
    vad_offset: float = request_default("vad_offset")
    patience: float = request_default("patience")
    length_penalty: float = request_default("length_penalty")
    no_speech_threshold: float = request_default("no_speech_threshold")
    log_prob_threshold: float = request_default("log_prob_threshold")
    compression_ratio_threshold: float = request_default("compression_ratio_threshold")
    condition_on_previous_text: Optional[bool] = None
    suppress_numerals: bool = request_default("suppress_numerals")
    hotwords: Optional[str] = None
    temperature_increment_on_fallback: Optional[float] = None
    task: TaskName = request_default("task")
    chunk_size: int = request_default("chunk_size")
    device: Optional[DeviceName] = None
    compute_type: Optional[ComputeType] = None
    vad_method: VadMethod = request_default("vad_method")
    threads: Optional[int] = Field(None, description="not part of the cache key: the result does not depend on it")

    def cache_fields(self) -> dict[str, Any]:
        """What the result depends on (the cache key's share of these params); the model, device
        and compute type count as resolved (the key adds them), not as asked, so a worker that
        fills in the model it serves shares cache entries with a run that named the same one."""
        return self.model_dump(exclude={"threads", "model", "device", "compute_type"})

    def asr_options(self) -> dict[str, Any]:
        """whisperx's ``asr_options`` (faster-whisper's TranscriptionOptions) for these params."""
        temps = [self.temperature]
        if self.temperature_increment_on_fallback:
            t = self.temperature
            while t + self.temperature_increment_on_fallback <= 1.0 + 1e-9:
                t = round(t + self.temperature_increment_on_fallback, 4)
                temps.append(t)
        opts: dict[str, Any] = {
            "temperatures": temps, "initial_prompt": self.initial_prompt, "patience": self.patience,
            "length_penalty": self.length_penalty, "no_speech_threshold": self.no_speech_threshold,
            "log_prob_threshold": self.log_prob_threshold,
            "compression_ratio_threshold": self.compression_ratio_threshold,
            "condition_on_previous_text": bool(self.condition_on_previous_text),
            "suppress_numerals": self.suppress_numerals, "hotwords": self.hotwords,
        }
        if self.beam_size is not None:
            opts["beam_size"] = self.beam_size
        return opts

    @classmethod
    def from_request(cls, req: TranscriptionRequest) -> "TranscribeParams":
        return cls(**req.model_dump(include=set(cls.model_fields)))


class AlignParams(BaseModel):
    """The align stage's own parameters (its cache key, with the audio hash + transcript)."""

    backend: AlignBackend = request_default("align_backend")
    align_model: Optional[str] = Field(None, description="wav2vec2 model name or local directory")
    interpolate_method: Literal["nearest", "linear", "ignore"] = "nearest"
    segment_resolution: SegmentResolution = request_default("segment_resolution")
    return_char_alignments: bool = False
    device: Optional[DeviceName] = Field(None, description="the run's device for wav2vec2 (whisper aligns where "
                                         "it transcribed)")

    @classmethod
    def from_request(cls, req: TranscriptionRequest) -> "AlignParams":
        return cls(backend=req.align_backend, align_model=req.align_model, device=req.device,
                   segment_resolution=req.segment_resolution, return_char_alignments=req.return_char_alignments)


class AlignOutcome(BaseModel):
    segments: list[Segment]
    backend: Optional[str] = None  # the backend that produced the word times; None = not aligned
    error: Optional[str] = None
    seconds: float = 0.0
    settled: bool = Field(True, description="False when no backend succeeded or one failed transiently: "
                          "a later run should try again, so the outcome is not cached")
    chars_error: Optional[str] = Field(None, description="why character times were asked for but not given")

    def summary(self) -> dict[str, Any]:
        """The result's ``alignment`` key: which backend ran (None = segment times kept)."""
        out: dict[str, Any] = {"backend": self.backend}
        if self.error:
            out["error"] = self.error
        if self.chars_error:
            out["chars_error"] = self.chars_error
        return out


class Turn(BaseModel):
    start: float
    end: float
    speaker: str


class DiarizeParams(BaseModel):
    """The diarize stage's own parameters (its cache key, with the audio hash and speech regions)."""

    backend: DiarizationBackend = request_default("diarization_backend")
    num_speakers: Optional[int] = Field(None, ge=1, description="Exact number of speakers, when known.")
    min_speakers: Optional[int] = Field(None, ge=1)
    max_speakers: Optional[int] = Field(None, ge=1)
    model: Optional[str] = Field(None, description="local pyannote pipeline: hub name or directory")
    # hosted pyannoteAI
    pyannote_model: PyannoteModel = request_default("pyannote_model")
    pyannote_exclusive: bool = request_default("pyannote_exclusive")
    pyannote_poll_interval: float = request_default("pyannote_poll_interval")
    pyannote_timeout: float = request_default("pyannote_timeout")
    pyannote_json_in: Optional[str] = Field(None, description="a saved <stem>.pyannote.job.json to reuse")
    device: Optional[DeviceName] = Field(None, description="the run's device for the local pyannote pipeline")

    def hosted_first(self, has_key: bool) -> bool:
        """Whether the hosted pyannoteAI API runs (first): chosen, or ``auto`` with a saved job
        or an API key at hand (the original pipeline's diarizer)."""
        return self.backend == "pyannote-api" or (
            self.backend == "auto" and (bool(self.pyannote_json_in) or has_key))

    @classmethod
    def from_request(cls, req: TranscriptionRequest) -> "DiarizeParams":
        return cls(backend=req.diarization_backend, model=req.diarization_model,
                   **req.model_dump(include=set(cls.model_fields) - {"backend", "model"}))

    @model_validator(mode="after")
    def _bounds(self) -> "DiarizeParams":
        check_speaker_counts(self.num_speakers, self.min_speakers, self.max_speakers)
        return self


class DiarizationOutcome(BaseModel):
    turns: list[Turn]
    backend: Optional[str] = None
    error: Optional[str] = None
    seconds: float = 0.0
    band: Optional[AudioBand] = Field(None, description="the input's band as the segmented diarizer measured it: "
                                      "narrowband = nothing above 4 kHz, telephone = 300-3400 Hz")
    settled: bool = Field(True, description="False when no backend succeeded or one failed transiently: "
                          "a later run should try again, so the outcome is not cached")
    chars_error: Optional[str] = Field(None, description="why character times were asked for but not given")
    job: Optional[dict[str, Any]] = Field(None, description="pyannoteAI job JSON (saved as <stem>.pyannote.job.json)")


class DeepgramOptions(BaseModel):
    """Deepgram model options, sent as query parameters (and part of the stage's cache key)."""

    model: str = Field(request_default("deepgram_model"), min_length=1, description="Deepgram model, e.g. nova-3, nova-2.")
    tier: Optional[str] = Field(None, description="Model tier (older models, e.g. enhanced/base).")
    version: Optional[str] = Field(None, description="Model version, e.g. latest.")
    language: Optional[str] = Field(
        None, description="Spoken language (BCP-47, e.g. en, de); the pipeline sends the transcript's language, "
        "since Deepgram otherwise assumes English and its word confidences would be for the wrong language.")

    @classmethod
    def from_request(cls, req: TranscriptionRequest, language: Optional[str]) -> "DeepgramOptions":
        return cls(model=req.deepgram_model, tier=req.deepgram_tier, version=req.deepgram_version, language=language)


class ConfidenceThresholds(BaseModel):
    """How word confidences become segment flags and unclear intervals."""

    low: float = request_default("word_confidence_low_threshold")
    high: float = request_default("word_confidence_high_threshold")
    min_low_dur: float = request_default("low_confidence_min_dur")
    join_gap: float = Field(0.3, description="low words at most this far apart form one unclear interval")

    @classmethod
    def from_request(cls, req: TranscriptionRequest) -> "ConfidenceThresholds":
        return cls(low=req.word_confidence_low_threshold, high=req.word_confidence_high_threshold,
                   min_low_dur=req.low_confidence_min_dur)


class S3Options(BaseModel):
    """A run's own S3 endpoint / credentials, over the environment's."""

    endpoint: Optional[str] = None
    access_key: Optional[SecretStr] = None
    secret_key: Optional[SecretStr] = None

    @classmethod
    def from_request(cls, req: TranscriptionRequest) -> "S3Options":
        return cls(endpoint=req.s3_endpoint, access_key=req.access_key, secret_key=req.secret_key)

    def given(self) -> bool:
        return any((self.endpoint, self.access_key, self.secret_key))
