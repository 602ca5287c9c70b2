"""ds-data-analyze: text file -> flat token dataset -> indexes; flat token files directly."""

from pathlib import Path

import numpy as np
from ds_data.analyzer import FlatTokenDataset, MetricIndex, write_flat_token_dataset
from ds_data.analyzer.cli import main


def test_cli_on_flat_tokens_matches_lengths(tmp_path, capsys):
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 50, size=int(n)) for n in rng.integers(1, 20, size=300)]
    ds = write_flat_token_dataset(samples, tmp_path / "ds")
    assert len(ds) == 300 and np.array_equal(ds[7], samples[7]) and np.array_equal(ds[-1], samples[-1])
    rc = main(
        [
            "--tokens",
            ds.tokens_path,
            "--offsets",
            ds.offsets_path,
            "--metrics",
            "seqlen",
            "vocab_rarity",
            "--out",
            str(tmp_path / "idx"),
            "--num-workers",
            "2",
            "--chunk-size",
            "50",
            "--memory-limit-mb",
            "0.002",
        ]
    )
    assert rc == 0 and "seqlen: 300 samples" in capsys.readouterr().out
    assert np.array_equal(
        MetricIndex(tmp_path / "idx" / "seqlen").sample_to_metric, [len(s) for s in samples]
    )


def test_cli_tokenizes_text_paragraphs(tmp_path):
    text = "def f():\n    return 1\n\nThe os module.\n\n\nA third paragraph with more words in it.\n"
    (tmp_path / "t.txt").write_text(text)
    tok = str(Path(__file__).resolve().parents[3] / "data" / "tokenizer")
    assert main(["--text", str(tmp_path / "t.txt"), "--tokenizer", tok, "--out", str(tmp_path / "o")]) == 0
    ds = FlatTokenDataset(
        tmp_path / "o" / "dataset" / "tokens.npy", tmp_path / "o" / "dataset" / "offsets.npy"
    )
    lengths = MetricIndex(tmp_path / "o" / "seqlen").sample_to_metric
    assert len(ds) == 3 and lengths[2] > lengths[1]
