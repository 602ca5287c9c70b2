"""Build-level properties: CUDA sources compile (compile-only), ISA forcing, fallback, ds-report rows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ds_kernels
import pytest
import torch
from ds_kernels import _loader, report

PKG = Path(__file__).resolve().parents[1]
NVCC = (
    os.environ.get("NVCC")
    or shutil.which("nvcc")
    or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)
)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_sources_compile(tmp_path):
    """Every .cu compiles (compile-only, one architecture) so the GPU sources stay buildable without a GPU."""
    sources = sorted((PKG / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources found"
    procs = [
        subprocess.Popen(
            [
                NVCC,
                "-std=c++17",
                "-O2",
                "-Xcompiler",
                "-fPIC",
                "-gencode",
                "arch=compute_80,code=sm_80",
                "-I",
                str(PKG / "csrc" / "cuda"),
                "-c",
                str(src),
                "-o",
                str(tmp_path / (src.stem + ".o")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for src in sources
    ]
    failures = []
    for src, proc in zip(sources, procs):
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{src.name}:\n{out[-3000:]}")
    assert not failures, "\n".join(failures)
    for src in sources:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@pytest.mark.skipif(_loader.extension() is None, reason="extension not built")
def test_isa_env_var_forces_a_path_and_rejects_an_unknown_one():
    res = _run_python("import ds_kernels; print(ds_kernels.isa())", DS_KERNELS_ISA="scalar")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "scalar"
    bad = _run_python(
        "import torch; from ds_kernels.optim import cpu_adam_step as f; "
        "t=torch.zeros(4); f(t,t.clone(),t.clone(),t.clone(),step=1,lr=1,beta1=.9,beta2=.9,eps=1,weight_decay=0)",
        DS_KERNELS_ISA="sse9",
    )
    assert bad.returncode != 0 and "sse9" in bad.stderr


def test_disabled_extension_falls_back_with_one_warning():
    code = (
        "import torch; from ds_kernels.optim import cpu_adam_step as f\n"
        "for _ in range(3):\n"
        "    t=torch.ones(8); f(t,torch.ones(8),torch.zeros(8),torch.zeros(8),step=1,lr=.1,beta1=.9,beta2=.99,eps=1e-8,weight_decay=0)\n"
        "print(float(t[0]))\n"
    )
    res = _run_python(code, DS_KERNELS_DISABLE="1")
    assert res.returncode == 0, res.stderr
    assert abs(float(res.stdout.strip()) - 0.9) < 1e-6  # one Adam step of size lr on a unit gradient
    assert res.stderr.count("compiled op 'cpu_adam' is unavailable") == 1


def test_report_rows_name_each_op():
    rows = dict(report.report_rows())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rows.items())
    assert any("aio" in k for k in rows)
    if _loader.extension() is not None:
        assert f"{ds_kernels.isa()} in use" in rows["cpu_adam/adagrad/lion"]


def test_report_entry_point_is_declared():
    text = (PKG / "pyproject.toml").read_text()
    assert '[project.entry-points."ds_core.report"]' in text
    assert 'kernels = "ds_kernels.report:report_rows"' in text


@pytest.mark.skipif(_loader.extension() is None, reason="extension not built")
def test_lowp_conversion_rounds_like_torch_on_special_values(compiled_isa):
    """bf16/fp16 copies of the updated params: ties, subnormals, overflow, inf and nan as torch rounds them."""
    from ds_kernels.optim import cpu_lion_step

    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            6e-8,
            3e-8,
            2.0**-24,
            1e-40,
            float("inf"),
            float("-inf"),
            float("nan"),
        ]
        + [1.5] * 20
    )
    for dtype in (torch.bfloat16, torch.float16):
        p = special.clone()
        out = torch.empty_like(p, dtype=dtype)
        # lr=0: the param is unchanged, so out must equal torch's own conversion of it.
        cpu_lion_step(
            p,
            torch.zeros_like(p),
            torch.zeros_like(p),
            step=1,
            lr=0.0,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            param_out_lowp=out,
        )
        expect = special.to(dtype)
        assert torch.equal(out.isnan(), expect.isnan())
        keep = ~expect.isnan()
        assert torch.equal(out[keep].view(torch.int16), expect[keep].view(torch.int16)), dtype


OBJ_DIR = PKG / "build" / "ext" / "obj"


@pytest.mark.skipif(
    shutil.which("objdump") is None or not (OBJ_DIR / "kernels_scalar.o").exists(),
    reason="needs objdump and the objects of a local build (packages/ds-kernels/build/ext/obj)",
)
def test_per_isa_objects_hold_only_their_instructions():
    """The baseline copy must run on any x86-64 (no AVX registers); the SIMD copies really vectorize
    sqrt (-fno-math-errno) instead of calling libm."""

    def disasm(name: str) -> str:
        return subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", str(OBJ_DIR / name)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    scalar = disasm("kernels_scalar.o")
    assert "%ymm" not in scalar and "%zmm" not in scalar
    assert "sqrtf" not in scalar  # no errno-setting libm call in the loop
    assert "vsqrtps %zmm" in disasm("kernels_avx512.o").replace("\t", " ").replace("  ", " ")
    assert "vsqrtps %ymm" in disasm("kernels_avx2.o").replace("\t", " ").replace("  ", " ")
