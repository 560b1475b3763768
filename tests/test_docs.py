"""The docs a newcomer follows (issue 21): the README stays short, every relative link resolves,
docs/parameters.md is what docs/gen_parameters.py generates, and every shell block marked
``<!-- runnable -->`` is either run here (cheap and safe ones) or listed with the reason it cannot
be (docs/README.md describes the convention)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- runnable -->"
README_MAX_LINES = 250
REGENERATE = ".venv/bin/python docs/gen_parameters.py --write"

# Marked blocks run by test_runnable_block, from the repository root: (file, first line) -> timeout (s).
RUN: dict[tuple[str, str], int] = {
    ("README.md", ".venv/bin/whisperx-prefect --version"): 120,
    ("docs/running.md", ".venv/bin/whisperx-prefect --version"): 120,
    ("docs/deploying.md", ".venv/bin/python -m deployments.blocks --dry-run"): 120,
    ("docs/README.md", ".venv/bin/python docs/gen_parameters.py --check"): 120,
}

# Marked blocks a test cannot run, and why (checked: each must still exist in the docs).
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "make demo   # creates .venv, installs the pinned stack (~4 min, ~8 GB), transcribes the bundled "
                  "sample offline"):
        "takes minutes and installs ~8 GB; `make test` is this suite, and CI (.ci/run) runs it on a fresh clone",
    ("README.md", ".venv/bin/prefect server start                                   # 1: UI at http://127.0.0.1:4200"):
        "a long-running server on the default port 4200 (tests use throw-away servers on free ports)",
    ("README.md", "export PREFECT_API_URL=http://127.0.0.1:4200/api                 # 2: the deployments"):
        "a long-running serve process that needs the server of the block before; tests/test_worker.py drives "
        "deployments/serve.py against a real server",
    ("README.md", "export PREFECT_API_URL=http://127.0.0.1:4200/api                 # 3: one run, waited for"):
        "needs the server and the serve process of the two blocks before (a transcription, ~40 s here)",
    ("docs/running.md", "# terminal 1: the Prefect server, UI at http://127.0.0.1:4200"):
        "a long-running server on the default port 4200 (tests use throw-away servers on free ports)",
    ("docs/running.md", "# terminal 2: the deployments; runs may read local files under tests/data and ./inbox only"):
        "a long-running serve process that needs the server of the block before; tests/test_worker.py drives "
        "deployments/serve.py against a real server",
    ("docs/running.md", "# terminal 3: start a run, wait for it (exit 1 unless it completes), list what it wrote"):
        "needs the server and the serve process of the two blocks before (a transcription, ~40 s here)",
    ("docs/deploying.md", "docker build -t whisperx-prefect:latest ."):
        "needs a Docker engine and builds a multi-GB CUDA image; tests/test_package.py checks the image's "
        "Python environment instead",
    ("docs/deploying.md", "pip install prefect==3.8.8 prefect-docker==0.7.4"):
        "runs on the GPU host: a docker worker that serves until stopped, against a Prefect server, with Docker "
        "and the NVIDIA Container Toolkit",
}


# ---------------------------------------------------------------------------------------------
# reading the pages

def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def runnable_blocks() -> dict[tuple[str, str], str]:
    """Every block marked runnable: (file, its first line) -> its text, dedented."""
    found: dict[tuple[str, str], str] = {}
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARK:
                continue
            fence = lines[i + 1] if i + 1 < len(lines) else ""
            assert re.fullmatch(r"\s*```(bash|sh|shell)\s*", fence), (
                f"{_rel(page)}:{i + 1}: {MARK} must be followed by a ```bash fence, got {fence!r}")
            indent = fence[: len(fence) - len(fence.lstrip())]
            body = []
            for j in range(i + 2, len(lines)):
                if lines[j].strip() == "```":
                    break
                body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            else:
                raise AssertionError(f"{_rel(page)}:{i + 2}: unclosed code fence")
            text = textwrap.dedent("\n".join(body)).strip("\n")
            first = next((b.strip() for b in text.splitlines() if b.strip()), "")
            key = (_rel(page), first)
            assert key not in found, f"{_rel(page)}: two runnable blocks start with {first!r}; make them differ"
            found[key] = text + "\n"
    return found


def _without_code(text: str) -> str:
    """The page without fenced blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^\s*(```|~~~).*?^\s*\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    text = re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = _slug(match.group(1))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


# ---------------------------------------------------------------------------------------------
# the tests

def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def test_code_fences_are_closed():
    for page in PAGES:
        fences = [i + 1 for i, line in enumerate(page.read_text(encoding="utf-8").splitlines())
                  if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{_rel(page)}: a code fence is not closed (fence lines {fences})"


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no heading #{fragment} in {_rel(dest)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_parameters_page_is_generated():
    spec = importlib.util.spec_from_file_location("gen_parameters", ROOT / "docs" / "gen_parameters.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = ROOT / "docs" / "parameters.md"
    assert page.is_file() and page.read_text(encoding="utf-8") == gen.render(), (
        f"docs/parameters.md differs from what docs/gen_parameters.py generates: run `{REGENERATE}`")


def test_every_runnable_block_is_run_or_listed():
    blocks = runnable_blocks()
    assert not set(RUN) & set(NOT_RUN), "a block is both run and listed as not runnable"
    unknown = [key for key in blocks if key not in RUN and key not in NOT_RUN]
    assert not unknown, ("runnable blocks neither run nor listed with a reason in tests/test_docs.py (add each to "
                         "RUN if it is cheap and safe, else to NOT_RUN with why):\n"
                         + "\n".join(f"  {f}: {first!r}" for f, first in unknown))
    gone = [key for key in [*RUN, *NOT_RUN] if key not in blocks]
    assert not gone, ("blocks listed in tests/test_docs.py that no longer exist in the docs (update the list):\n"
                      + "\n".join(f"  {f}: {first!r}" for f, first in gone))


@pytest.mark.parametrize("key", sorted(RUN), ids=[f"{f}:{first}" for f, first in sorted(RUN)])
def test_runnable_block(key, tmp_path):
    if not (VENV_BIN / "python").exists():
        pytest.skip("no .venv in the repository (make setup)")
    block = runnable_blocks().get(key)
    assert block is not None, f"{key} is no longer in the docs"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "WORKER_READY_FILE", "ENDPOINT_HEALTH_URL")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(tmp_path / "prefect-home"),
               PYTHONDONTWRITEBYTECODE="1", LOCAL_PREFECT_SERVER="off")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=RUN[key])
    assert done.returncode == 0, (f"{key[0]}: the block starting {key[1]!r} failed (exit {done.returncode})\n"
                                  f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
