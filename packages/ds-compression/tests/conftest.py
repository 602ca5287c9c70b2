import pytest
import torch
from ds_compression.testing import make_bert, make_llama


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def bert():
    return make_bert()


@pytest.fixture
def token_ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
