"""whisperx's own command-line spellings (issue 21): every option of the installed whisperx's
parser is accepted by ours under its own spelling and value form, mapped to our field, or
refused with one line that says what to use instead. The parser is read from whisperx itself,
so an option a whisperx upgrade adds fails this test until it is handled."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


GIVEN = {"--language": "en", "--device": "cpu", "--model": "bundled:base"}  # values whisperx users give


class _Captured(Exception):
    pass


def whisperx_parser() -> argparse.ArgumentParser:
    """The ArgumentParser whisperx's ``cli()`` builds (caught as it parses)."""
    import whisperx.__main__ as entry

    seen = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        seen["parser"] = self
        raise _Captured

    argparse.ArgumentParser.parse_args = capture
    try:
        entry.cli()
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen["parser"]


def sample_argv(action: argparse.Action, option: str) -> list[str]:
    """``option`` with a value of the kind whisperx takes for it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [option]
    if option in GIVEN:
        return [option, GIVEN[option]]
    if getattr(action.type, "__name__", "") == "str2bool":
        return [option, "True"]
    if action.choices:
        return [option, sorted(map(str, action.choices))[0]]
    name = getattr(action.type, "__name__", "")
    return [option, "2" if "int" in name else "0.5" if "float" in name else "value"]


def test_every_whisperx_option_is_accepted_or_refused_with_a_reason():
    from flows.cli import build_parser
    from flows.whisperx_cli import NOT_SUPPORTED, normalize_argv

    ours = build_parser()
    theirs = whisperx_parser()
    checked = refused = 0
    for action in theirs._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for option in action.option_strings:
            argv = ["a.wav", *sample_argv(action, option)]
            try:
                ours.exit_on_error = False
                ours.parse_args(normalize_argv(argv, ours))
            except (SystemExit, argparse.ArgumentError):
                done = subprocess.run([sys.executable, "-m", "flows.transcribe", *argv], cwd=ROOT, capture_output=True,
                                      text=True, timeout=120)
                last = done.stderr.strip().splitlines()[-1]
                assert done.returncode == 2 and f"whisperx's {option} is not supported here: " in last, (option, last)
                refused += 1
            checked += 1
    assert checked >= 45 and refused <= len(NOT_SUPPORTED), (checked, refused)  # whisperx 3.8.6: 50 option strings, 9 refused


@pytest.mark.parametrize("argv,expected", [
    (["-o", "out", "-f", "srt"], {"download_dir": "out", "output_format": "srt"}),
    (["--output_dir", "out", "--output_format", "vtt"], {"download_dir": "out", "output_format": "vtt"}),
    (["--diarize", "--hf_token", "hf_x", "--diarize_model", "pyannote/speaker-diarization-3.1"],
     {"diarization": True, "huggingface_access_token": "hf_x", "diarization_model": "pyannote/speaker-diarization-3.1"}),
    (["--logprob_threshold", "-0.5", "--logprob-threshold", "-0.7"], {"log_prob_threshold": -0.7}),
    (["--no_align", "--batch_size", "4", "--compute_type", "int8", "--vad_method", "silero"],
     {"align_output": False, "batch_size": 4, "compute_type": "int8", "vad_method": "silero"}),
    (["--highlight_words", "True", "--suppress_numerals", "--segment_resolution", "chunk"],
     {"highlight_words": True, "suppress_numerals": True, "segment_resolution": "chunk"}),
    (["--condition_on_previous_text", "False", "--print_progress", "True"],
     {"condition_on_previous_text": False, "print_progress": True}),
    (["--beam-size", "3", "--no-align", "--print-progress"], {"beam_size": 3, "align_output": False, "print_progress": True}),
])
def test_whisperx_spellings_map_to_our_fields(argv, expected):
    from flows.cli import build_parser
    from flows.whisperx_cli import normalize_argv

    parser = build_parser()
    args = vars(parser.parse_args(normalize_argv(["a.wav", *argv], parser)))
    assert {k: args[k] for k in expected} == expected
