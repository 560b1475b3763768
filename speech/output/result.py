"""Assemble the final result from the stages' outputs."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from speech.contracts import AlignOutcome, AudioRef, ConfidenceLabels, SpeakerLabels, Transcript, TranscriptionResult


class PipelineResults(BaseModel):
    """Everything one run produced, handed to the output stage as one typed bundle."""

    audio: AudioRef
    transcript: Transcript
    alignment: Optional[AlignOutcome] = None
    speakers: Optional[SpeakerLabels] = None
    confidence: Optional[ConfidenceLabels] = None
    extra_files: dict[str, Any] = Field(default_factory=dict, description="helper artefacts by file name "
                                        "(<stem>.deepgram.json, <stem>.pyannote.job.json)")
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    cached_stages: list[str] = Field(default_factory=list)
    model_loads: int = Field(0, description="models this run loaded into its process (0 when every stage was cached)")
    debug: bool = False

    def final_segments(self) -> list:
        """The most refined segments so far: confidence > speakers > alignment > transcript."""
        if self.confidence is not None:
            return self.confidence.segments
        if self.speakers is not None and self.speakers.speakers:
            return self.speakers.segments
        return self.alignment.segments if self.alignment is not None else self.transcript.segments


def build_result(run: PipelineResults) -> TranscriptionResult:
    """The worker's JSON: segments, detected_language, language_probability (+ debug)."""
    speakers, confidence, alignment = run.speakers, run.confidence, run.alignment
    segments = run.final_segments()
    words = [w for s in segments for w in (s.words or []) if w.start is not None]
    return TranscriptionResult(
        segments=segments,
        language=run.transcript.language,
        word_segments=words or None,
        speakers=speakers.speakers if speakers is not None and speakers.speakers else None,
        confidence=confidence.summary if confidence is not None else None,
        unclear_intervals=confidence.unclear_intervals if confidence is not None else None,
        alignment=None if alignment is None else alignment.summary(),
        verification=speakers.summary.get("verification") if speakers is not None else None,
        detected_language=run.transcript.language,
        language_probability=run.transcript.language_probability,
        debug=_debug(run) if run.debug else None,
    )


def _debug(run: PipelineResults) -> dict[str, Any]:
    transcript, audio = run.transcript, run.audio
    extra: dict[str, Any] = {
        "model": transcript.model,
        "device": transcript.device,
        "compute_type": transcript.compute_type,
        "audio_seconds": audio.duration,
        "audio_sha256": audio.sha256,
        "transcribe_timings": transcript.timings,
        "model_load_seconds": transcript.timings.get("model_load", 0.0),
        "language_detection_tries": transcript.language_detection_tries,
        "peak_memory_mb": transcript.peak_memory_mb,
        "real_time_factor": round(transcript.processing_seconds() / audio.duration, 4) if audio.duration else None,
    }
    if run.stage_seconds:
        extra["stage_seconds"] = run.stage_seconds
    # timings of a cached stage are those of the run that computed it
    extra["cached_stages"] = run.cached_stages
    extra["model_loads"] = run.model_loads
    if run.alignment is not None:
        extra["align_seconds"] = run.alignment.seconds
    if run.speakers is not None:
        extra["diarization"] = run.speakers.summary
    return extra
