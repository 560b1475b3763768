#!/usr/bin/env python
"""Benchmark: the pipeline's transcribe stage vs bare WhisperX, and the Prefect cache hit.

    python bench/transcribe_vs_whisperx.py [--batch-size 16] [--json PATH]

Builds a >= 2 minute test audio from the committed fixtures (no TTS, no network), with a
random nonce in its silent first samples so every bench run starts uncached, then measures
in one process, with the same model (the shipped Whisper base), device, compute type,
batch size and CPU threads:

  (a) bare WhisperX: ``whisperx.asr.load_model(...)`` + ``model.transcribe(audio)``
  (b) the pipeline's stage: ``speech.asr.transcribe.transcribe(samples, TranscribeParams(...))``
      -> ratio (b)/(a), goal <= 1.0 (each side warmed up, 2 alternating runs, min taken)

and, as subprocesses (``python -m flows.transcribe``) with a fresh PREFECT_HOME:

  (c) cold CLI wall (new audio bytes: nothing cached), (d) the same command again (cache hit)
      -> ratio (c)/(d), goal >= 20x; the ephemeral Prefect server's start-up dominates (d), so
  (c') / (d') repeat this against an already running ``prefect server start``.

Everything heavy is imported lazily, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import apply_smoke, smoke_option  # noqa: E402

from bench.metrics import normalize_text, wer  # noqa: E402
from deployments.local_server import local_prefect_server, server_env  # noqa: E402
from speech.schema import SAMPLE_RATE  # noqa: E402

FIXTURES = [REPO / "tests/data/sample_2spk.wav", REPO / "tests/data/heldout_3spk.wav"]
NONCE_SAMPLES = 16  # 4 random bits each, |x| <= 8 of 32768 (-72 dBFS) in the leading silence

GOAL_STAGE_RATIO = 1.0
GOAL_CACHE_RATIO = 20.0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/transcribe_vs_whisperx.py",
        description="Pipeline transcribe stage vs bare WhisperX (same model/device/threads), "
        "and cold vs cached CLI wall time (ephemeral and running Prefect server).",
    )
    p.add_argument("--batch-size", type=int, default=16, help="decoding batch size for both sides (default 16)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for CTranslate2 on both sides (default: WHISPERX_CPU_THREADS or all cores)")
    p.add_argument("--seconds", type=float, default=120.0, help="minimum test audio length (default 120)")
    p.add_argument("--repeats", type=int, default=2,
                   help="alternating timed runs per side; the min is kept (default 2)")
    p.add_argument("--skip-cli", action="store_true", help="skip the CLI cold/cached runs (c, d, c', d')")
    p.add_argument("--skip-server", action="store_true",
                   help="skip the runs against a running Prefect server (c', d')")
    p.add_argument("--cli-timeout", type=float, default=300.0, help="seconds allowed per CLI run (default 300)")
    p.add_argument("--passive-omp", action="store_true",
                   help="set OMP_WAIT_POLICY=PASSIVE (both sides and the CLI runs): on a busy machine, OpenMP "
                   "threads spinning at barriers can slow torch's VAD many-fold; this takes that noise out")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (audio, outputs, PREFECT_HOMEs)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every number to this JSON file")
    smoke_option(p, seconds=20.0, repeats=1, skip_cli=True)
    return apply_smoke(p.parse_args(argv))


# ----------------------------------------------------------------------------------
# test audio


def build_audio(path: Path, min_seconds: float) -> float:
    """Concatenate the fixtures (alternating) to >= min_seconds; nonce in the leading silence."""
    clips = []
    for f in FIXTURES:
        with wave.open(str(f), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
                raise SystemExit(f"{f}: expected 16 kHz mono int16")
            clips.append(w.readframes(w.getnframes()))
    parts: list[bytes] = []
    total = 0
    i = 0
    while total < min_seconds * SAMPLE_RATE:
        clip = clips[i % len(clips)]
        parts.append(clip)
        total += len(clip) // 2
        i += 1
    data = bytearray(b"".join(parts))
    # run-specific nonce: new bytes -> new sha256 -> nothing cached from tests or earlier runs
    for k, byte in enumerate(secrets.token_bytes(NONCE_SAMPLES // 2)):
        for j, nib in enumerate((byte & 0x0F, byte >> 4)):
            data[2 * (2 * k + j) : 2 * (2 * k + j) + 2] = (nib - 8).to_bytes(2, "little", signed=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(bytes(data))
    return total / SAMPLE_RATE


# ----------------------------------------------------------------------------------
# in-process: bare WhisperX vs the pipeline's stage


def transcript_text(segments: list[dict]) -> str:
    return " ".join(s["text"] for s in segments)


def in_process(args: argparse.Namespace, audio_path: Path, res: dict[str, Any]) -> None:
    import contextlib
    import io
    import logging

    import numpy as np

    import warnings

    warnings.filterwarnings("ignore")
    import whisperx.asr  # noqa: F401 - its first logger call resets the "whisperx" level to INFO

    for name in ("whisperx", "faster_whisper", "pyannote", "lightning", "lightning.pytorch", "lightning_fabric",
                 "pytorch_lightning", "speechbrain"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from speech import models
    from speech.asr import transcribe as stage
    from speech.asr.whisper import resolve_model
    from speech.io.decode import decode
    from speech.contracts import TranscribeParams
    from speech.settings import get_settings

    settings = get_settings()
    spec = resolve_model(None, settings)
    device, compute_type = models.resolve_device(settings)
    if device != "cpu":
        print(f"note: WHISPERX_DEVICE resolves to {device}; the bench compares like with like on it")
    threads = settings.cpu_threads or os.cpu_count() or 4
    B = args.batch_size
    res["config"].update(model=spec.label, model_dir=spec.source, device=device, compute_type=compute_type,
                         cpu_threads=threads, batch_size=B)

    import torch

    res["config"]["torch_threads"] = torch.get_num_threads()

    audio, _fmt = decode(audio_path, str(audio_path), settings.max_audio_seconds)
    warm = np.ascontiguousarray(audio[: 10 * SAMPLE_RATE])
    print(f"[in-process] model {spec.label} ({spec.source}) on {device}/{compute_type}, "
          f"{threads} CTranslate2 threads, torch {torch.get_num_threads()} threads, batch {B}")

    # (a) bare WhisperX: load (timed apart), warm up on a short clip
    from whisperx.asr import load_model

    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        bare = load_model(spec.source, device, compute_type=compute_type, vad_method="pyannote", language=None,
                          asr_options={"temperatures": [0.0]}, threads=threads)
    res["seconds"]["a_bare_model_load"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    bare.transcribe(warm, batch_size=B)
    res["seconds"]["a_bare_warmup_10s"] = round(time.perf_counter() - t, 3)

    # (b) the pipeline's stage: its first call loads Whisper + VAD into models.CACHE
    params = TranscribeParams(batch_size=B)
    t = time.perf_counter()
    first = stage.transcribe(warm, params)
    res["seconds"]["b_pipeline_model_load"] = first.timings.get("model_load", 0.0)
    res["seconds"]["b_pipeline_warmup_10s"] = round(time.perf_counter() - t, 3)

    cpu_times: dict[str, list[float]] = {"a": [], "b": []}
    loads: list[float] = []

    def run_bare() -> tuple[float, list[dict], str]:
        loads.append(os.getloadavg()[0])
        c0, t0 = time.process_time(), time.perf_counter()
        out = bare.transcribe(audio, batch_size=B)
        dt = time.perf_counter() - t0
        cpu_times["a"].append(round(time.process_time() - c0, 3))
        return dt, out["segments"], out["language"]

    def run_pipeline() -> tuple[float, list[dict], str, dict]:
        loads.append(os.getloadavg()[0])
        c0, t0 = time.process_time(), time.perf_counter()
        tr = stage.transcribe(audio, params)
        dt = time.perf_counter() - t0
        cpu_times["b"].append(round(time.process_time() - c0, 3))
        return dt, [s.model_dump() for s in tr.segments], tr.language, tr.timings

    a_times, b_times, b_timings = [], [], []
    a_segs = b_segs = []
    a_lang = b_lang = ""
    for r in range(args.repeats):
        order: list[Callable[[], None]] = []

        def do_a() -> None:
            nonlocal a_segs, a_lang
            dt, a_segs, a_lang = run_bare()
            a_times.append(dt)
            print(f"  run {r + 1}: (a) bare WhisperX   {dt:7.2f} s wall, {cpu_times['a'][-1]:7.2f} s CPU")

        def do_b() -> None:
            nonlocal b_segs, b_lang
            dt, b_segs, b_lang, tm = run_pipeline()
            b_times.append(dt)
            b_timings.append(tm)
            print(f"  run {r + 1}: (b) pipeline stage  {dt:7.2f} s wall, {cpu_times['b'][-1]:7.2f} s CPU  {tm}")

        order = [do_a, do_b] if r % 2 == 0 else [do_b, do_a]  # alternate who goes first
        for fn in order:
            fn()

    a, b = min(a_times), min(b_times)
    res["seconds"]["a_bare_transcribe"] = round(a, 3)
    res["seconds"]["b_pipeline_transcribe"] = round(b, 3)
    res["runs"]["a_bare_transcribe"] = [round(x, 3) for x in a_times]
    res["runs"]["b_pipeline_transcribe"] = [round(x, 3) for x in b_times]
    res["runs"]["b_pipeline_stage_timings"] = b_timings
    res["ratios"]["b_over_a"] = round(b / a, 3)
    res["runs"]["a_bare_cpu"], res["runs"]["b_pipeline_cpu"] = cpu_times["a"], cpu_times["b"]
    res["seconds"]["a_bare_transcribe_cpu"] = min(cpu_times["a"])
    res["seconds"]["b_pipeline_transcribe_cpu"] = min(cpu_times["b"])
    res["ratios"]["b_over_a_cpu"] = round(min(cpu_times["b"]) / min(cpu_times["a"]), 3)
    res["config"]["max_load_avg_during_runs"] = round(max(loads), 2)
    if max(loads) > (os.cpu_count() or 1) + 0.5:
        print(f"  warning: 1-min load average reached {max(loads):.1f} on {os.cpu_count()} cores: other "
              "processes compete for the CPU, wall times are noisy (see --passive-omp)")

    # diagnostics: where bare WhisperX spends its time (VAD alone, first-30 s language id alone)
    t = time.perf_counter()
    from whisperx.vads import Pyannote

    bare.vad_model({"waveform": Pyannote.preprocess_audio(audio), "sample_rate": SAMPLE_RATE})
    res["seconds"]["diag_bare_vad_only"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    bare.detect_language(audio)
    res["seconds"]["diag_bare_language_id_only"] = round(time.perf_counter() - t, 3)

    a_text, b_text = transcript_text(a_segs), transcript_text(b_segs)
    res["check"].update(
        bare_segments=len(a_segs), pipeline_segments=len(b_segs), bare_words=len(normalize_text(a_text).split()),
        pipeline_words=len(normalize_text(b_text).split()), bare_language=a_lang, pipeline_language=b_lang,
        word_diff_rate=round(wer(a_text, b_text), 4),
    )

    bare = None  # drop the bare model (run_bare is done) before measuring the cache hit
    models.CACHE.clear()
    import gc

    gc.collect()


# ----------------------------------------------------------------------------------
# CLI: cold vs cached, ephemeral server and running server


def base_env(prefect_home: Path) -> dict[str, str]:
    env = server_env(prefect_home)
    # a 2-core machine can take longer than Prefect's 20 s default to boot the ephemeral server
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return env


def run_cli(audio: Path, out_dir: Path, env: dict[str, str], args: argparse.Namespace, label: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "flows.transcribe", str(audio), "--download-dir", str(out_dir),
           "--batch-size", str(args.batch_size), "--debug", "--json"]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.cli_timeout)
    except subprocess.TimeoutExpired:
        wall = time.perf_counter() - t
        print(f"  {label}: TIMED OUT after {wall:.1f} s")
        return {"wall": round(wall, 3), "ok": False, "error": "timeout"}
    wall = time.perf_counter() - t
    info: dict[str, Any] = {"wall": round(wall, 3), "ok": proc.returncode == 0, "rc": proc.returncode}
    if proc.returncode != 0:
        info["error"] = (proc.stderr or proc.stdout)[-2000:]
        print(f"  {label}: FAILED rc={proc.returncode} after {wall:.1f} s\n{info['error']}")
        return info
    try:
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        result = json.loads((out_dir / f"{audio.stem}.json").read_text())
    dbg = result.get("debug") or {}
    info["stage_seconds"] = dbg.get("stage_seconds", {})
    info["transcribe_timings"] = dbg.get("transcribe_timings", {})  # the cached Transcript's, on a hit
    info["segments"] = len(result.get("segments", []))
    info["outputs"] = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    info["text"] = " ".join(s["text"] for s in result.get("segments", []))
    print(f"  {label}: {wall:7.2f} s wall, stages {info['stage_seconds']}, {info['segments']} segments, "
          f"inside transcribe {info['transcribe_timings']}")
    return info


def cli_runs(args: argparse.Namespace, tmp: Path, min_seconds: float, res: dict[str, Any]) -> None:
    secs, ratios = res["seconds"], res["ratios"]

    print("[cli] ephemeral Prefect server (no PREFECT_API_URL), fresh PREFECT_HOME")
    env = base_env(tmp / "prefect_home_ephemeral")
    audio = tmp / "bench_audio.wav"
    c = run_cli(audio, tmp / "out1", env, args, "(c)  cold  ")
    d = run_cli(audio, tmp / "out2", env, args, "(d)  cached") if c["ok"] else {"ok": False}
    res["cli"]["c_cold"], res["cli"]["d_cached"] = c, d
    if record_cold_cached(res, c, d, "c", "d", ""):
        cold_stage, hit_stage = c["stage_seconds"].get("transcribe"), d["stage_seconds"].get("transcribe")
        if cold_stage and hit_stage:
            ratios["task_cold_over_cached"] = round(cold_stage / hit_stage, 1)

    if args.skip_server:
        return
    print("[cli] running Prefect server (prefect server start), fresh PREFECT_HOME, fresh audio bytes")
    try:
        with local_prefect_server(tmp / "prefect_home_server") as server:
            secs["server_start"] = server.startup_seconds
            print(f"  server healthy at {server.url} after {secs['server_start']:.1f} s")
            env = {**server.env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
            audio2 = tmp / "bench_audio_server.wav"
            build_audio(audio2, min_seconds)  # new nonce: (c') must not hit (c)'s decode cache either
            c2 = run_cli(audio2, tmp / "out3", env, args, "(c') cold  ")
            d2 = run_cli(audio2, tmp / "out4", env, args, "(d') cached") if c2["ok"] else {"ok": False}
    except RuntimeError as exc:
        print(f"  {exc}")
        res["cli"]["server_error"] = str(exc)[-2000:]
        return
    res["cli"]["c_cold_server"], res["cli"]["d_cached_server"] = c2, d2
    record_cold_cached(res, c2, d2, "c2", "d2", "_server")


def record_cold_cached(res: dict[str, Any], cold: dict, cached: dict, c: str, d: str, suffix: str) -> bool:
    """Wall times, their ratio and the same-transcript check of one cold/cached CLI pair."""
    if not (cold["ok"] and cached["ok"]):
        return False
    res["seconds"][f"{c}_cli_cold_wall{suffix}"] = cold["wall"]
    res["seconds"][f"{d}_cli_cached_wall{suffix}"] = cached["wall"]
    res["ratios"][f"{c}_over_{d}"] = round(cold["wall"] / cached["wall"], 2)
    res["check"][f"cli_cached_same_text{suffix}"] = cold["text"] == cached["text"]
    res["check"][f"cli_cached_transcribe_stage_s{suffix}"] = cached["stage_seconds"].get("transcribe")
    return True


def drop_decode_cache(tmp: Path) -> None:
    """The CLI runs decoded our one-off audio into <SPEECH_CACHE_DIR>/audio: remove those entries."""
    import hashlib

    from speech.settings import get_settings

    cache = get_settings().cache_dir / "audio"
    for wav in tmp.glob("bench_audio*.wav"):
        digest = hashlib.sha256(wav.read_bytes()).hexdigest()
        for suffix in (".npy", ".fmt"):
            (cache / f"{digest}{suffix}").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------
# report


def table(res: dict[str, Any]) -> str:
    s, r, c, cfg = res["seconds"], res["ratios"], res["check"], res["config"]
    rows: list[tuple[str, str]] = []

    def sec(label: str, key: str) -> None:
        if key in s:
            rows.append((label, f"{s[key]:.2f} s"))

    def rat(label: str, key: str, goal: str, ok: Callable[[float], bool]) -> None:
        if key in r:
            rows.append((label, f"{r[key]:.2f}x  (goal {goal}: {'PASS' if ok(r[key]) else 'MISS'})"))

    rows.append(("audio", f"{cfg['audio_seconds']:.1f} s, {cfg.get('model')} {cfg.get('device')}/"
                 f"{cfg.get('compute_type')}, batch {cfg.get('batch_size')}, {cfg.get('cpu_threads')} threads"))
    if "max_load_avg_during_runs" in cfg:
        rows.append(("machine", f"{cfg['cpu_count']} cores, max 1-min load avg during (a)/(b) "
                     f"{cfg['max_load_avg_during_runs']:.1f}, OMP_WAIT_POLICY={cfg.get('omp_wait_policy')}"))
    sec("(a) bare WhisperX model load", "a_bare_model_load")
    sec("(b) pipeline model load (Whisper+VAD)", "b_pipeline_model_load")
    sec("(a) bare WhisperX transcribe (min)", "a_bare_transcribe")
    sec("(b) pipeline transcribe stage (min)", "b_pipeline_transcribe")
    rat("(b)/(a)", "b_over_a", f"<= {GOAL_STAGE_RATIO:g}", lambda x: x <= GOAL_STAGE_RATIO)
    if "b_over_a_cpu" in r:
        rows.append(("    same on process CPU time (min)", f"{s['b_pipeline_transcribe_cpu']:.2f} / "
                     f"{s['a_bare_transcribe_cpu']:.2f} s = {r['b_over_a_cpu']:.2f}x"))
    if "b_pipeline_stage_timings" in res["runs"]:
        best = min(res["runs"]["b_pipeline_stage_timings"], key=lambda t: sum(t.values()))
        rows.append(("    pipeline breakdown (best run)", ", ".join(f"{k} {v:.2f}" for k, v in best.items())))
    sec("    bare: VAD alone", "diag_bare_vad_only")
    sec("    bare: language id alone", "diag_bare_language_id_only")
    if "word_diff_rate" in c:
        rows.append(("    transcripts (bare vs pipeline)", f"{c['bare_words']} vs {c['pipeline_words']} words, "
                     f"word diff rate {c['word_diff_rate']:.3f}, lang {c['bare_language']}/{c['pipeline_language']}"))
    sec("(c) CLI cold, ephemeral server", "c_cli_cold_wall")
    sec("(d) CLI cached, ephemeral server", "d_cli_cached_wall")
    rat("(c)/(d)", "c_over_d", f">= {GOAL_CACHE_RATIO:g}", lambda x: x >= GOAL_CACHE_RATIO)
    sec("prefect server start -> healthy", "server_start")
    sec("(c') CLI cold, running server", "c2_cli_cold_wall_server")
    sec("(d') CLI cached, running server", "d2_cli_cached_wall_server")
    rat("(c')/(d')", "c2_over_d2", f">= {GOAL_CACHE_RATIO:g}", lambda x: x >= GOAL_CACHE_RATIO)
    for key, label in (("cli_cached_transcribe_stage_s", "(d)"), ("cli_cached_transcribe_stage_s_server", "(d')")):
        if key in c:
            same = c.get("cli_cached_same_text" + ("_server" if "server" in key else ""))
            rows.append((f"    {label} transcribe stage (cache hit)", f"{c[key]} s, same transcript: {same}"))
    rat("transcribe task cold/cached (c)/(d)", "task_cold_over_cached", f">= {GOAL_CACHE_RATIO:g}",
        lambda x: x >= GOAL_CACHE_RATIO)
    sec("bench total", "bench_total")
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        os.environ["WHISPERX_CPU_THREADS"] = str(args.threads)  # before speech.settings reads it
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.passive_omp:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch/CTranslate2 load OpenMP; inherited by the CLI
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    tmp = Path(tempfile.mkdtemp(prefix="bench-transcribe-"))
    res: dict[str, Any] = {"config": {}, "seconds": {}, "ratios": {}, "runs": {}, "check": {}, "cli": {}}
    try:
        audio = tmp / "bench_audio.wav"
        res["config"]["audio_seconds"] = build_audio(audio, args.seconds)
        res["config"]["audio_path"] = str(audio)
        res["config"]["cpu_count"] = os.cpu_count()
        res["config"]["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
        print(f"[audio] {audio}: {res['config']['audio_seconds']:.1f} s (fixtures concatenated, random nonce)")
        in_process(args, audio, res)
        if not args.skip_cli:
            cli_runs(args, tmp, args.seconds, res)
        res["seconds"]["bench_total"] = round(time.perf_counter() - started, 1)
        print(table(res))
        if args.json_path:
            for info in res["cli"].values():
                if isinstance(info, dict):
                    info.pop("text", None)
            Path(args.json_path).write_text(json.dumps(res, indent=2, default=str))
            print(f"wrote {args.json_path}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            drop_decode_cache(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
