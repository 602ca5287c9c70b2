import pytest
import torch
from ds_core import accelerator
from ds_core.accelerator import AcceleratorError, get_accelerator, set_accelerator


@pytest.fixture(autouse=True)
def _restore():
    yield
    set_accelerator(None)


def test_cpu_is_chosen_when_no_device_is_present(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    acc = set_accelerator(None)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert acc.name == "cpu"
    assert acc.communication_backend_name() == "gloo"
    assert acc.device_name(0) == "cpu" and acc.device(0) == torch.device("cpu")
    assert torch.bfloat16 in acc.supported_dtypes()


def test_env_var_selects_and_rejects(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    accelerator._current = None
    assert get_accelerator().name == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "tpu9000")
    accelerator._current = None
    with pytest.raises(AcceleratorError, match="'tpu9000' is not a known accelerator; choose one of cuda, xpu, mps, cpu"):
        get_accelerator()


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(AcceleratorError, match="no cuda device is available"):
        set_accelerator("cuda")
    with pytest.raises(AcceleratorError, match="no cuda device"):
        set_accelerator("rocm")  # ROCm is served by torch.cuda


def test_cpu_streams_events_and_memory():
    acc = set_accelerator("cpu")
    stream = acc.Stream()
    with acc.stream(stream):
        start, end = acc.Event(enable_timing=True), acc.Event(enable_timing=True)
        start.record()
        torch.ones(1000).sum()
        end.record()
    acc.synchronize()
    assert end.query() and start.elapsed_time(end) >= 0.0
    before = acc.memory_allocated()
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB touched
    big += 1
    assert acc.memory_allocated() > before + 32 * 1024 * 1024
    assert acc.max_memory_allocated() >= acc.memory_allocated() - 4096
    assert acc.total_memory() > 0
    assert acc.pin_memory(big) is big  # CPU: nothing to pin


# Allowed to name CUDA, and why: ds_kernels builds and loads the CUDA ops themselves; the launcher picks the
# device-visibility variable (CUDA_VISIBLE_DEVICES, ZE_AFFINITY_MASK) for worker processes without importing torch.
_CUDA_ALLOWED = ("ds_kernels", "launcher")


def test_no_module_outside_the_accelerator_names_cuda():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "packages"
    offenders = []
    for path in root.glob("*/src/**/*.py"):
        if "accelerator" in path.parts or any(part in path.parts for part in _CUDA_ALLOWED):
            continue
        text = path.read_text()
        if "torch.cuda" in text or '"cuda"' in text or "'cuda'" in text:
            offenders.append(str(path.relative_to(root)))
    assert not offenders, f"these modules talk to CUDA directly instead of get_accelerator(): {offenders}"
