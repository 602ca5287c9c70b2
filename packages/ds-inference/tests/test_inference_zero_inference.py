"""ZeRO-Inference: layer weights on NVMe (files) stream in one layer at a time; outputs unchanged."""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch
from ds_core.accelerator import host_rss_bytes
from ds_inference import init_inference
from ds_inference.testing import random_prompts, reference_greedy
from transformers import AutoModelForCausalLM, LlamaConfig


def _model(seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so RSS reflects live memory
    except OSError:
        pass


def test_nvme_streaming_generates_the_same_tokens_with_less_resident_memory(tmp_path):
    prompt = random_prompts([11])[0]
    expected = reference_greedy(_model(), prompt, 6)
    _trim()
    model = _model()
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    _trim()
    rss_full = host_rss_bytes()
    engine = init_inference(
        model, zero={"offload_param": {"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 2}}
    )
    _trim()
    streamer = engine.streamer
    assert len(list(tmp_path.glob("layer_*.bin"))) == 8
    assert streamer.resident_bytes() < layer_bytes / 3  # 2 of 8 layers' worth of buffers
    ids = torch.tensor([prompt])
    out = engine.generate(
        ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert out == expected
    _trim()
    # the full layers are gone from memory: the process shrank by well over half their size
    assert host_rss_bytes() < rss_full - layer_bytes / 2
    assert streamer.fetches >= 8 * 6  # every layer read back from its file for every token step
    assert all(
        p.numel() == 0 for p in model.model.layers.parameters()
    )  # nothing left resident between passes


def test_zero_inference_config_errors_name_the_key(tmp_path):
    with pytest.raises(Exception, match="nvme_path"):
        init_inference(_model(), zero={"offload_param": {"device": "nvme"}})
    with pytest.raises(Exception, match="device='cpu' with a CPU compute device"):
        init_inference(_model(), zero={"offload_param": {"device": "cpu"}})
    with pytest.raises(Exception, match="cannot be combined"):
        init_inference(
            _model(),
            quant={"enabled": True},
            zero={"offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}},
        )


def _has_accelerator() -> bool:
    from ds_core.accelerator import get_accelerator

    return get_accelerator().device().type != "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not _has_accelerator(), reason="needs an accelerator: host->device layer streaming")
def test_cpu_offload_streams_layers_to_the_accelerator():
    from ds_core.accelerator import get_accelerator

    prompt = random_prompts([11])[0]
    expected = reference_greedy(_model(), prompt, 6)
    engine = init_inference(_model(), zero={"offload_param": {"device": "cpu", "pin_memory": True}})
    device = get_accelerator().device()
    ids = torch.tensor([prompt], device=device)
    out = engine.generate(
        ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert out == expected
    layer_bytes = sum(p.numel() * p.element_size() for p in engine.module.model.layers.parameters())
    assert get_accelerator().memory_allocated() < layer_bytes  # only the streamed buffers live on the device
