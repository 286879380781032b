"""The native CPU kernels (``kernels/cpu/csrc/*.c``): built once per machine, loaded with ctypes.

The C sources are compiled with the system C compiler (``cc -O3 -march=native -fopenmp``) into one shared
library in a cache directory, keyed by the sources, flags, compiler and CPU; nothing is built at install time.
This module only builds and loads; it imports no kernel module. Whether the engine may use the library (it is
switched on, it builds, and every kernel agrees with its torch reference) is ``availability.native_cpu_available``,
asked when an attention backend is chosen. ``GLMSERVE_NATIVE_CPU=0`` turns it off: the switch is read each time it
is asked (``native_enabled``), never cached; the built library is loaded once per process (a property of the
machine, like the self-check).

The library links OpenMP; torch's CPU build has already loaded its own ``libgomp.so.1`` by the time this module
runs, so the dynamic loader resolves ours to the same runtime and the kernels share torch's thread pool.
"""
from __future__ import annotations

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

logger = logging.getLogger(__name__)

ENV_SWITCH = "GLMSERVE_NATIVE_CPU"
ENV_CACHE_DIR = "GLMSERVE_CACHE_DIR"
SOURCE_DIR = Path(__file__).with_name("csrc")
# -ffp-contract=off: no multiply-add is fused behind the code's back, so elementwise ops round as torch's do
# (the attention kernel asks for its FMAs explicitly).
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared",
                 "-std=c11")
_COMPILE_TIMEOUT_S = 180

_i64, _ptr, _int, _float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# name: (return type, argument types), as declared in the C sources. Most come once per activation dtype: the
# ones in _PER_DTYPE exist as NAME_f32 and NAME_bf16 with the same arguments (pointers are untyped here).
_PER_DTYPE = {
    "glmserve_paged_decode": (_int, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr,
                                     _i64, _i64, _i64, _i64, _i64, _i64, _float, _int]),
    "glmserve_rms_norm": (None, [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _float, _int]),
    "glmserve_rotary": (None, [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _int]),
    "glmserve_silu_mul": (None, [_ptr, _ptr, _i64, _i64, _int]),
}
_SIGNATURES = {
    **{f"{name}_{suffix}": signature for name, signature in _PER_DTYPE.items() for suffix in ("f32", "bf16")},
    "glmserve_write_kv": (_i64, [_ptr, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64]),
}


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glmserve"


def _cpu_identity() -> str:
    """What -march=native depends on: a library built for another CPU (a shared home directory) is not reused."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return "".join([line for line in cpuinfo if line.startswith(("model name", "flags"))][:2])
    except OSError:
        return platform.processor()


def build(compiler: str, flags: tuple[str, ...] = COMPILE_FLAGS) -> Path:
    """Compile the sources unless a library for these sources, flags, compiler and CPU is cached; returns its
    path. (Tests pass other flags to build the portable, non-AVX2 code paths.)"""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in sorted(SOURCE_DIR.glob("*.[ch]"))]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, _cpu_identity()]).encode())
    name = f"glmserve_cpu_{key.hexdigest()[:16]}.so"
    directory = _cache_dir() / "native"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        # An unwritable home (a read-only container filesystem): build into this user's temporary directory.
        directory = Path(tempfile.gettempdir()) / f"glmserve-{os.getuid()}" / "native"
        directory.mkdir(parents=True, exist_ok=True)
    library = directory / name
    if library.exists():
        return library
    # Build beside the target and rename into place: processes starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, *flags, *map(str, _sources()), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, library)
    return library


def native_enabled() -> bool:
    """Whether ``GLMSERVE_NATIVE_CPU`` allows the native kernels (read now, every time)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def load_library() -> ctypes.CDLL | None:
    """Build (or reuse) and load the library now, or None where it cannot be built or loaded (the reason is
    logged). Not cached: ``library`` is the per-process copy."""
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: the CPU kernels stay in torch")
        return None
    try:
        return load(build(compiler))
    # OSError: no cache directory or an unloadable file; AttributeError: a function missing from the library.
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        logger.warning("native CPU kernels unavailable (%s): staying in torch", exc)
        return None


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use and kept for the process, or None where it cannot be built."""
    return load_library()


def load(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib
