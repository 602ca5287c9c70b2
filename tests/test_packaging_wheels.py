"""Each package builds a wheel and an sdist, and installs alone beside only the ds packages it declares.

Builds the six wheels, then in a fresh venv installs only ds-core + ds-data (plus their declared
third-party dependencies), imports them, and shows that ds_train is neither installed nor needed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["ds-core", "ds-kernels", "ds-train", "ds-inference", "ds-compression", "ds-data"]
DECLARED_DS_DEPS = {
    "ds-core": set(),
    "ds-kernels": {"ds-core"},
    "ds-train": {"ds-core", "ds-kernels"},
    "ds-inference": {"ds-core", "ds-kernels"},
    "ds-compression": {"ds-core", "ds-kernels"},
    "ds-data": {"ds-core"},
}


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_declared_ds_dependencies_follow_the_dag():
    import tomllib

    for pkg in PACKAGES:
        meta = tomllib.loads((ROOT / "packages" / pkg / "pyproject.toml").read_text())["project"]
        ds_deps = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in meta["dependencies"]
                   if d.startswith("ds-")}
        assert ds_deps == DECLARED_DS_DEPS[pkg], pkg
        assert any(d.startswith("torch>=") for d in meta["dependencies"]), f"{pkg} must declare a torch range"


@pytest.mark.slow
def test_six_wheels_build_and_core_plus_data_install_alone(tmp_path):
    dist = tmp_path / "dist"
    for pkg in PACKAGES:
        _run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", str(dist),
              str(ROOT / "packages" / pkg)], timeout=600)
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    sdists = sorted(p.name for p in dist.glob("*.tar.gz"))
    for pkg in PACKAGES:
        stem = pkg.replace("-", "_")
        assert any(w.startswith(stem + "-") for w in wheels), f"no wheel for {pkg}: {wheels}"
        assert any(s.startswith(stem + "-") for s in sdists), f"no sdist for {pkg}: {sdists}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    # Third-party deps first (torch pinned to the CPU wheel on disk), then the two ds wheels without deps.
    _run([py, "-m", "pip", "install", "-q", "torch==2.13.0", "pydantic>=2", "numpy", "packaging"], timeout=900)
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
          *[str(p) for p in dist.glob("ds_core-*.whl")], *[str(p) for p in dist.glob("ds_data-*.whl")]])
    _run([py, "-m", "pip", "check"])  # every declared dependency of what is installed is satisfied
    probe = (
        "import json, importlib.util, ds_core, ds_data, ds_core.comm, ds_core.config\n"
        "print(json.dumps({'train': importlib.util.find_spec('ds_train') is not None,"
        " 'kernels': importlib.util.find_spec('ds_kernels') is not None}))"
    )
    found = json.loads(_run([py, "-c", probe]).strip().splitlines()[-1])
    assert found == {"train": False, "kernels": False}
    report = _run([str(venv / "bin" / "ds-report")])
    assert "ds-train" in report and "not installed" in report
