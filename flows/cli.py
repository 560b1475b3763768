"""``whisperx-prefect AUDIO [flags]`` (``python -m flows``): the pipeline script's command line.

Validates everything before Prefect starts (a bad flag fails in well under a second),
shows a progress bar, prints the transcript and where the outputs went. Exit status:
0 ok, 2 bad input (parameters, audio, URL), 1 anything else. Heavy modules load lazily,
so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from flows.report import report, report_batch


# the CLI's own spellings kept beside the generated ones (field -> extra option strings; the
# "--no-" ones turn the field off); whisperx's spellings come from flows/whisperx_cli.py
ALIASES = {"align_output": ["--no-align", "--no_align"], "diarization": ["--no-diarization"]}
NOT_FLAGS = {"audio_file", "speaker_samples"}  # the positional AUDIO and --speaker-sample
REMOTE_FLAGS = ("endpoint", "api_key", "sync", "deployment", "remote_timeout", "remote_jobs")


def _request_flags(p: argparse.ArgumentParser) -> None:
    """One option per request field, generated from :class:`speech.schema.TranscriptionRequest`:
    its name (``--beam-size``), type, choices and description. Defaults are not set here (None
    means "not given"): the schema applies its own, and the help shows them."""
    import typing

    from pydantic import SecretStr

    from flows.whisperx_cli import WHISPERX_NAMES
    from speech.schema import TranscriptionRequest

    g = p.add_argument_group("request fields (defaults from the schema; whisperx's underscore spellings work too)")
    for name, field in TranscriptionRequest.model_fields.items():
        if name in NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        others = [f"--{name}"] * ("_" in name) + [a for a in ALIASES.get(name, []) if not a.startswith("--no")]
        others += WHISPERX_NAMES.get(name, [])
        kind = field.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(args) == 1:
            kind = args[0]
        default = field.default
        shown = "" if default in (None, False, "") or isinstance(default, SecretStr) else f" (default: {default})"
        text = (field.description or name).replace("%", "%%") + shown
        if kind is bool:
            g.add_argument(flag, *others, dest=name, action="store_true", default=None, help=text)
            negative = ["--no-" + name.replace("_", "-")] + [a for a in ALIASES.get(name, []) if a.startswith("--no")]
            g.add_argument(*negative, dest=name, action="store_false", default=None, help=argparse.SUPPRESS)
        elif typing.get_origin(kind) is typing.Literal:
            g.add_argument(flag, *others, dest=name, choices=list(typing.get_args(kind)), help=text)
        elif kind in (int, float):
            g.add_argument(flag, *others, dest=name, type=kind, metavar="N" if kind is int else "X", help=text)
        else:  # str, SecretStr (prefer the env var; see the description)
            g.add_argument(flag, *others, dest=name, metavar="TEXT", help=text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="whisperx-prefect",
        description="Transcribe audio with WhisperX as a Prefect flow; writes <stem>.json/.segments.json/.srt/.vtt.",
    )
    p.add_argument("audio_file", nargs="*", metavar="AUDIO",
                   help="local path, http(s) URL or s3://bucket/key; several files run as one batch flow run "
                   "(models loaded once), each named after its file")
    p.add_argument("--params-json", help="JSON object (or @file / path to a .json file) of request fields; "
                   "the worker's {\"input\": {...}} envelope is accepted; flags override it")
    p.add_argument("--speaker-sample", action="append", metavar="NAME=URL_OR_PATH",
                   help="enrolment clip (repeatable); a bare URL/path derives the name")
    p.add_argument("--json", dest="print_json", action="store_true", help="print the result JSON to stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect and library logs")
    p.add_argument("--print-progress", "--print_progress", action="store_true",
                   help="print whisperx's 'Progress: NN.NN%%...' lines while transcribing and aligning, on stdout as "
                   "whisperx does (on stderr with --json)")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {_version()} (whisperx {_version('whisperx')})")
    remote = p.add_argument_group("remote mode (the pipeline script's): run elsewhere, write the outputs here")
    remote.add_argument("--endpoint", metavar="URL_OR_ID",
                        help="a RunPod-compatible endpoint: a RunPod endpoint id, or its URL (e.g. "
                        "http://127.0.0.1:8000/v2/whisperx for whisperx-prefect-endpoint); local files go up to --bucket")
    remote.add_argument("--api-key", metavar="KEY", help="the endpoint's key (default RUNPOD_API_KEY / SWAMI_RUNPOD_API_KEY)")
    remote.add_argument("--sync", action="store_true", help="use the endpoint's /runsync (default: /run, then /status)")
    remote.add_argument("--deployment", metavar="FLOW/DEPLOYMENT",
                        help="run a Prefect deployment (e.g. transcribe-audio/transcribe-local) on PREFECT_API_URL "
                        "and wait for its result")
    remote.add_argument("--remote-timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="give up on a remote job (and cancel it) this long after sending it, its time in the "
                        "remote queue included (default: 3600)")
    remote.add_argument("--remote-jobs", type=int, default=4, metavar="N",
                        help="with several files, how many remote jobs run at once (default: 4; 1 = one after another)")
    _request_flags(p)
    from flows.whisperx_cli import add_refusals

    add_refusals(p)
    return p


def _version(package: str = "whisperx-prefect-pipeline") -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _load_params_json(value: str) -> dict[str, Any]:
    text = value
    if value.startswith("@"):
        text = Path(value[1:]).read_text()
    elif not value.lstrip().startswith("{") and Path(value).is_file():
        text = Path(value).read_text()
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("--params-json must hold a JSON object")
    from speech.schema import unwrap_envelope

    return unwrap_envelope(data)  # the worker's {"input": ...} or a whole RunPod job {"id", "input"}


def _speaker_sample(value: str) -> dict[str, str]:
    if "=" in value and "://" not in value.split("=", 1)[0]:
        name, url = value.split("=", 1)
        return {"name": name, "url": url}
    return {"url": value}


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = _load_params_json(args.params_json) if args.params_json else {}
    skip = {"params_json", "print_json", "verbose", "speaker_sample", "print_progress", "audio_file", *REMOTE_FLAGS}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            data[key] = value
    if args.audio_file:
        data["audio_file"] = args.audio_file[0]
    if args.speaker_sample:
        data["speaker_samples"] = [_speaker_sample(v) for v in args.speaker_sample]
    return data


def _run(args: argparse.Namespace, req: Any, files: list[str]) -> Any:
    """The flow run with a progress bar: (result, output refs, start time, console), or an exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from speech.errors import SpeechError

    from flows.local_api import mark_abandoned_runs_quietly, start_throwaway_api

    started = time.perf_counter()
    server = _prefect_api()
    throwaway = None
    if server is None:  # a throw-away server (seconds to start) that dies with this process
        throwaway = start_throwaway_api()
        if not _transcript_cached(req):  # import WhisperX meanwhile
            threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()

    from tasks.progress import RunListener, listening

    console = Console(stderr=True, soft_wrap=True)  # an error stays one line in logs and pipes
    outputs: list[Any] = []
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        task_id = bar.add_task("starting Prefect", total=1.0)

        printed: dict[str, str] = {}

        def on_progress(stage: str, fraction: float, message: str) -> None:
            bar.update(task_id, description=f"{stage}: {message}" if message else stage, completed=fraction)
            line = f"Progress: {100 * fraction:.2f}%..."  # whisperx's own line, where whisperx prints it
            if args.print_progress and stage in ("transcribe", "align") and fraction > 0 and printed.get(stage) != line:
                printed[stage] = line
                print(line, file=sys.__stderr__ if args.print_json else sys.__stdout__, flush=True)

        listener = RunListener(on_progress=on_progress, on_outputs=lambda refs, _where: outputs.extend(refs))
        try:
            with listening(listener), _api_settings(server or throwaway.url):
                if throwaway is not None:
                    throwaway.wait_ready(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120)))
                mark_abandoned_runs_quietly()  # runs of killed CLI processes: Crashed, not Running for ever
                from flows.transcribe import transcribe_audio

                if not args.verbose:
                    _quiet_prefect_console()
                bar.update(task_id, description="running flow")
                if len(files) > 1:  # one batch flow run: models load once
                    from flows.batch import transcribe_batch

                    from flows.runtime import hand_over

                    shared = {k: v for k, v in flow_kwargs(req).items() if k != "audio_file" and v is not None}
                    result = transcribe_batch([hand_over(f) for f in files], request=shared)
                else:
                    result = transcribe_audio(**flow_kwargs(req))
        except SpeechError as exc:
            from speech.errors import Stopped, WorkerUnavailable

            console.print(f"[red]error:[/red] {exc}")
            return 1 if isinstance(exc, (Stopped, WorkerUnavailable)) else 2  # not the input's fault
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            return 130
        except Exception as exc:  # noqa: BLE001 - one line for the user, details with -v
            from speech.redact import scrub_configured

            console.print(f"[red]error:[/red] {type(exc).__name__}: {scrub_configured(str(exc))}")
            if args.verbose:
                console.print_exception()
            return 1
        finally:
            if throwaway is not None:
                throwaway.stop()

    return result, outputs, started, console


