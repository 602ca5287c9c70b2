"""Shared fixtures of the ds-inference tests."""

from __future__ import annotations

import os

import pytest

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "data", "tokenizer")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
