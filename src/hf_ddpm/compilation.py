"""`torch.compile` of the U-Net: what a backend needs from the machine, checked before anything depends on it.

TorchDynamo's default backend, inductor, generates kernels and builds them at the first call: C++ on CPU (a C++
compiler and the Python headers), Triton on CUDA (the `triton` package). Without them a run would fail minutes
in, at its first step, with a long traceback. `compile_problem` says so beforehand in one sentence; training
(`--dynamo_backend`) stops on it before anything is written, and `HFDDPMPipeline.compile_unet` raises it.

Compiling never changes the weights or their names: training compiles a wrapper used for its forward only, and
the pipeline compiles its U-Net in place (`nn.Module.compile`), so neither writes `_orig_mod.` keys.
https://pytorch.org/docs/stable/torch.compiler.html
"""

from __future__ import annotations

import os
import sysconfig
from typing import Any

import torch

# TorchDynamo backends offered by `train.py --dynamo_backend` ("no": eager PyTorch). aot_eager and eager run the
# captured graphs without generating code: they need no compiler and serve to debug graph breaks.
DYNAMO_BACKENDS = ("no", "inductor", "cudagraphs", "aot_eager", "eager")
# inductor's modes (torch.compile's `mode`); "reduce-overhead" adds CUDA graphs on GPUs.
DYNAMO_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompilerUnavailable(RuntimeError):
    """The backend cannot generate code on this machine (no C++ compiler / Python headers, or no triton)."""


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (its own search: $CXX, config.cpp.cxx, g++, clang++...)."""
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an inductor without this helper
        return None


def _python_headers() -> str | None:
    """The folder holding Python.h, which inductor's C++ kernels include; None when it is missing."""
    include = sysconfig.get_paths().get("include")
    return include if include and os.path.isfile(os.path.join(include, "Python.h")) else None


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return has_triton()
    except Exception:
        return False


def compile_problem(backend: str, device: torch.device | str) -> str | None:
    """Why `torch.compile(backend=backend)` cannot build code for `device` here, as one sentence; None if it can.

    Only inductor generates code; every other backend returns None. The check is static (finds the tools) and
    takes milliseconds; a broken toolchain that is present still fails at the first compiled call.
    """
    if backend != "inductor":
        return None
    kind = torch.device(device).type
    fallback = "or leave compilation off (train.py: --dynamo_backend no)"
    if kind == "cuda":
        if not _has_triton():
            return f"torch.compile's inductor backend needs the `triton` package on CUDA GPUs: pip install triton, {fallback}."
        return None
    if kind == "cpu":
        if _cpp_compiler() is None:
            return (
                "torch.compile's inductor backend needs a C++ compiler on CPU and found none (it looks for $CXX, "
                f"g++, clang++): install one (e.g. apt-get install g++), {fallback}."
            )
        if _python_headers() is None:
            return (
                "torch.compile's inductor backend needs the Python headers (Python.h) on CPU and found none in "
                f"{sysconfig.get_paths().get('include')!r}: install them (e.g. apt-get install python3-dev), {fallback}."
            )
    return None


def check_compile(backend: str, device: torch.device | str) -> None:
    """Raise `CompilerUnavailable` with `compile_problem`'s sentence when the backend cannot build code here."""
    problem = compile_problem(backend, device)
    if problem is not None:
        raise CompilerUnavailable(problem)


def compile_kwargs(
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `torch.compile`; `mode` only where it means something (inductor, not "default")."""
    kwargs: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    if mode is not None and mode != "default":
        if backend != "inductor":
            raise ValueError(f"mode={mode!r} applies to the inductor backend only, not {backend!r}.")
        kwargs["mode"] = mode
    if options is not None:
        kwargs["options"] = options
    return kwargs
