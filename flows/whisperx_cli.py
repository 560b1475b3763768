"""whisperx's own command-line spellings on ours, so a whisperx command line runs as written.

Every request field already has a dashed flag (``--beam-size``); here it also gets whisperx's
underscore spelling (``--beam_size``), whisperx's renamed options map onto our fields
(``-o/--output_dir`` -> ``download_dir``, ``--diarize`` -> ``diarization``, ``--hf_token``,
``--logprob_threshold``, ``--diarize_model``, ``-f``), whisperx's ``--flag True/False`` value form
works for every on/off option (:func:`normalize_argv`), and the options whisperx has that do not
apply here are refused with one line that says what to use instead (:data:`NOT_SUPPORTED`).
``tests/test_cli_whisperx.py`` reads the installed whisperx's own parser and fails when one of
its options is neither accepted nor refused this way.
"""
from __future__ import annotations

import argparse
from typing import Any

# our field -> whisperx's other option strings for it
WHISPERX_NAMES: dict[str, list[str]] = {
    "download_dir": ["--output_dir", "-o"],
    "output_format": ["-f"],
    "diarization": ["--diarize"],
    "diarization_model": ["--diarize_model"],
    "huggingface_access_token": ["--hf_token"],
    "log_prob_threshold": ["--logprob_threshold", "--logprob-threshold"],
}

# whisperx's options that have no counterpart here, and what to do instead
NOT_SUPPORTED: dict[str, str] = {
    "--model_dir": "set WHISPERX_MODEL_DIR to a faster-whisper model folder, or give --model a folder",
    "--model_cache_only": "models load from SPEECH_CACHE_DIR / HF_HOME; without network only cached ones load anyway",
    "--device_index": "choose the GPU with CUDA_VISIBLE_DEVICES",
    "--fp16": "choose the precision with --compute-type (float16, float32, int8)",
    "--best_of": "the sampling fallback keeps faster-whisper's candidates; set --temperature / "
                 "--temperature-increment-on-fallback",
    "--interpolate_method": "words the aligner cannot place keep whisperx's 'nearest' timing",
    "--speaker_embeddings": "the result names speakers (speaker_verification) instead of carrying raw embeddings",
    "--suppress_tokens": "faster-whisper's default suppression (-1) is used; --suppress-numerals is supported",
    "--log-level": "use -v for every log, or CONSOLE_LOG_LEVEL for flow-run logs",
}

TRUE, FALSE = {"true", "t", "yes", "y", "1"}, {"false", "f", "no", "n", "0"}


class _Refuse(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        parser.error(f"whisperx's {option_string} is not supported here: {NOT_SUPPORTED[self.option_strings[0]]}")


def add_refusals(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("whisperx options with no counterpart (refused with what to use instead)")
    for option in NOT_SUPPORTED:
        group.add_argument(option, nargs="?", action=_Refuse, help=argparse.SUPPRESS)


def normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """whisperx's ``--flag True`` / ``--flag False`` for on/off options: ``True`` keeps the flag,
    ``False`` becomes its negation (``--no-...``) or drops it when it has none."""
    on: dict[str, Any] = {}
    off: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._StoreTrueAction):
            for option in action.option_strings:
                on[option] = action.dest
        elif isinstance(action, argparse._StoreFalseAction) and action.option_strings:
            off.setdefault(action.dest, action.option_strings[0])
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        option, eq, inline = token.partition("=")
        if option in on and (eq or (i + 1 < len(argv) and argv[i + 1].lower() in TRUE | FALSE)):
            value = inline if eq else argv[i + 1]
            i += 1 if eq else 2
            if value.lower() in TRUE:
                out.append(option)
            elif value.lower() in FALSE:
                if on[option] in off:
                    out.append(off[on[option]])
            else:
                parser.error(f"{option}: expected True or False, got {value!r}")
            continue
        out.append(token)
        i += 1
    return out
