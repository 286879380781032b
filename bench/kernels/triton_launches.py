"""The Triton kernels' launches, seen from outside: record them, name the compiled variant each one needs, compile
that variant for a GPU target on any machine.

A launch ``kernel[grid](*args, **kwargs)`` goes through the kernel object's ``run``; ``record_launches`` swaps that
method for one that records the call (and runs the kernel only when asked). ``launch_key`` is the key Triton's JIT
cache would file the compiled binary under on a CUDA device (the specialisation of every argument: pointer dtypes
and alignment, integers equal to 1 or divisible by 16, the constexprs, and the options such as num_warps and
num_stages): two launches with one key share one compile, a launch with a new key compiles. It works in the CPU
interpreter too (the key comes from a compiled-mode twin of the kernel), which makes "nothing compiles after the
warm-up" testable without a GPU. ``compile_launch`` compiles a recorded launch for a target, exactly as the JIT
would, and reads registers and spills from the bundled ptxas and shared memory from the compiled kernel.

Uses triton's runtime internals (``create_function_from_signature``, ``JITFunction._pack_args``), as of triton 3.9;
``cuda_target_unavailable`` says why where they, or the CUDA backend, are missing.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

KERNEL_MODULES = ("glmserve.kernels.triton.decode_attention", "glmserve.kernels.triton.extend_attention",
                  "glmserve.kernels.triton.split_kv", "glmserve.kernels.triton.kv_cache_write")
H100_SHARED_BYTES = 227 * 1024      # the most shared memory one H100 thread block may use (sm_90)
H100_SMS = 132


@dataclass
class Launch:
    kernel: Any                       # the @triton.jit object (JITFunction, or InterpretedFunction in the interpreter)
    grid: tuple
    args: tuple
    kwargs: dict
    label: str = ""                   # what launched it (filled in by the caller)

    @property
    def name(self) -> str:
        return kernel_fn(self.kernel).__name__


def kernel_fn(kernel):
    return kernel.fn


def triton_kernels() -> list:
    """Every @triton.jit kernel (the launchable ones, names starting with '_') of glmserve.kernels.triton."""
    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") and hasattr(obj, "fn") and hasattr(obj, "run") and obj not in found:
                found.append(obj)
    return found


@contextlib.contextmanager
def record_launches(execute: bool = True, kernels: list | None = None) -> Iterator[list[Launch]]:
    """Record every launch of ``kernels`` (default: all of glmserve's) in the yielded list; with ``execute`` the
    kernel also runs, else the launch does nothing (its outputs stay unwritten)."""
    launches: list[Launch] = []
    kernels = triton_kernels() if kernels is None else kernels
    saved = {}
    for kernel in kernels:
        saved[id(kernel)] = kernel.__dict__.get("run")
        real_run = kernel.run

        def run(*args, grid, warmup, _kernel=kernel, _real=real_run, **kwargs):
            launches.append(Launch(_kernel, tuple(grid) if not callable(grid) else grid, args, dict(kwargs)))
            if execute:
                return _real(*args, grid=grid, warmup=warmup, **kwargs)
            return None
        kernel.run = run
    try:
        yield launches
    finally:
        for kernel in kernels:
            if saved[id(kernel)] is None:
                del kernel.run
            else:
                kernel.run = saved[id(kernel)]


def cuda_target_unavailable() -> str | None:
    """Why this triton cannot compile for a CUDA target here (None: it can)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"triton's compiler is not importable: {exc}"
    try:
        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:   # no NVIDIA backend in this triton build
        return f"triton {triton.__version__} has no CUDA backend: {exc}"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__}'s JIT internals differ from 3.9's (no JITFunction._pack_args)"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90).path
    except Exception as exc:
        return f"triton {triton.__version__} bundles no usable ptxas: {exc}"
    del backend
    return None


def _target(capability: int = 90, warp_size: int = 32):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", capability, warp_size)


@functools.lru_cache(maxsize=None)
def _compiled_twin(kernel):
    """The compiled-mode JITFunction of ``kernel`` (itself, or built from an interpreted kernel's function with
    the same specialisation options)."""
    from triton.runtime.jit import JITFunction
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **getattr(kernel, "kwargs", {}))


