"""The main job end to end, small: tools/train_gpt.py on 2 gloo ranks with ZeRO-2 (bf16), stop half way,
resume from the checkpoint, and the result equals an uninterrupted run; then ds-zero-to-fp32 and a
plain-transformers evaluation of the consolidated weights agree with the engine's own evaluation."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "train_gpt.py"
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--micro-batch", "4",
        "--log-every", "2", "--eval-batches", "4", "--steps", "8"]


def _script():
    spec = importlib.util.spec_from_file_location("train_gpt_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(argv: list[str]) -> int:
    return _script().main(argv)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    text = (REPO / "data/corpus/python_docs_train.txt").read_text(encoding="utf-8")[:60_000]
    valid = (REPO / "data/corpus/python_docs_valid.txt").read_text(encoding="utf-8")[:20_000]
    (root / "train.txt").write_text(text, encoding="utf-8")
    (root / "valid.txt").write_text(valid, encoding="utf-8")
    return str(root / "train.txt"), str(root / "valid.txt")


def test_train_save_resume_convert(tmp_path: Path, corpus: tuple[str, str]) -> None:
    from ds_core.testing import run_distributed

    files = ["--train-file", corpus[0], "--valid-file", corpus[1]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed(_train, 2, [*TINY, *files, "--save-dir", str(straight),
                                "--summary-json", str(tmp_path / "straight.json")])
    run_distributed(_train, 2, [*TINY, *files, "--save-dir", str(resumed), "--stop-at", "4"])
    assert (resumed / "latest").read_text() == "global_step4"
    run_distributed(_train, 2, [*TINY, *files, "--save-dir", str(resumed), "--resume",
                                "--summary-json", str(tmp_path / "resumed.json")])
    want = json.loads((tmp_path / "straight.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert got["steps"] == want["steps"] == 8
    assert got["valid_loss"] == pytest.approx(want["valid_loss"], abs=1e-6)

    from ds_train.checkpoint.zero_to_fp32 import main as zero_to_fp32

    out = resumed / "fp32.safetensors"
    assert zero_to_fp32([str(resumed), str(out)]) == 0
    assert _train([*TINY, *files, "--save-dir", str(resumed), "--check-fp32", str(out),
                   "--summary-json", str(tmp_path / "fp32.json")]) == 0
    fp32_loss = json.loads((tmp_path / "fp32.json").read_text())["fp32_valid_loss"]
    # the engine evaluated in bf16; the consolidated fp32 master weights give nearly the same loss
    assert fp32_loss == pytest.approx(got["valid_loss"], abs=0.05)
