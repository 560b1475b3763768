"""What the CLI prints when a run ends: the transcript (or JSON) on stdout, the timing and where
the outputs went on stderr; for several files, one line per failure."""
from __future__ import annotations

import argparse
import json
import time
from typing import Any


def report(args: argparse.Namespace, result: dict[str, Any], outputs: list[Any], started: float,
           console: Any) -> int:
    """One file's outcome: the transcript (or JSON) on stdout, the timing and outputs on stderr."""
    if args.print_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_transcript(result)
    prob = result.get("language_probability")
    n = len(result["segments"])
    console.print(
        f"[green]done[/green] in {time.perf_counter() - started:.1f} s: {n} segment{'' if n == 1 else 's'}, "
        f"language {result.get('detected_language')}" + (f" (p={prob:.2f})" if prob is not None else "")
    )
    for line in describe_outputs(outputs) or ["(not reported)"]:
        console.print(f"outputs: {line}")
    return 0


def report_batch(args: argparse.Namespace, result: dict[str, Any], outputs: list[Any], started: float,
                 console: Any) -> int:
    """The batch's outcome: JSON ({succeeded, failed}) or one line per failed file; exit 1 if any failed."""
    if args.print_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    for failure in result["failed"]:
        console.print(f"[red]failed:[/red] {failure['audio_file']}: {failure['error']}")
    console.print(f"[green]done[/green] in {time.perf_counter() - started:.1f} s: {len(result['succeeded'])} of "
                  f"{len(result['succeeded']) + len(result['failed'])} files")
    for line in describe_outputs(outputs) or ["(not reported)"]:
        console.print(f"outputs: {line}")
    return 1 if result["failed"] else 0


def describe_outputs(refs: list[Any]) -> list[str]:
    """One line per place and output stem: ``/out/talk.{json,segments.json,srt,vtt}``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for place, name in sorted((r.uri.rpartition("/")[::2] for r in refs), key=lambda pn: len(pn[1])):
        # shortest names first: <stem>.srt fixes the stem before <stem>.segments.json comes
        stem = next((st for pl, st in groups if pl == place and name.startswith(st + ".")), name.rsplit(".", 1)[0])
        groups.setdefault((place, stem), []).append(name)
    order = {r.uri.rpartition("/")[2]: i for i, r in enumerate(refs)}
    lines = []
    for (place, stem), names in groups.items():
        names.sort(key=order.get)
        rest = [n[len(stem) + 1:] for n in names]
        lines.append(f"{place}/{stem}.{{{','.join(rest)}}}" if len(names) > 1 else f"{place}/{names[0]}")
    return lines


def print_transcript(result: dict[str, Any]) -> None:
    from whisperx.utils import format_timestamp

    for seg in result["segments"]:
        who = f"[{seg['speaker']}] " if seg.get("speaker") else ""
        print(f"[{format_timestamp(seg['start'])} --> {format_timestamp(seg['end'])}] {who}{seg['text']}")
