"""Speakers: diarization (:mod:`.diarize` and its backends), speakers onto words (:mod:`.assign`),
enrolled names (:mod:`.verify` with :mod:`.encoders`)."""
