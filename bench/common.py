"""What the benchmarks share: where the repository and its fixtures are, quiet library logs."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
# the synthesized fixtures, longest conversations first (bench/batch.py, bench/warm.py take the first N)
FIXTURES = ["sample_2spk.wav", "heldout_3spk.wav", "align_3spk.wav", "diar_2spk.wav", "diar_3spk.wav",
            "diar_4spk.wav", "enrol_slt.wav", "enrol_awb.wav", "enrol_rms.wav", "enrol_kal16.wav"]


@contextlib.contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary folder for one benchmark run (audio, PREFECT_HOME, caches, outputs: often
    hundreds of MB), removed when the run ends however it ends; ``keep``: left in place and its
    path printed, to read the logs."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def keep_option(p: Any) -> None:
    """``--keep``: keep the run's temporary folder (logs, outputs) and say where."""
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, outputs) and say where")


def quiet_libraries(verbose: bool) -> None:
    """Library logs and warnings off (``verbose``: everything at INFO instead)."""
    import logging
    import warnings

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    warnings.filterwarnings("ignore")
    import whisperx.asr  # noqa: F401 - its first logger call resets the "whisperx" level to INFO

    for name in ("speech", "whisperx", "faster_whisper", "pyannote", "lightning", "lightning.pytorch",
                 "lightning_fabric", "pytorch_lightning", "speechbrain", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def report(args: Any, run: Callable[[Any], dict], print_table: Callable[[dict], None]) -> dict:
    """Run one benchmark, print its table and write ``--json PATH`` if asked; no __pycache__ left in the repo."""
    sys.dont_write_bytecode = True
    res = run(args)
    print_table(res)
    if getattr(args, "json_path", None):
        Path(args.json_path).write_text(json.dumps(res, indent=2, default=str, ensure_ascii=False) + "\n")
        print(f"wrote {args.json_path}")
    return res


def smoke_option(p: Any, **small: Any) -> None:
    """``--smoke``: the same path with small inputs (``small``: argument -> value), quick enough for CI
    (``make bench-smoke``), so a change that breaks a benchmark fails CI."""
    shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in small.items())
    p.add_argument("--smoke", action="store_true", help=f"a quick run of the same path, for CI ({shown})")
    p.set_defaults(_smoke=small)


def apply_smoke(args: Any) -> Any:
    """``args`` with the ``--smoke`` values put in, when asked for."""
    if getattr(args, "smoke", False):
        for key, value in args._smoke.items():
            setattr(args, key, value)
    return args


def job_output(folder: Path, stem: str) -> Path:
    """``<stem>.json`` of a run from a service entry point (a deployment run, a task job): under
    the job's own key, ``<folder>/<stem>/<job id>/<stem>.json`` (the newest, if there are several);
    a path that does not exist when there is none."""
    found = sorted(Path(folder).glob(f"{stem}/*/{stem}.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else Path(folder) / stem / "none" / f"{stem}.json"


def serve_folder(folder: Path = DATA) -> tuple[str, Any]:
    """``folder`` over HTTP on a free 127.0.0.1 port, in a thread, no request log (a URL may carry
    a canary): (its base URL, the server, for ``.shutdown()``)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
