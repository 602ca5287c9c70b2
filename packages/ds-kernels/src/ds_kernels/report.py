"""Rows for `ds-report` (entry point group "ds_core.report"): which ops are compiled, for which ISA."""

from __future__ import annotations


def report_rows() -> list[tuple[str, str]]:
    from ds_kernels import _loader, aio, cuda, optim, quant

    ext = _loader.extension()
    isa = _loader.isa()
    fallback = f"PyTorch reference (extension not loaded: {_loader.load_error()})"
    return [
        (
            "ds_kernels extension",
            f"compiled; CPU supports {', '.join(ext.supported_isas())}" if ext is not None else fallback,
        ),
        ("cpu_adam/adagrad/lion", f"compiled, {isa} in use" if optim.available() else fallback),
        ("quant (int8/int4, qmatmul)", f"compiled, {isa} in use" if quant.available() else fallback),
        ("aio", aio.engines()[0] + " (available: " + ", ".join(aio.engines()) + ")"),
        ("cuda ops", cuda.status()),
    ]