@functools.lru_cache(maxsize=None)
def _binder(kernel, capability: int):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    twin = _compiled_twin(kernel)
    backend = make_backend(_target(capability))
    return twin, backend, create_function_from_signature(twin.signature, twin.params, backend)


def _launch_kwargs(twin, kwargs: dict) -> dict:
    # What JITFunction.run adds to every launch's options before it binds the arguments.
    from triton import knobs
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", twin.debug) or knobs.runtime.debug
    for option, knob in (("instrumentation_mode", "instrumentation_mode"),
                         ("fpsan_homomorphic_casts", "fpsan_homomorphic_casts")):
        if hasattr(knobs.compilation, knob):
            kwargs[option] = getattr(knobs.compilation, knob)
    return kwargs


def _bind(launch: Launch, capability: int):
    twin, backend, binder = _binder(launch.kernel, capability)
    kwargs = _launch_kwargs(twin, launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return twin, backend, kwargs, bound, specialization, options


def launch_key(launch: Launch, capability: int = 90) -> str:
    """The JIT cache key of the binary ``launch`` needs on a CUDA device of this compute capability."""
    from triton.runtime.jit import compute_cache_key
    _, _, _, _, specialization, options = _bind(launch, capability)
    return f"{launch.name}:{compute_cache_key({}, specialization, options)}"


@dataclass
class CompiledVariant:
    kernel: str
    key: str
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    load_buffers: int | None = None   # depth of the software pipeline: shared-memory buffers per pipelined load
    compile_s: float = 0.0
    error: str | None = None
    labels: list[str] = field(default_factory=list)


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# A pipelined load's shared-memory allocation in the TTGIR: memdesc<NxROWSxCOLSx...> with N buffers.
_MULTI_BUFFER = re.compile(r"local_alloc\b[^\n]*?!ttg\.memdesc<(\d+)x\d+x\d+x")


def pipeline_buffers(ttgir: str) -> int:
    """The most buffers any pipelined load cycles through (1: loads are not overlapped with compute)."""
    return max((int(n) for n in _MULTI_BUFFER.findall(ttgir)), default=1)


def compile_launch(launch: Launch, capability: int = 90) -> CompiledVariant:
    """Compile ``launch``'s variant for sm_<capability> as the JIT would (same signature, specialisation,
    constexprs and options), with ptxas' report captured."""
    from triton import knobs
    from triton.compiler import ASTSource, compile as triton_compile

    twin, backend, kwargs, bound, specialization, options = _bind(launch, capability)
    options, signature, constexprs, attrs = twin._pack_args(backend, kwargs, bound, specialization, options)
    names = {path: twin.arg_names[path[0]] for path in constexprs}
    variant = CompiledVariant(
        kernel=launch.name, key=launch_key(launch, capability),
        constexprs={names[p]: (v if isinstance(v, (int, float, bool, str)) else str(v)) for p, v in constexprs.items()},
        num_warps=options.num_warps, num_stages=options.num_stages)
    log = io.StringIO()
    start = time.perf_counter()
    # Always through ptxas (a cached binary would skip it), and its -v report printed, which we capture.
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton_compile(ASTSource(twin, signature, constexprs, attrs), target=_target(capability),
                                          options=options.__dict__)
        except Exception as exc:   # a compile failure is a result to report, not a crash of the report
            variant.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            variant.compile_s = round(time.perf_counter() - start, 2)
            return variant
    variant.compile_s = round(time.perf_counter() - start, 2)
    variant.shared_bytes = int(compiled.metadata.shared)
    variant.load_buffers = pipeline_buffers(compiled.asm.get("ttgir", ""))
    text = log.getvalue()
    used, spills = _USED.search(text), _SPILL.search(text)
    if used is None or spills is None:
        variant.error = "ptxas printed no resource report"
        return variant
    variant.registers = int(used.group(1))
    variant.stack_bytes, variant.spill_store_bytes, variant.spill_load_bytes = (int(g) for g in spills.groups())
    return variant
