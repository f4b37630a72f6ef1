"""The native kernels compiled for this machine: blocks.c and forward.c, built at first use.

They are compiled with the system's C compiler for this CPU (-march=native: AVX2 where it exists),
the first of `_ATTEMPTS` that works, and cached under $XDG_CACHE_HOME/shoal/kernels keyed by the
sources, flags, compiler and CPU. Where no compiler works, `library()` is None, the failure is
logged once, and the engines keep their own formats. SHOAL_NATIVE=0 turns the kernels off and CC
names the compiler (read in settings.py: `Runtime`).
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from shoal.engines.native.abi import Library, bind
from shoal.paths import kernel_cache_dir
from shoal.settings import runtime

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "blocks.c", HERE / "forward.c")  # one library, compiled together
HEADER = HERE / "blocks.h"
_ATTEMPTS = (  # tried in order; the first that compiles is used
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    (),
)


@functools.cache
def library(portable: bool = False) -> Library | None:
    """The kernels for this machine, compiled once and cached; None if off or uncompilable.

    portable=True builds the plain-C paths only (what a CPU without AVX2 runs), for tests.
    """
    knobs = runtime()
    if not knobs.native_kernels:
        return None
    compiler = knobs.cc or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: block-quantized kernels are off")
        return None
    errors = []
    for extra in _ATTEMPTS:
        flags = ["-O3", "-fPIC", "-shared", "-fno-math-errno", *extra]
        if portable:
            flags.append("-DSHOAL_PORTABLE")
        try:
            path = _build(compiler, flags)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(extra) or 'plain'}: {e}")
            continue
        return _load(path)
    log.warning("block-quantized kernels did not compile, they are off: %s", "; ".join(errors))
    return None


def _cpu() -> bytes:
    """What -march=native depends on: the CPU's model and feature flags where Linux lists them,
    so a cache shared by machines with different CPUs (an NFS home) never serves one the other's
    build."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [line for line in f if line.startswith((b"model name", b"flags"))]
        return b"".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode()


def _build(compiler: str, flags: list[str]) -> Path:
    """Compile the sources with flags into the cache (once per source, flags, compiler and CPU)."""
    source = b"".join(path.read_bytes() for path in (*SOURCES, HEADER))
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, check=True, timeout=30
    ).stdout
    parts = [source, " ".join(flags).encode(), version, platform.machine().encode(), _cpu()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = kernel_cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, *map(str, SOURCES), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip().splitlines()[-1:] or "failed")
        os.replace(tmp, target)  # atomic: concurrent builders each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled block-quantized kernels: %s", target)
    return target


def _load(path: Path) -> Library:
    return bind(ctypes.CDLL(str(path)), path)
