"""XTC ("Extreme Compression for Pre-trained Transformers Made Simple and Efficient", Wu et al. 2022):
layer reduction (keep a subset of the teacher's layers), 1-bit or 2-bit (ternary) weights trained
with a straight-through estimator, and knowledge distillation from the full-precision teacher on its
final and (mapped) intermediate hidden states, plus logits for language models.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .history import record_method
from .model_utils import CompressionInputError, find_block_list, iter_linears, model_bytes, set_module
from .progress import progress_bar
from .quant.qat import FakeQuantLinear
from .training.api import init_compression
from .zeroquant import validate_quantization

__all__ = ["xtc_compress"]


def _hidden_and_logits(model: nn.Module, batch: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    out = model(input_ids=batch, output_hidden_states=True)
    return out.hidden_states, getattr(out, "logits", None)


def xtc_compress(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    weight_bits: int = 2,
    keep_layers: Sequence[int] | None = None,
    steps: int = 200,
    lr: float = 5e-5,
    modules: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
    temperature: float = 1.0,
    show_progress: bool = True,
) -> nn.Module:
    """A 1/2-bit (optionally layer-reduced) copy of `model`, distilled from `model` on `batches`."""
    exclude = tuple(exclude)
    validate_quantization(model, weight_bits, None, None, modules, exclude, allowed_bits=(1, 2))
    if not batches:
        raise CompressionInputError("XTC distillation needs training batches (token id tensors)")
    prefix, blocks = find_block_list(model)
    if keep_layers is not None:
        bad = [i for i in keep_layers if not 0 <= i < len(blocks)]
        if bad or not keep_layers:
            raise CompressionInputError(f"keep_layers {list(keep_layers)} invalid for {len(blocks)} layers")
    start = time.perf_counter()
    teacher = model.eval()
    student = copy.deepcopy(model)
    layer_map = list(range(len(blocks)))
    if keep_layers is not None:
        init_compression(student, {"layer_reduction": {"enabled": True, "module_name_prefix": prefix,
                                                       "teacher_layer": list(keep_layers)}})
        layer_map = list(keep_layers)
    chosen = {n for n, _ in validate_quantization(student, weight_bits, None, None, modules, exclude, (1, 2))}
    for name, lin in list(iter_linears(student)):
        if name in chosen:
            set_module(student, name, FakeQuantLinear(lin, weight_bits, None))
    student.train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * (1 - s / steps))
    bar = progress_bar(total=steps, desc=f"XTC {weight_bits}-bit KD", disable=not show_progress)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            t_hidden, t_logits = _hidden_and_logits(teacher, batch)
        s_hidden, s_logits = _hidden_and_logits(student, batch)
        # hidden_states[0] is the embedding output; student layer i maps to teacher layer layer_map[i]
        loss = nn.functional.mse_loss(s_hidden[0], t_hidden[0])
        for i, t_idx in enumerate(layer_map):
            loss = loss + nn.functional.mse_loss(s_hidden[i + 1], t_hidden[t_idx + 1])
        if s_logits is not None:
            t_prob = nn.functional.log_softmax(t_logits / temperature, dim=-1)
            s_prob = nn.functional.log_softmax(s_logits / temperature, dim=-1)
            loss = loss + nn.functional.kl_div(s_prob, t_prob, log_target=True, reduction="batchmean") / batch.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    bar.close()
    student.eval()
    for name, mod in list(student.named_modules()):
        if isinstance(mod, FakeQuantLinear):
            set_module(student, name, mod.to_quant_linear())
    for p in student.parameters():
        p.requires_grad_(False)
    record_method(student, {
        "method": "xtc", "weight_bits": weight_bits, "keep_layers": layer_map, "steps": steps, "lr": lr,
        "kd_loss_first": round(losses[0], 6), "kd_loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 6),
        "seconds": round(time.perf_counter() - start, 2), "bytes_before": model_bytes(model),
        "bytes_after": model_bytes(student),
    })
    return student
