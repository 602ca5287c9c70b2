"""Small, deterministic pieces for testing the engine: a tiny model, batches, a single-process reference.

The reference trains the same model on the same global batches with plain torch (fp32 master
weights, gradients summed in fp32, global-norm clipping, AdamW), which is what every ZeRO stage on
any number of ranks must reproduce up to floating-point reduction order.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TinyLM", "make_batch", "lm_loss", "reference_train", "engine_config", "train_steps"]

VOCAB = 37
HIDDEN = 24


class TinyLM(torch.nn.Module):
    """Embedding -> MLP -> LayerNorm -> tied output head; odd sizes so shards need padding."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.up = torch.nn.Linear(hidden, 3 * hidden + 1)
        self.down = torch.nn.Linear(3 * hidden + 1, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2
        self.register_buffer("scale", torch.ones(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(F.gelu(self.up(h))) * self.scale
        return self.head(self.norm(h))


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM()
    torch.nn.init.normal_(model.embed.weight, std=0.2)  # GPT-like scale: initial loss near ln(vocab)
    return model


def make_batch(step: int, micro: int, rank: int, batch: int = 3, seq: int = 8) -> torch.Tensor:
    """Token ids for (optimizer step, micro step, data-parallel rank), the same in every process."""
    g = torch.Generator().manual_seed(100_003 * step + 1_009 * micro + rank)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))


def train_steps(engine: Any, steps: int, rank: int) -> list[float]:
    """`steps` optimizer steps of one micro batch each on this rank's batches; the losses."""
    losses = []
    for step in range(steps):
        ids = make_batch(step, 0, rank)
        loss = lm_loss(engine(ids), ids)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def engine_config(stage: int, dtype: str, grad_accum: int, world: int, clip: float = 0.5,
                  lr: float = 1e-2, bucket: int = 300, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "steps_per_print": 0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "betas": [0.9, 0.95]}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    cfg.update(extra)
    return cfg


def reference_train(steps: int, grad_accum: int, world: int, dtype: torch.dtype, clip: float = 0.5,
                    lr: float = 1e-2, model_fn: Callable[[], torch.nn.Module] = make_model,
                    batch_fn: Callable[[int, int, int], torch.Tensor] = make_batch,
                    start_state: dict[str, torch.Tensor] | None = None,
                    loss_scale: float = 1.0) -> tuple[list[list[float]], dict]:
    """Losses[step][micro * world + rank] and the final fp32 master weights by parameter name."""
    model = model_fn().to(dtype)
    master = {n: p.detach().float().clone().requires_grad_(False) for n, p in model.named_parameters()}
    if start_state is not None:
        for n in master:
            master[n].copy_(start_state[n])
    params = dict(model.named_parameters())
    names = list(master)
    opt = torch.optim.AdamW([master[n] for n in names], lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        with torch.no_grad():
            for n in names:
                params[n].copy_(master[n])
        grads = {n: torch.zeros_like(master[n]) for n in names}
        step_losses = []
        for micro in range(grad_accum):
            for rank in range(world):
                ids = batch_fn(step, micro, rank)
                model.zero_grad(set_to_none=True)
                loss = lm_loss(model(ids), ids)
                (loss.float() * loss_scale).backward()  # fp16: scaled like the engine, or small grads vanish
                step_losses.append(float(loss.detach()))
                for n in names:
                    if params[n].grad is not None:
                        grads[n] += params[n].grad.float() / (world * grad_accum * loss_scale)
        total = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()
        coef = clip / (total + 1e-6) if clip > 0 else 1.0
        for n in names:
            master[n].grad = grads[n] * min(coef, 1.0)
        opt.step()
        losses.append(step_losses)
    return losses, {n: t.detach().clone() for n, t in master.items()}
