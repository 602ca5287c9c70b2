"""Repo-wide pytest hooks: GPU-marked tests are skipped where no GPU is present."""
import pytest


def pytest_collection_modifyitems(config, items):
    from ds_core.accelerator import get_accelerator

    if get_accelerator().name != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