def _quiet_libraries(verbose: bool) -> None:
    # the CLI's private ephemeral API: no telemetry, and patience on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if verbose:
        return
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore")
    for name in ("whisperx", "lightning", "lightning.pytorch", "lightning.pytorch.utilities.migration.utils",
                 "pytorch_lightning", "speechbrain", "pyannote",
                 "urllib3.connectionpool"):  # the runpod SDK's retry lines (runpod sets "urllib3" itself)
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Optional[list[str]] = None) -> int:
    from flows.whisperx_cli import normalize_argv

    parser = build_parser()
    args = parser.parse_args(normalize_argv(list(sys.argv[1:] if argv is None else argv), parser))
    data = request_from_args(args) if args.audio_file or args.params_json else None
    if not data or not data.get("audio_file"):
        build_parser().print_usage(sys.stderr)
        print("error: an AUDIO file, URL or S3 URI is required", file=sys.stderr)
        return 2
    _quiet_libraries(args.verbose)

    from speech.errors import SpeechError
    from speech.schema import TranscriptionRequest, check_one_file_fields

    files = list(args.audio_file) or [data["audio_file"]]
    try:
        req = TranscriptionRequest.parse(data)
        for audio_file in files:
            _precheck_local(audio_file)
        check_one_file_fields(data, len(files))
    except SpeechError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.endpoint or args.deployment:
        return _run_remote(args, data, req, files)
    # stdout carries only the result: whatever libraries print or log to "stdout" while the run
    # goes (whisperx binds its console log handler to sys.stdout when imported) lands on stderr
    with contextlib.redirect_stdout(sys.stderr):
        outcome = _run(args, req, files)
    if isinstance(outcome, int):
        return outcome
    result, outputs, started, console = outcome
    if len(files) > 1:
        return report_batch(args, result, outputs, started, console)
    return report(args, result, outputs, started, console)


