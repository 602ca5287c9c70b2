"""Test helpers for ZeRO-3: awkward tiny models and an engine run that can stop, save and resume.

Lives in the package (not in tests/) because pytest's importlib mode keeps test files from importing
each other and `run_distributed` workers must import the functions they run.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ds_train.testing import VOCAB, engine_config, lm_loss, make_batch, make_model

__all__ = ["ReuseModel", "MoEModel", "hf_model", "MODEL_FNS", "stage3_config", "train_engine"]


class ReuseModel(torch.nn.Module):
    """One block applied twice per forward, blocks called in an order unlike registration, a tied head."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 20) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.late = torch.nn.Linear(hidden, hidden)  # registered first, called last
        self.shared = torch.nn.Linear(hidden, hidden)  # called twice
        self.norm = torch.nn.LayerNorm(hidden)
        self.scale = torch.nn.Parameter(torch.ones(hidden))  # used directly by this module's forward

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + torch.tanh(self.shared(h))
        h = h + torch.tanh(self.shared(h)) * self.scale
        h = self.late(self.norm(h))
        return F.linear(h, self.embed.weight)  # the embedding read again, outside its module


class _Expert(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(hidden, 2 * hidden)
        self.down = torch.nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class MoEBlock(torch.nn.Module):
    """Top-1 routing over experts that are plain modules; an expert no token picks is not called."""

    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(_Expert(hidden) for _ in range(experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.size(-1))
        probs = torch.softmax(self.router(flat), dim=-1)
        weight, choice = probs.max(dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero().flatten()
            if idx.numel():  # data dependent: ranks call different experts
                out = out.index_add(0, idx, expert(flat[idx]) * weight[idx, None])
        return out.view_as(h)


class MoEModel(torch.nn.Module):
    def __init__(self, vocab: int = VOCAB, hidden: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.moe = MoEBlock(hidden, experts)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.moe(h))


class _HFLogits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def hf_model(kind: str) -> torch.nn.Module:
    """A tiny transformers model (random weights, built from a config, no download)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, num_hidden_layers=2)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_head=2, n_layer=2, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                                      bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=24, num_key_value_heads=1, max_position_embeddings=16,
                                       tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=12, num_key_value_heads=1, max_position_embeddings=16,
                                         num_local_experts=4, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.config.use_cache = False
    return _HFLogits(model)


def _seeded(fn: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return fn()
    return build


MODEL_FNS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny": make_model,
    "reuse": _seeded(ReuseModel),
    "moe": _seeded(MoEModel),
    "gpt2": _seeded(lambda: hf_model("gpt2")),
    "llama": _seeded(lambda: hf_model("llama")),
    "mixtral": _seeded(lambda: hf_model("mixtral")),
}


def stage3_config(dtype: str, world: int, *, offload: str = "none", swap: str | None = None,
                  grad_accum: int = 1, **zero: Any) -> dict[str, Any]:
    """engine_config at stage 3 with small buckets, nothing persistent, optional cpu/nvme offload."""
    cfg = engine_config(3, dtype, grad_accum, world)
    zc = cfg["zero_optimization"]
    zc.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 200,
               "stage3_max_live_parameters": 5000, "stage3_max_reuse_distance": 0})
    if offload == "cpu":
        zc["offload_param"] = {"device": "cpu"}
        zc["offload_optimizer"] = {"device": "cpu"}
    elif offload == "nvme":
        zc["offload_param"] = {"device": "nvme", "nvme_path": swap, "buffer_size": 4096}
        zc["offload_optimizer"] = {"device": "nvme", "nvme_path": swap, "buffer_count": 2}
        zc["sub_group_size"] = 1000
        cfg["aio"] = {"block_size": 65536, "queue_depth": 4}
    zc.update(zero)
    return cfg


def train_engine(cfg: dict[str, Any], model_name: str, start: int, stop: int, *, load_dir: str | None = None,
                 save_dir: str | None = None, leaf_classes: tuple = (), fail_after: Callable | None = None,
                 ) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """Train steps [start, stop) with the engine on this rank's batches; returns losses and fp32 weights."""
    from ds_core import comm

    import ds_train
    from ds_train.zero import set_z3_leaf_modules

    rank = comm.get_rank() if comm.is_initialized() else 0
    model = MODEL_FNS[model_name]()
    if leaf_classes:
        set_z3_leaf_modules(model, list(leaf_classes))
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    try:
        if load_dir is not None:
            engine.load_checkpoint(load_dir)
        accum = engine.gradient_accumulation_steps()
        losses = []
        for step in range(start, stop):
            step_losses = []
            for micro in range(accum):
                ids = make_batch(step, micro, rank)
                loss = lm_loss(engine(ids), ids)
                engine.backward(loss)
                engine.step()
                step_losses.append(float(loss.detach()))
            losses.append(step_losses)
            if fail_after is not None:
                fail_after(step, engine)
        if save_dir is not None:
            engine.save_checkpoint(save_dir, tag=f"step{stop}")
        return losses, engine.get_fp32_state_dict()
    finally:
        engine.destroy()


def swap_dir(base: str, name: str) -> str:
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    return path


class WideMLP(torch.nn.Module):
    """`depth` square layers of `width`: big enough for memory measurements, trivial to run."""

    def __init__(self, width: int = 1024, depth: int = 24) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def peak_rss_reset() -> None:
    """Reset this process's peak resident set (Linux /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peaks of this process's private (RssAnon) and file-backed (RssFile) resident memory while the
    block runs, sampled every millisecond on a thread (Linux)."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _status_bytes("RssAnon:")
        self.file_start = self.file_peak = _status_bytes("RssFile:")
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, _status_bytes("RssAnon:"))
        self.file_peak = max(self.file_peak, _status_bytes("RssFile:"))

    def _run(self) -> None:
        while not self._stop:
            self._sample()
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self._sample()

    @property
    def gained(self) -> int:
        """Private memory gained at the peak."""
        return self.peak - self.start
