"""Hatchling build hook: compiles the CPU extension (and the CUDA library when asked) into the wheel.

The C++ takes raw pointers and links no libtorch, so it is built with the plain compiler: one object
per ISA for the hot loops (AVX-512, AVX2+FMA+F16C, baseline; picked at run time by CPUID, never
-march=native), the I/O engine, the dispatcher and the pybind11 bindings, compiled in parallel.

Environment:
  DS_BUILD_CPU=0|1   skip the CPU extension / fail the build if it cannot be compiled (default: try,
                     and ship the PyTorch references with a warning if the compiler fails)
  DS_BUILD_CUDA=0|1  skip / force the CUDA library (default: build when nvcc and a CUDA torch are present)
  CXX, NVCC          compilers to use; DS_CUDA_ARCHS="80;90" the GPU architectures
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
BASE_FLAGS = [
    "-O3",
    "-fPIC",
    "-std=c++17",
    "-fopenmp",
    "-fvisibility=hidden",
    "-fno-math-errno",  # lets sqrt vectorize (no errno to set)
    "-ffp-contract=off",  # FMA only where the kernels ask for it, so results match the references
    "-Wall",
    "-Wno-maybe-uninitialized",
]
X86_ISAS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}


def _env_flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def build_cpu_extension(out_path: str, build_dir: str) -> None:
    """Compile and link ds_kernels._C into `out_path`."""
    import pybind11

    cxx = os.environ.get("CXX", "c++")
    os.makedirs(build_dir, exist_ok=True)
    py_inc = ["-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"]]
    isas = X86_ISAS if _is_x86() else {"scalar": []}
    x86_def = ["-DDSK_HAVE_X86_PATHS"] if _is_x86() else []
    jobs = []
    for isa, flags in isas.items():
        jobs.append(
            (os.path.join(CSRC, "cpu", "kernels.cpp"), f"kernels_{isa}.o", [f"-DDSK_ISA={isa}", *flags])
        )
    jobs.append((os.path.join(CSRC, "cpu", "dispatch.cpp"), "dispatch.o", x86_def))
    jobs.append((os.path.join(CSRC, "cpu", "aio_engine.cpp"), "aio_engine.o", []))
    jobs.append((os.path.join(CSRC, "bindings.cpp"), "bindings.o", py_inc))
    objects = [os.path.join(build_dir, obj) for _, obj, _ in jobs]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = [
            pool.submit(_run, [cxx, *BASE_FLAGS, *extra, "-c", src, "-o", os.path.join(build_dir, obj)])
            for src, obj, extra in jobs
        ]
        for f in futures:
            f.result()
    _run([cxx, "-shared", "-fopenmp", *objects, "-o", out_path, "-lpthread"])


def _want_cuda() -> bool:
    flag = _env_flag("DS_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    if not shutil.which(os.environ.get("NVCC", "nvcc")):
        return False
    try:
        import torch

        return torch.version.cuda is not None
    except ImportError:
        return False


def cuda_sources() -> list[str]:
    folder = os.path.join(CSRC, "cuda")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".cu"))


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("DS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip() for a in archs)):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def build_cuda_library(out_path: str) -> None:
    """Compile csrc/cuda/*.cu into one shared library of extern "C" entry points (no libtorch)."""
    nvcc = os.environ.get("NVCC", "nvcc")
    _run(
        [
            nvcc,
            "-O3",
            "-std=c++17",
            "-shared",
            "-Xcompiler",
            "-fPIC",
            *cuda_arch_flags(),
            "-I" + os.path.join(CSRC, "cuda"),
            *cuda_sources(),
            "-o",
            out_path,
        ]
    )


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        editable = version == "editable"
        pkg_dir = os.path.join(HERE, "src", "ds_kernels")
        build_dir = os.path.join(HERE, "build", "ext")
        ext_name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
        # An editable install imports from src/, so the library goes there; a wheel gets it force-included.
        out_dir = pkg_dir if editable else build_dir
        os.makedirs(out_dir, exist_ok=True)
        built = []
        cpu_flag = _env_flag("DS_BUILD_CPU")
        if cpu_flag != "0":
            target = os.path.join(out_dir, ext_name)
            try:
                build_cpu_extension(target, os.path.join(build_dir, "obj"))
                built.append((target, ext_name))
            except Exception as exc:  # no compiler: ship the references (they warn once at run time)
                if cpu_flag == "1":
                    raise
                print(
                    f"ds-kernels: CPU extension not built, the PyTorch references will be used: {exc}",
                    file=sys.stderr,
                )
        if _want_cuda():
            target = os.path.join(out_dir, "_cuda_ops.so")
            build_cuda_library(target)
            built.append((target, "_cuda_ops.so"))
        if built:
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
            if not editable:
                for path, name in built:
                    build_data["force_include"][path] = f"ds_kernels/{name}"
