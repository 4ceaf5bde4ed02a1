"""Faults in the kernel cache: a damaged, foreign or unprotected entry is rebuilt or refused with
a warning that names it, never loaded; the cache folder is made private. Each case runs the
library in a child process against its own cache folder (the cpu backend).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fault_helpers import ZERO, write_kernel

import pymetalnn

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import sys, warnings, numpy as np, pymetalnn
warnings.simplefilter("always")
dev = pymetalnn.device("cpu")
k = dev.library(sys.argv[1]).kernel("fill")
b = dev.buffer(np.zeros(4, np.float32)); k(4, b, 4, 3.0)
print(b.numpy(np.float32).tolist())
"""


def _run_cached(cache: Path, src: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYMETALNN_CACHE=str(cache), PYTHONPATH=str(ROOT))
    env.pop("PYMETALNN_VALIDATE", None)
    return subprocess.run([sys.executable, "-c", RUN, src], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def cached(tmp_path):
    if pymetalnn.availability().get("cpu"):
        pytest.skip("cpu backend unavailable")
    import shutil

    from pymetalnn.runtime.core import cache_dir

    src = write_kernel(tmp_path, "fill", ZERO)[0]
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for p in Path(cache_dir()).glob("pmn_cpu_rt-*.so*"):  # the runtime: not rebuilt per case
        shutil.copy2(p, cache / p.name)
    r = _run_cached(cache, src)
    assert r.returncode == 0 and r.stdout.strip() == "[3.0, 3.0, 3.0, 3.0]", r.stderr
    assert (cache.stat().st_mode & 0o777) == 0o700
    lib = next(p for p in cache.iterdir() if p.name.startswith("fill-") and p.suffix == ".so")
    return cache, src, lib


def test_cache_folder_is_made_private(tmp_path):
    from pymetalnn.runtime import core

    old = os.umask(0o022)
    try:
        d = tmp_path / "a" / "cache"
        assert core._trusted_dir(str(d)) == str(d)
    finally:
        os.umask(old)
    assert (d.stat().st_mode & 0o777) == 0o700


def _damage(lib: Path, how: str) -> None:
    if how == "truncated":
        with open(lib, "r+b") as f:
            f.truncate(lib.stat().st_size // 3)
    elif how == "garbage":
        lib.write_bytes(os.urandom(lib.stat().st_size))
    elif how == "empty":
        lib.write_bytes(b"")
    elif how == "digest missing":
        Path(str(lib) + ".sha256").unlink()
    elif how == "writable by others":
        os.chmod(lib, 0o666)
    elif how == "symlink":
        target = lib.with_name("elsewhere.so")
        lib.rename(target)
        lib.symlink_to(target)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "digest missing",
                                 "writable by others", "symlink"])
def test_cache_bad_entry_is_rebuilt(cached, how):
    cache, src, lib = cached
    _damage(lib, how)
    r = _run_cached(cache, src)
    assert r.returncode == 0, r.stderr  # no SIGBUS, no raw OSError
    assert r.stdout.strip() == "[3.0, 3.0, 3.0, 3.0]"
    if how != "digest missing":  # an entry from before digests is rebuilt quietly
        assert "rebuilding" in r.stderr and lib.name in r.stderr
    st = os.lstat(lib)
    assert not os.path.islink(lib) and (st.st_mode & 0o077) == 0
    assert "rebuilding" not in _run_cached(cache, src).stderr  # repaired for good


def test_cache_folder_writable_by_others_is_not_used(cached):
    cache, src, lib = cached
    os.chmod(cache, 0o777)
    try:
        before = lib.stat().st_mtime_ns
        r = _run_cached(cache, src)
    finally:
        os.chmod(cache, 0o700)
    assert r.returncode == 0 and r.stdout.strip() == "[3.0, 3.0, 3.0, 3.0]", r.stderr
    assert "writable by others" in r.stderr and "private" in r.stderr
    assert lib.stat().st_mtime_ns == before


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                    reason="needs root to give a file to another user")
def test_cache_entry_of_another_user_is_not_loaded(cached):
    cache, src, lib = cached
    lib.write_bytes(b"\x7fELF planted")
    os.chown(lib, 65534, 65534)
    os.chown(str(lib) + ".sha256", 65534, 65534)
    r = _run_cached(cache, src)
    assert r.returncode == 0 and r.stdout.strip() == "[3.0, 3.0, 3.0, 3.0]", r.stderr
    assert "owned by uid 65534" in r.stderr
    assert os.stat(lib).st_uid == 0
