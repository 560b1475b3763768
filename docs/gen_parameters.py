"""Generate docs/parameters.md from the code: the request schema, the CLI parser and the settings.

    .venv/bin/python docs/gen_parameters.py           # print the page
    .venv/bin/python docs/gen_parameters.py --write   # rewrite docs/parameters.md
    .venv/bin/python docs/gen_parameters.py --check   # exit 1 when docs/parameters.md is stale

Sources: ``speech.schema.TranscriptionRequest.model_fields`` (name, type, default, constraints,
description), the CLI's own parser (``flows.cli.build_parser``: every option string that sets
the field, whisperx's spellings from ``flows.whisperx_cli.WHISPERX_NAMES`` included; the options
refused with a reason from ``flows.whisperx_cli.NOT_SUPPORTED``), ``speech.settings.Settings``
(environment variables: ``validation_alias`` names, defaults, descriptions) and
``speech.settings.SECRETS``. ``tests/test_docs.py`` fails when the page differs from this output.
"""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parent / "parameters.md"
REGENERATE = ".venv/bin/python docs/gen_parameters.py --write"

# defaults computed at start-up, shown as the rule that computes them
COMPUTED_DEFAULTS = {
    "cache_dir": "`$XDG_CACHE_HOME/speech-pipeline`, else `~/.cache/speech-pipeline`",
}


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _type_name(annotation: Any) -> str:
    from pydantic import SecretStr

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _type_name(inner[0])
        return " or ".join(_type_name(a) for a in inner)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        item = args[0] if args else Any
        if getattr(item, "__name__", "") == "SpeakerSample":
            return "list of `{name?, url}`"
        return f"list of {_type_name(item)}"
    if annotation is SecretStr:
        return "secret"
    if annotation is bool:
        return "on/off"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation is str:
        return "text"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(name: str, field: Any) -> str:
    from pydantic import SecretStr
    from pydantic_core import PydanticUndefined

    if name in COMPUTED_DEFAULTS:
        return COMPUTED_DEFAULTS[name]
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "computed"
        return f"`{value!r}`" if value in ([], {}) else "computed"
    value = field.default
    if value is PydanticUndefined:
        return "**required**"
    if value is None or isinstance(value, SecretStr):
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value == "":
        return "(empty)"
    return f"`{value}`"


def _constraints(field: Any) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    parts = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _parser() -> argparse.ArgumentParser:
    from flows.cli import build_parser

    return build_parser()


def _cli_options() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Field name -> the CLI option strings that set it (on / off), read from the real parser."""
    on: dict[str, list[str]] = {}
    off: dict[str, list[str]] = {}
    for action in _parser()._actions:
        if not action.option_strings:
            continue
        target = off if isinstance(action, argparse._StoreFalseAction) else on
        known = target.setdefault(action.dest, [])
        known.extend(o for o in action.option_strings if o not in known)
    return on, off


def _flags(name: str, on: dict[str, list[str]], off: dict[str, list[str]]) -> str:
    if name == "audio_file":
        return "`AUDIO` (positional; several files run as one batch)"
    if name == "speaker_samples":
        return "`--speaker-sample NAME=URL_OR_PATH` (repeatable)"
    flags = [f"`{o}`" for o in on.get(name, [])]
    if off.get(name):
        flags.append("off: " + ", ".join(f"`{o}`" for o in off[name]))
    return ", ".join(flags) or "(no flag: `--params-json`)"


def _env_names(field: Any) -> list[str]:
    alias = field.validation_alias
    if alias is None:
        return []
    if isinstance(alias, str):
        return [alias]
    return [c for c in getattr(alias, "choices", []) if isinstance(c, str)]


def render() -> str:
    from flows.whisperx_cli import NOT_SUPPORTED
    from speech.schema import TranscriptionRequest
    from speech.settings import SECRETS, Settings

    on, off = _cli_options()
    out = [
        "<!-- Generated by docs/gen_parameters.py from speech/schema.py, flows/cli.py, flows/whisperx_cli.py and",
        f"     speech/settings.py. Do not edit by hand: run `{REGENERATE}` (tests/test_docs.py checks it). -->",
        "",
        "# Parameter reference",
        "",
        "Every request field of `speech.schema.TranscriptionRequest`: the flow's keyword arguments and the",
        "Prefect UI's Run form (`transcribe-audio`), the RunPod-style `input` object, `--params-json`, and",
        "the CLI flags generated from the schema (`whisperx-prefect --help`). Defaults live in the schema",
        "only. How requests are accepted (the worker's `{\"input\": ...}` envelope, errors):",
        "[running.md](running.md#requests). Environment variables: [below](#environment-variables-speechsettingspy)",
        "and [configuration.md](configuration.md).",
        "",
        "## Request fields",
        "",
        "| field | CLI flags | type | default | constraints | description |",
        "|---|---|---|---|---|---|",
    ]
    for name, field in TranscriptionRequest.model_fields.items():
        out.append("| " + " | ".join([
            f"`{name}`", _cell(_flags(name, on, off)), _cell(_type_name(field.annotation)), _cell(_default(name, field)),
            _cell(_constraints(field)), _cell(field.description or ""),
        ]) + " |")
    out += [
        "",
        "Tokens (`secret`) are better not passed as parameters at all: each has an environment variable and a",
        "Prefect Secret block, and `prefect-secret:<block name>` as the value makes a run read that block",
        "([security.md](security.md)):",
        "",
        "| request field | environment variable | Prefect Secret block |",
        "|---|---|---|",
    ]
    for spec in SECRETS:
        block = f"`{spec.block}`" if spec.block else "(an `AwsCredentials` / `S3Bucket` block)"
        out.append(f"| `{spec.request_field}` | `{spec.env}` | {block} |")
    out += [
        "",
        "## Command-line options that are not request fields",
        "",
        "| option | what |",
        "|---|---|",
    ]
    for action in _parser()._actions:
        if (not action.option_strings or action.dest in TranscriptionRequest.model_fields
                or action.help in (None, argparse.SUPPRESS)):
            continue
        metavar = f" {action.metavar}" if action.metavar else ""
        options = ", ".join(f"`{o}{metavar}`" for o in action.option_strings)
        text = argparse.HelpFormatter(prog="whisperx-prefect")._expand_help(action)  # %(default)s, %%
        out.append(f"| {_cell(options)} | {_cell(text)} |")
    out += [
        "",
        "### whisperx options refused here",
        "",
        "whisperx's own options that have no counterpart are refused with one line saying what to use:",
        "",
        "| whisperx option | instead |",
        "|---|---|",
    ]
    for option, instead in NOT_SUPPORTED.items():
        out.append(f"| `{option}` | {_cell(instead)} |")
    out += [
        "",
        "## Environment variables (`speech/settings.py`)",
        "",
        "Read once per process by `speech.settings.Settings` (the first name listed wins over the",
        "others; empty values count as unset). Variables read elsewhere, and what each means in",
        "practice: [configuration.md](configuration.md).",
        "",
        "| variable | type | default | constraints | description |",
        "|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        names = _env_names(field) or [name.upper()]
        out.append("| " + " | ".join([
            ", ".join(f"`{n}`" for n in names), _cell(_type_name(field.annotation)), _cell(_default(name, field)),
            _cell(_constraints(field)), _cell(field.description or ""),
        ]) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docs/gen_parameters.py", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {PAGE.name}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {PAGE.name} differs from the output")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        PAGE.write_text(text, encoding="utf-8")
        print(f"wrote {PAGE}")
        return 0
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
        if current != text:
            print(f"{PAGE} is out of date: run `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{PAGE.name} is up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
