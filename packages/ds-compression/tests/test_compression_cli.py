import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from ds_compression import load_compressed
from ds_compression.cli import main
from ds_compression.testing import make_llama

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO / "data" / "tokenizer"
CORPUS = REPO / "data" / "corpus" / "python_docs_train.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_llama(vocab=8192).save_pretrained(d)
    if TOKENIZER.is_dir():
        for f in TOKENIZER.iterdir():
            shutil.copy(f, d / f.name)
    return d


def _snapshot(d: Path) -> dict:
    return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir()}


def test_quantize_command_writes_loadable_dir_and_summary(model_dir, tmp_path, capsys):
    before = _snapshot(model_dir)
    out = tmp_path / "w4"
    rc = main(["quantize", str(model_dir), "--weight-bits", "4", "--group-size", "32", "--act-bits", "8",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "ratio" in table and "W4A8 g32" in table
    assert _snapshot(model_dir) == before
    m = load_compressed(out)
    ids = torch.randint(0, 8192, (1, 8))
    assert m(ids).logits.shape == (1, 8, 8192)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


@pytest.mark.skipif(not CORPUS.exists(), reason="bundled corpus missing")
def test_quantize_with_lkd_uses_calibration_text(model_dir, tmp_path):
    out = tmp_path / "lkd"
    rc = main(["quantize", str(model_dir), "--weight-bits", "4", "--group-size", "32", "--lkd", "--calib", str(CORPUS),
               "--calib-samples", "4", "--seq-len", "32", "--lkd-steps", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    hist = json.loads((out / "compression_config.json").read_text())["history"]
    assert hist[-1]["lkd"] is True and len(hist[-1]["lkd_block_mse_after"]) == 2


@pytest.mark.skipif(not CORPUS.exists(), reason="bundled corpus missing")
def test_quantize_smoothquant_and_clip_flags_reach_the_saved_scheme(model_dir, tmp_path):
    out = tmp_path / "sq"
    rc = main(["quantize", str(model_dir), "--weight-bits", "8", "--act-bits", "8", "--smooth-alpha", "0.5",
               "--act-asymmetric", "--clip-search", "--calib", str(CORPUS), "--calib-samples", "4", "--seq-len", "32",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    entry = json.loads((out / "compression_config.json").read_text())["history"][-1]
    assert entry["smooth_alpha"] == 0.5 and entry["smoothed_layers"] == 14
    assert entry["clip_search"] is True and entry["act_symmetric"] is False
    m = load_compressed(out)
    assert not m.model.layers[0].self_attn.q_proj.act_symmetric


@pytest.mark.parametrize("argv", [
    ["prune", "{m}", "--method", "2:4"],
    ["prune", "{m}", "--method", "head", "--ratio", "0.5"],
    ["lowrank", "{m}", "--rank", "8"],
])
def test_prune_and_lowrank_commands(model_dir, tmp_path, argv, capsys):
    out = tmp_path / "o"
    assert main([a.format(m=model_dir) for a in argv] + ["--out", str(out), "--no-progress"]) == 0
    assert "size after (MB)" in capsys.readouterr().out
    assert load_compressed(out) is not None


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "{empty}", "--weight-bits", "8"], "no config.json"),
    (["quantize", "{m}", "--weight-bits", "3"], "bits must be one of"),
    (["quantize", "{m}", "--weight-bits", "4", "--group-size", "48"], "does not divide"),
    (["quantize", "{m}", "--weight-bits", "8", "--modules", "model.embed_tokens"], "Embedding"),
    (["prune", "{m}", "--method", "sparse"], "needs --ratio"),
    (["quantize", "{m}", "--weight-bits", "8", "--lkd"], "calibration"),
    (["quantize", "{m}", "--weight-bits", "8", "--act-bits", "8", "--smooth-alpha", "0.5"], "--smooth-alpha needs"),
    (["quantize", "{m}", "--weight-bits", "4", "--group-size", "32", "--lkd-learn-ranges"], "--lkd-learn-ranges needs"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, argv, msg):
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _snapshot(model_dir)
    rc = main([a.format(m=model_dir, empty=empty) for a in argv] + ["--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(errors) == 1 and msg in errors[0]
    assert _snapshot(model_dir) == before
    assert not (tmp_path / "o").exists()


def test_export_onnx_command_checks_onnxruntime(model_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--weight-bits", "8", "--act-bits", "8", "--out", str(out),
                 "--no-progress"]) == 0
    onnx_path = tmp_path / "m.onnx"
    assert main(["export-onnx", str(out), "--out", str(onnx_path), "--seq-len", "8"]) == 0
    assert "ok" in capsys.readouterr().out and onnx_path.exists()
    assert main(["info", str(out)]) == 0
    assert "QuantLinear" in capsys.readouterr().out
    os.remove(onnx_path)
