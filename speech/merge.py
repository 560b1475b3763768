"""Assemble the final result from the stages' outputs."""
from __future__ import annotations

from typing import Any, Optional

from speech.align import AlignOutcome
from speech.schema import AudioRef, ConfidenceLabels, SpeakerLabels, Transcript, TranscriptionResult


def build_result(
    audio: AudioRef,
    transcript: Transcript,
    alignment: Optional[AlignOutcome] = None,
    speakers: Optional[SpeakerLabels] = None,
    confidence: Optional[ConfidenceLabels] = None,
    debug: bool = False,
    stage_seconds: Optional[dict[str, float]] = None,
    cached_stages: Optional[list[str]] = None,
) -> TranscriptionResult:
    """The worker's JSON: segments, detected_language, language_probability (+ debug)."""
    extra: Optional[dict[str, Any]] = None
    if debug:
        asr_seconds = transcript.processing_seconds()
        extra = {
            "model": transcript.model,
            "device": transcript.device,
            "compute_type": transcript.compute_type,
            "audio_seconds": audio.duration,
            "audio_sha256": audio.sha256,
            "transcribe_timings": transcript.timings,
            "model_load_seconds": transcript.timings.get("model_load", 0.0),
            "language_detection_tries": transcript.language_detection_tries,
            "peak_memory_mb": transcript.peak_memory_mb,
            "real_time_factor": round(asr_seconds / audio.duration, 4) if audio.duration else None,
        }
        if stage_seconds:
            extra["stage_seconds"] = stage_seconds
        # timings of a cached stage are those of the run that computed it
        extra["cached_stages"] = cached_stages or []
        if alignment is not None:
            extra["align_seconds"] = alignment.seconds
        if speakers is not None:
            extra["diarization"] = speakers.summary
    segments = alignment.segments if alignment is not None else transcript.segments
    if speakers is not None and speakers.speakers:
        segments = speakers.segments
    if confidence is not None:
        segments = confidence.segments
    return TranscriptionResult(
        segments=segments,
        speakers=speakers.speakers if speakers is not None and speakers.speakers else None,
        confidence=confidence.summary if confidence is not None else None,
        unclear_intervals=confidence.unclear_intervals if confidence is not None else None,
        alignment=None if alignment is None else alignment.summary(),
        detected_language=transcript.language,
        language_probability=transcript.language_probability,
        debug=extra,
    )
