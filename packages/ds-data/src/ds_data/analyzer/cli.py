"""``ds-data-analyze``: build metric indexes for a token dataset or a text file.

    ds-data-analyze --tokens tokens.npy --offsets offsets.npy --metrics seqlen vocab_rarity --out idx/
    ds-data-analyze --text corpus.txt --tokenizer tok/ --split paragraph --out idx/ --num-workers 2

``--text`` tokenizes the file (one sample per line or per blank-line separated paragraph) with a
Hugging Face tokenizer and first writes it as ``<out>/dataset/{tokens,offsets}.npy``. Rerunning the
same command resumes an interrupted analysis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_data.analyzer.analyzer import DataAnalyzer
from ds_data.analyzer.datasets import FlatTokenDataset, write_flat_token_dataset
from ds_data.analyzer.metrics import BUILTIN_METRICS


def _text_dataset(args) -> FlatTokenDataset:
    out = Path(args.out) / "dataset"
    if (out / "tokens.npy").is_file() and (out / "offsets.npy").is_file():
        return FlatTokenDataset(out / "tokens.npy", out / "offsets.npy")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SystemExit(
            "--text needs a Hugging Face tokenizer: pip install 'ds-data[text]' (transformers)"
        ) from None
    text = Path(args.text).read_text(encoding="utf-8")
    pieces = text.split("\n\n") if args.split == "paragraph" else text.splitlines()
    pieces = [p for p in pieces if p.strip()]
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tok(pieces, add_special_tokens=False)["input_ids"]
    return write_flat_token_dataset([i for i in ids if i], out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ds-data-analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="flat token ids (.npy); needs --offsets")
    src.add_argument("--text", help="a UTF-8 text file; needs --tokenizer")
    p.add_argument("--offsets", help="sample offsets (.npy, N+1 entries, first 0, last = number of tokens)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer directory (with --text)")
    p.add_argument("--split", choices=["line", "paragraph"], default="paragraph")
    p.add_argument("--metrics", nargs="+", default=["seqlen"], choices=sorted(BUILTIN_METRICS))
    p.add_argument("--out", required=True, help="output directory: one index directory per metric")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--memory-limit-mb", type=float, default=None, help="cap of the reduce step's working set")
    args = p.parse_args(argv)
    if args.tokens and not args.offsets:
        p.error("--tokens needs --offsets")
    if args.text and not args.tokenizer:
        p.error("--text needs --tokenizer")
    dataset = FlatTokenDataset(args.tokens, args.offsets) if args.tokens else _text_dataset(args)
    limit = None if args.memory_limit_mb is None else int(args.memory_limit_mb * 2**20)
    analyzer = DataAnalyzer(
        dataset,
        args.metrics,
        args.out,
        num_workers=args.num_workers,
        chunk_size=args.chunk_size,
        memory_limit_bytes=limit,
    )
    for name, index in analyzer.run().items():
        print(
            f"{name}: {index.num_samples} samples, {index.index_to_metric.shape[0]} distinct values -> {index.path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