def _run_remote(args: argparse.Namespace, data: dict[str, Any], req: Any, files: list[str]) -> int:
    """``--endpoint`` / ``--deployment``: each file runs remotely (up to --remote-jobs at once), its
    outputs are written here (:func:`flows.remote.run_files`)."""
    from rich.console import Console

    from flows.remote import run_files

    console = Console(stderr=True, soft_wrap=True)
    if args.endpoint and args.deployment:
        console.print("[red]error:[/red] --endpoint and --deployment: choose one")
        return 2
    if not 1 <= args.remote_jobs <= 64:
        console.print(f"[red]error:[/red] --remote-jobs must be from 1 to 64, got {args.remote_jobs}")
        return 2
    server = None
    if args.deployment:
        server = _prefect_api()
        if server is None:
            console.print("[red]error:[/red] --deployment needs the Prefect server that holds it: set PREFECT_API_URL "
                          "(or start `prefect server start` here)")
            return 2
    with _api_settings(server) if server else contextlib.nullcontext():
        return run_files(args, data, req, files, console,
                         lambda result, outputs, started: report(args, result, outputs, started, console))


def _prefect_api() -> Optional[str]:
    """The Prefect API this run uses: PREFECT_API_URL (env or profile), else a local
    ``prefect server start`` answering on its default address (LOCAL_PREFECT_SERVER; no throw-away server to start:
    seconds saved, and the run shows in that server's UI); None: Prefect starts a throw-away one."""
    import urllib.request

    from prefect.settings import get_current_settings

    from speech.settings import get_settings

    configured = get_current_settings().api.url
    if configured:
        return configured
    url = get_settings().local_prefect_server.strip().rstrip("/")
    if url.lower() in ("off", "0", "false", "no", "none", ""):
        return None
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=0.3) as reply:
            return url if reply.status == 200 else None
    except OSError:
        return None


