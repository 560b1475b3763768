"""Human-readable summaries of a run (rendered by the orchestration layer as artifacts)."""
from __future__ import annotations

from speech.output.result import PipelineResults
from speech.contracts import OutputRef, TranscriptionResult


def summary_markdown(run: PipelineResults, result: TranscriptionResult, outputs: list[OutputRef], store: str) -> str:
    """The run's markdown artifact: what was transcribed, how long each stage took, where it went."""
    audio, transcript, cached_stages = run.audio, run.transcript, run.cached_stages
    asr = transcript.processing_seconds()
    rtf = asr / audio.duration if audio.duration else 0.0
    prob = "" if result.language_probability is None else f" (p={result.language_probability:.2f})"
    lines = [
        f"# Transcript: `{audio.stem}`",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{audio.source}` |",
        f"| duration | {audio.duration:.1f} s ({audio.format}) |",
        f"| sha256 | `{audio.sha256[:16]}…` |",
        f"| language | {result.detected_language or '—'}{prob} |",
        f"| segments | {len(result.segments)} |",
        f"| model | {transcript.model} on {transcript.device}/{transcript.compute_type} |",
        f"| real-time factor | {rtf:.3f} (transcribe stage) |",
        f"| results | `{store}` |",
    ]
    if cached_stages:
        lines.append(f"| cache hits | {', '.join(cached_stages)} |")
    lines += ["", "## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in run.stage_seconds.items()]
    lines += [f"| transcribe: {k} | {v:.2f} |" for k, v in transcript.timings.items()]
    lines += ["", "## Outputs", ""] + [f"- [`{o.uri}`]({o.url}) ({o.size_bytes} bytes)" if o.url
                                       else f"- `{o.uri}` ({o.size_bytes} bytes)" for o in outputs]
    if result.segments:
        preview = " ".join(s.text for s in result.segments)
        lines += ["", "## Preview", "", "> " + (preview[:600] + ("…" if len(preview) > 600 else ""))]
    return "\n".join(lines) + "\n"


# pseudo file systems: not volumes anyone mounted for the pipeline
_PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "devtmpfs", "securityfs", "debugfs",
              "tracefs", "pstore", "bpf", "hugetlbfs", "configfs", "fusectl", "binfmt_misc", "autofs", "nsfs",
              "rpc_pipefs", "efivarfs", "ramfs"}


def mounted_volumes(mounts_file: str = "/proc/self/mounts") -> list[str]:
    """One line per real mount (``PRINT_MOUNTS``): mount point, file system, ro/rw, free space."""
    import shutil

    try:
        with open(mounts_file) as f:
            entries = [line.split() for line in f if line.strip()]
    except OSError as exc:
        return [f"cannot read {mounts_file}: {exc}"]
    lines = []
    for device, point, fstype, options, *_ in entries:
        if fstype in _PSEUDO_FS or point.startswith(("/proc", "/sys")):
            continue
        point = point.replace("\\040", " ")
        mode = "ro" if "ro" in options.split(",") else "rw"
        try:
            usage = shutil.disk_usage(point)
            space = f"{usage.free / 1e9:.1f} of {usage.total / 1e9:.1f} GB free"
        except OSError:
            space = "size unknown"
        lines.append(f"{point} ({fstype}, {mode}, {space}) <- {device}")
    return lines
