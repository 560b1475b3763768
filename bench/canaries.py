"""No secret reaches the database, on a production-like server: an audit with canaries.

    python bench/canaries.py                # PostgreSQL (Debian's postgresql, a cluster of its own)
    python bench/canaries.py --smoke        # the same runs on a SQLite server (CI: make bench-smoke)

In one invocation: a Prefect server on PostgreSQL (or SQLite with ``--smoke``), a local HTTP
server with the test audio, and every entry point that runs a request in its own process, each
given unique canaries in the URL's user-info, a signature query parameter, a speaker sample's
token and a token field (and the endpoint's caller key, from ``ENDPOINT_API_KEYS``): the CLI (one file, and two files as one batch run), ``handler(job)``,
the RunPod-compatible endpoint in its in-process mode over HTTP; and the queued modes
(``--deployment``, ``--task-workers``), which must refuse such a request before anything is stored.
Then every byte the server and the runs kept is searched for every canary: a ``pg_dump`` of the
database, every file of the cluster (tables, write-ahead log) and PostgreSQL's log of every
statement with its bound values (what it was sent, even a value overwritten a moment later or
compressed in its files) - or the SQLite database with its ``-wal``/``-shm`` -, the server's PREFECT_HOME (result storage, logs), the decode cache and the
outputs, and what the processes printed.

The last line is one JSON object: ``runs`` (entry points that completed), ``refused`` (queued
modes that refused), ``canaries``, ``found`` (where any canary was found: goal empty), and
``bytes_searched``. Exit code 1 when a canary was found or a run failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DATA, keep_option, scratch, serve_folder  # noqa: E402
from deployments.local_server import local_postgres, local_prefect_server, start_endpoint, stop  # noqa: E402

KEY = f"endpoint-key-canary-{os.getpid()}"  # the auditor's own key (ENDPOINT_API_KEYS): a canary too


class Canaries:
    def __init__(self, base: str, out: Path):
        self.base, self.out, self.all = base, out, {KEY: "the endpoint's caller key"}

    def request(self, via: str, audio: str = "enrol_rms.wav") -> dict[str, Any]:
        names = {k: f"{k}-{via}-canary-{os.getpid()}-{int(time.time() * 1000) % 100000}"
                 for k in ("pw", "sig", "sample", "token")}
        self.all.update({v: via for v in names.values()})
        base = self.base.replace("http://", f"http://alice:{names['pw']}@")
        return {"audio_file": f"{base}/{audio}?X-Amz-Signature={names['sig']}&v=1", "language": "en",
                "download_dir": str(self.out / via), "huggingface_access_token": names["token"],
                "speaker_verification": True,
                "speaker_samples": [{"name": "slt", "url": f"{self.base}/enrol_slt.wav?token={names['sample']}"}]}


def _post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return json.loads(reply.read())


def run_entry_points(env: dict[str, str], canaries: Canaries, tmp: Path, smoke: bool) -> tuple[list, list, str]:
    runs, refused, printed = [], [], ""

    def cli(via: str, *files: str) -> None:
        nonlocal printed
        req = canaries.request(via)
        urls = [req["audio_file"]] + [req["audio_file"].replace("enrol_rms", f) for f in files]
        done = subprocess.run([sys.executable, "-m", "flows.transcribe", *urls, "--language", "en",
                               "--download-dir", req["download_dir"]], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)
        printed += done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"CLI ({via}) failed: {done.stderr[-2000:]}")
        runs.append(via)

    cli("cli")
    if not smoke:
        cli("batch", "enrol_awb")
    job = {"id": "audit-job", "input": canaries.request("handler")}
    done = subprocess.run([sys.executable, "-c", "import json, sys\nfrom deployments.runpod_handler import handler\n"
                           "print(json.dumps(handler(json.loads(sys.stdin.read()))))"],
                          input=json.dumps(job), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    printed += done.stdout + done.stderr
    if done.returncode != 0 or "error" in json.loads(done.stdout.splitlines()[-1]):
        raise RuntimeError(f"handler failed: {(done.stdout + done.stderr)[-2000:]}")
    runs.append("handler")
    with ExitStack() as stack:
        proc, base = start_endpoint(env, tmp / "endpoint.log", {"auditor": KEY}, endpoint_id="audit")
        stack.callback(stop, proc)
        reply = _post(f"{base}/runsync?wait=290000", {"input": canaries.request("endpoint")})
        if reply.get("status") != "COMPLETED":
            raise RuntimeError(f"endpoint job failed: {reply}")
        runs.append("endpoint")
        queued = {"--deployment": ["--deployment", "transcribe-audio/not-deployed"]}
        if not smoke:
            queued["--task-workers"] = ["--task-workers"]
        for mode, args in queued.items():
            proc, base = start_endpoint(env, tmp / f"endpoint{mode}.log", {"auditor": KEY}, *args,
                                        endpoint_id="audit")
            stack.callback(stop, proc)
            request = {k: v for k, v in canaries.request(f"queued{mode}").items() if k != "huggingface_access_token"}
            reply = _post(f"{base}/runsync?wait=30000", {"input": request})
            if reply.get("status") != "FAILED" or "carries credentials" not in reply.get("error", ""):
                raise RuntimeError(f"{mode} did not refuse a URL with credentials: {reply}")
            refused.append(mode)
        printed += "".join((tmp / n).read_text(errors="replace") for n in os.listdir(tmp) if n.endswith(".log"))
    return runs, refused, printed


def database_bytes(database: Optional[Any], home: Path, tmp: Path) -> list[Path]:
    """Files holding what the database keeps: a pg_dump and the cluster's files, or SQLite's."""
    if database is None:
        return sorted(home.glob("prefect.db*"))
    dump = tmp / "pg_dump.sql"
    subprocess.run([str(database.bindir / "pg_dump"), "-h", "127.0.0.1", "-p", str(database.port), "-U", "prefect",
                    "-f", str(dump), "prefect"], check=True, capture_output=True)
    subprocess.run([str(database.bindir / "psql"), "-h", "127.0.0.1", "-p", str(database.port), "-U", "prefect",
                    "-c", "CHECKPOINT", "prefect"], capture_output=True)
    # the cluster's files (tables, WAL; TOAST may compress a value there), and its statement log:
    # every value the database was sent, uncompressed, even one overwritten a moment later
    return [dump, database.data_dir.parent / "server.log", *(p for p in database.data_dir.rglob("*") if p.is_file())]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/canaries.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="SQLite server, fewer entry points (CI)")
    keep_option(p)
    args = p.parse_args(argv)
    base, http_server = serve_folder(DATA)
    with ExitStack() as stack:
        tmp = stack.enter_context(scratch("secrets-audit-", args.keep))
        stack.callback(http_server.shutdown)
        canaries = Canaries(base, tmp / "out")
        database = None if args.smoke else stack.enter_context(local_postgres(log_statements=True))
        server = stack.enter_context(local_prefect_server(tmp / "home", database_url=database))
        print(f"Prefect server on {'SQLite' if database is None else 'PostgreSQL'}: {server.url}", flush=True)
        env = {**server.env, "ALLOW_LOCAL_PATHS": str(tmp), "FETCH_ALLOW_HOSTS": "127.0.0.1",
               "SPEECH_CACHE_DIR": str(tmp / "cache"), "RESULTS_STORAGE": str(tmp / "results"),
               "LOCAL_PREFECT_SERVER": "off", "PYTHONDONTWRITEBYTECODE": "1"}
        runs, refused, printed = run_entry_points(env, canaries, tmp, args.smoke)
        time.sleep(3)  # events and logs the server received are written
        files = database_bytes(database, tmp / "home", tmp)
        files += [q for folder in (tmp / "home", tmp / "cache", tmp / "out", tmp / "results") if folder.exists()
                  for q in folder.rglob("*") if q.is_file() and q.suffix != ".npy"]
        found: dict[str, list[str]] = {}
        searched = 0
        for path in files:
            blob = path.read_bytes()
            searched += len(blob)
            for canary in canaries.all:
                if canary.encode() in blob:
                    found.setdefault(canary, []).append(str(path))
        for canary in canaries.all:
            if canary in printed:
                found.setdefault(canary, []).append("printed")
    print(f"{len(files)} files, {searched / 1e6:.1f} MB searched for {len(canaries.all)} canaries from "
          f"{', '.join(runs)}; refused: {', '.join(refused)}")
    print(json.dumps({"runs": runs, "refused": refused, "canaries": len(canaries.all), "found": found,
                      "bytes_searched": searched, "database": "sqlite" if database is None else "postgresql"}))
    if found and not args.keep:
        print("a canary was found: run again with --keep to read the files that hold it")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
