"""Rows for `ds-report` (entry point group "ds_core.report"): which ops are compiled, for which ISA."""
from __future__ import annotations


def report_rows() -> list[tuple[str, str]]:
    from ds_kernels import _loader, aio, optim, quant

    ext = _loader.extension()
    if ext is None:
        why = f"reference fallback ({_loader.load_error()})"
        return [("cpu_adam", why), ("quant", why), ("aio", "python-threads (extension not built)")]
    isa = _loader.isa()
    rows = [
        ("ds_kernels extension", f"compiled; CPU supports {', '.join(ext.supported_isas())}"),
        ("cpu_adam/adagrad/lion", f"compiled, {isa} in use" if optim.available() else "reference"),
        ("quant (int8/int4, qmatmul)", f"compiled, {isa} in use" if quant.available() else "reference"),
        ("aio", aio.engines()[0] + " (available: " + ", ".join(aio.engines()) + ")"),
    ]
    from ds_kernels import cuda

    rows.append(("cuda ops", cuda.status()))
    return rows
