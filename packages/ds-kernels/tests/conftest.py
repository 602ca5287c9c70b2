"""Shared fixtures: run a test on every SIMD path this CPU can execute, plus the reference fallback."""

from __future__ import annotations

import pytest
from ds_kernels import _loader


def runnable_isas() -> list[str]:
    ext = _loader.extension()
    return list(ext.supported_isas()) if ext is not None else []


@pytest.fixture(params=runnable_isas() + ["reference"])
def isa(request, monkeypatch):
    """Forces one compiled ISA path (like DS_KERNELS_ISA would), or hides the extension for 'reference'
    (then the wrapper's fallback runs: checks, warning, reference call)."""
    name = request.param
    if name == "reference":
        monkeypatch.setattr(_loader, "extension", lambda: None)
        monkeypatch.setattr(_loader, "load_error", lambda: "hidden by the test")
    else:
        _loader.set_isa(name)
    yield name
    if name != "reference":
        _loader.set_isa("auto")


@pytest.fixture(params=runnable_isas())
def compiled_isa(request):
    """Only the compiled paths (skipped entirely when the extension is not built)."""
    _loader.set_isa(request.param)
    yield request.param
    _loader.set_isa("auto")
