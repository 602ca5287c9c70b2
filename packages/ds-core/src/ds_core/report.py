"""`ds-report`: what this installation can do, readable by a person.

Packages add rows through the ``ds_core.report`` entry-point group: a callable returning
``[(name, status), ...]`` (ds-kernels lists its compiled ops and the ISA or I/O engine in use).
"""
from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import subprocess
import sys

DS_PACKAGES = ["ds-core", "ds-kernels", "ds-train", "ds-inference", "ds-compression", "ds-data"]
GREEN, RED, YELLOW, END = "\033[92m", "\033[91m", "\033[93m", "\033[0m"


def _color(text: str, color: str) -> str:
    return f"{color}{text}{END}" if sys.stdout.isatty() else text


def _compiler(name: str) -> str:
    path = shutil.which(name)
    if not path:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        lines = out.strip().splitlines()
        return next((ln for ln in lines if "release" in ln), lines[0] if lines else path)
    except (OSError, subprocess.SubprocessError):
        return path


def _section(title: str, rows: list[tuple[str, str]]) -> str:
    width = max([len(k) for k, _ in rows] + [10])
    lines = [title, "-" * 60]
    lines += [f"{k:<{width}} .... {v}" for k, v in rows]
    return "\n".join(lines) + "\n"


def collect() -> dict[str, list[tuple[str, str]]]:
    import torch
    import torch.distributed as dist

    from ds_core.accelerator import get_accelerator

    acc = get_accelerator()
    env = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("torch", f"{torch.__version__} ({torch.__file__.rsplit('/', 2)[0]})"),
        ("torch cuda/hip build", f"cuda {torch.version.cuda or '-'} / hip {getattr(torch.version, 'hip', None) or '-'}"),
        ("accelerator", acc.describe()),
        ("supported dtypes", ", ".join(str(d).replace("torch.", "") for d in acc.supported_dtypes())),
        ("default comm backend", acc.communication_backend_name()),
    ]
    backends = []
    for name, check in [("gloo", "is_gloo_available"), ("nccl", "is_nccl_available"), ("mpi", "is_mpi_available"),
                        ("ucc", "is_ucc_available"), ("xccl", "is_xccl_available")]:
        fn = getattr(dist, check, None)
        ok = bool(fn()) if fn else False
        backends.append((name, _color("yes", GREEN) if ok else _color("no", YELLOW)))
    packages = []
    for pkg in DS_PACKAGES:
        try:
            packages.append((pkg, _color(md.version(pkg), GREEN)))
        except md.PackageNotFoundError:
            packages.append((pkg, _color("not installed", YELLOW)))
    ops: list[tuple[str, str]] = []
    for ep in md.entry_points(group="ds_core.report"):
        try:
            ops.extend(ep.load()())
        except Exception as exc:  # a broken plugin must not hide the rest of the report
            ops.append((ep.name, _color(f"report failed: {type(exc).__name__}: {exc}", RED)))
    tools = [("c++ compiler", _compiler("c++")), ("nvcc", _compiler("nvcc")), ("hipcc", _compiler("hipcc"))]
    return {"environment": env, "communication backends": backends, "ds packages": packages,
            "compiled ops": ops or [("(none)", "install ds-kernels for compiled ops")], "compilers": tools}


def main(argv: list[str] | None = None) -> int:
    sections = collect()
    print("ds-report: what this installation of the ds packages can do\n")
    for title, rows in sections.items():
        print(_section(title, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
