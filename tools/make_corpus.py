"""Rebuild data/corpus/ from the reStructuredText sources of the Python 3.11 documentation.

The docs ship in Debian's python3.11-doc package (`apt-get install python3.11-doc`); their text is
under the PSF licence (see data/corpus/README.md). Light clean-up only: directives and markup roles
are simplified so the text reads as prose; code examples stay, as they are part of the docs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path("/usr/share/doc/python3.11/html/_sources")
OUT = Path(__file__).resolve().parents[1] / "data" / "corpus"
# Held-out files for validation and perplexity: whole sections never used for training or calibration.
VALID_DIRS = ("howto",)
TRAIN_DIRS = ("tutorial", "library", "reference", "faq", "using", "extending")
LIMIT_TRAIN = 4_500_000


def clean(text: str) -> str:
    text = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)  # :func:`x` -> x
    text = re.sub(r"^\.\. [a-z-]+::.*$", "", text, flags=re.M)  # directives
    text = re.sub(r"^\s*:[a-z-]+:.*$", "", text, flags=re.M)  # directive options
    text = re.sub(r"^[=\-~^\"'*#+]{3,}\s*$", "", text, flags=re.M)  # heading underlines
    text = text.replace("``", "")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n\n"


def build(dirs: tuple[str, ...], limit: int | None) -> str:
    parts, size = [], 0
    for d in dirs:
        for path in sorted((SRC / d).rglob("*.rst.txt")):
            chunk = clean(path.read_text(encoding="utf-8", errors="replace"))
            parts.append(chunk)
            size += len(chunk)
            if limit and size >= limit:
                return "".join(parts)
    return "".join(parts)


def main() -> int:
    if not SRC.is_dir():
        print(f"{SRC} not found: apt-get install python3.11-doc", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "python_docs_train.txt").write_text(build(TRAIN_DIRS, LIMIT_TRAIN), encoding="utf-8")
    (OUT / "python_docs_valid.txt").write_text(build(VALID_DIRS, None), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
