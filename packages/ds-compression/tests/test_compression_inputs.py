from pathlib import Path

import pytest
import torch
from ds_compression import CompressionInputError, load_model_dir
from ds_compression.calibration import calibration_batches
from ds_compression.progress import format_table
from ds_compression.testing import make_llama


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_load_model_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(CompressionInputError, match="not found"):
        load_model_dir(tmp_path / "missing")
    with pytest.raises(CompressionInputError, match="no config.json"):
        load_model_dir(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(CompressionInputError, match="GGUF files"):
        load_model_dir(tmp_path)
    only_cfg = tmp_path / "cfg"
    only_cfg.mkdir()
    make_llama().config.save_pretrained(only_cfg)
    with pytest.raises(CompressionInputError, match="no weights"):
        load_model_dir(only_cfg)


def test_load_model_dir_round_trip(tmp_path):
    m = make_llama()
    m.save_pretrained(tmp_path)
    loaded = load_model_dir(tmp_path)
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, m(ids).logits)


def test_calibration_batches_shape_and_errors(tmp_path: Path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    batches = calibration_batches(text, _CharTokenizer(), num_samples=6, seq_len=32, batch_size=4)
    assert [b.shape for b in batches] == [(4, 32), (2, 32)]
    with pytest.raises(CompressionInputError, match="not found"):
        calibration_batches(tmp_path / "nope.txt", _CharTokenizer())
    short = tmp_path / "s.txt"
    short.write_text("hi")
    with pytest.raises(CompressionInputError, match="fewer than"):
        calibration_batches(short, _CharTokenizer(), seq_len=32)


def test_summary_table_aligns_columns():
    out = format_table([{"method": "zeroquant", "ratio": 3.9999}, {"method": "xtc", "ratio": 12.0}], ["method", "ratio"])
    lines = out.splitlines()
    assert lines[0].startswith("method") and set(lines[1]) <= {"-", " "}
    assert "4" in lines[2] and "12" in lines[3]
