"""Loads the compiled CPU extension once and says why when it is missing.

The extension (`ds_kernels._C`) is built at install time by hatch_build.py. It links no libtorch, so
it loads under any torch version; it can still be absent (no compiler at install, `DS_BUILD_CPU=0`).
Callers then use the reference in `ds_kernels.reference` after one warning.
"""

from __future__ import annotations

import os
from types import ModuleType

from ds_core.logging import warn_once

_module: ModuleType | None = None
_error: str | None = None
_loaded = False

ISA_ENV = "DS_KERNELS_ISA"


def extension() -> ModuleType | None:
    """The compiled module, or None (the reason is in `load_error()`)."""
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        if os.environ.get("DS_KERNELS_DISABLE", "0") == "1":
            _error = "disabled by DS_KERNELS_DISABLE=1"
        else:
            try:
                from ds_kernels import _C  # type: ignore[attr-defined]

                _module = _C
            except ImportError as exc:  # the wheel was built without a compiler, or for another platform
                _error = f"{type(exc).__name__}: {exc}"
        if _module is not None:
            forced = os.environ.get(ISA_ENV, "").strip().lower()
            if forced:
                # An invalid or unsupported ISA is an error, not a silent fallback: a test forcing a
                # path must run that path or fail.
                _module.set_isa(forced)
    return _module


def load_error() -> str | None:
    extension()
    return _error


def fallback_warning(op: str) -> None:
    warn_once(
        f"ds_kernels: compiled op '{op}' is unavailable ({load_error()}); using the PyTorch reference "
        "(slower). Reinstall ds-kernels with a C++ compiler to build it.",
        key=f"ds_kernels.fallback.{op}",
    )


def isa() -> str:
    """The SIMD path in use by the compiled CPU ops ('avx512', 'avx2', 'scalar'), or 'none'."""
    ext = extension()
    return ext.current_isa() if ext is not None else "none"


def set_isa(name: str) -> None:
    """Force a SIMD path ('avx512', 'avx2', 'scalar', or 'auto'); raises if this CPU cannot run it."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"ds_kernels: cannot select ISA {name!r}: extension not loaded ({load_error()})")
    ext.set_isa(name)


def num_threads() -> int:
    import torch

    return max(1, torch.get_num_threads())
