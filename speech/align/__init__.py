"""Word alignment: :func:`speech.align.stage.align` and its backends (wav2vec2, pocketsphinx, whisper)."""