def _api_settings(url: Optional[str]) -> Any:
    """Prefect settings for the CLI's in-process run (Prefect reads its settings once, at import):
    the API at ``url``; no flow-run heartbeats (they detect crashed runs of workers; here the
    run lives and dies with the command, and stopping the heartbeat thread costs ~1 s)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if url is not None:
        updates[PREFECT_API_URL] = url
    return temporary_settings(updates=updates)


def _transcript_cached(req: Any) -> bool:
    """Whether the result storage already holds the transcript of this local file with these
    settings (then no model is needed: no warm-up): this machine's Prefect storage, or
    RESULTS_STORAGE (a folder, or s3://bucket/prefix: one HEAD request). Unknown (a URL, a
    RESULTS_STORAGE_BLOCK, ``force``) counts as not cached."""
    from urllib.parse import urlsplit

    from prefect.settings import get_current_settings

    from speech.settings import get_settings

    settings, prefect_settings = get_settings(), get_current_settings()
    if (req.force or urlsplit(req.audio_file).scheme in ("http", "https", "s3") or settings.results_storage_block
            or (prefect_settings.results.default_storage_block and not settings.results_storage)):
        return False
    try:
        from speech.io.fetch import fetch
        from speech.contracts import TranscribeParams
        from tasks.transcribe import transcribe_key

        key = transcribe_key(fetch(req.audio_file).sha256, TranscribeParams.from_request(req))
        where = (settings.results_storage or "").strip()
        if where.startswith("s3://"):
            from speech.io.s3 import s3_client

            parts = urlsplit(where)
            prefix = parts.path.strip("/")
            s3_client(settings).head_object(Bucket=parts.netloc, Key=f"{prefix}/{key}" if prefix else key)
            return True
        folder = Path(where).expanduser() if where else Path(prefect_settings.results.local_storage_path)
        return (folder / key).is_file()
    except Exception:  # noqa: BLE001 - a bad file is reported by the run itself; a miss is a miss
        return False


def _warm_up() -> None:
    """Import WhisperX, torch and the VAD's pyannote (most of a cold start) while Prefect starts
    its server; loading the model is left to the stage (it counts it in ``debug.model_loads``)."""
    try:
        import whisperx.asr  # noqa: F401
        import whisperx.vads  # noqa: F401
    except Exception:  # noqa: BLE001 - the stage itself says what is wrong
        logging.getLogger(__name__).debug("warm-up failed", exc_info=True)


def _precheck_local(audio_file: str) -> None:
    """Fail a missing local file before paying for Prefect's start-up."""
    from urllib.parse import urlsplit

    from speech.errors import FetchError

    if urlsplit(audio_file).scheme in ("http", "https", "s3"):
        return
    path = Path(audio_file[7:] if audio_file.startswith("file://") else audio_file).expanduser()
    if not path.is_file():
        raise FetchError(f"audio file not found: {path}")


def _quiet_prefect_console() -> None:
    """Our one-line error replaces Prefect's console traceback (the API still gets full logs)."""
    from flows.runtime import set_console_level

    set_console_level(logging.CRITICAL)


def flow_kwargs(req: Any) -> dict[str, Any]:
    """Request -> flow kwargs for a run in this process, stored with no secret from the start:
    tokens stay SecretStr (Prefect stores them masked) and URL credentials are handed over in
    memory (:func:`flows.runtime.hand_over`)."""
    from flows.runtime import handed_over_kwargs
    from speech.schema import SECRET_FIELDS

    kwargs = req.model_dump(exclude=set(SECRET_FIELDS))
    for name in SECRET_FIELDS:
        if getattr(req, name) is not None:
            kwargs[name] = getattr(req, name)
    return handed_over_kwargs(kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
