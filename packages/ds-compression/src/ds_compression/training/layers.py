"""`CompressedLinear`: an nn.Linear that applies the compression techniques the scheduler turns on.

It keeps the original `weight`/`bias` Parameter objects, so an optimizer built before or after
`init_compression` trains the same tensors. Masks multiply the weight in forward (gradients flow only
to kept entries); weight quantization is fake quantization with a straight-through gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from ..prune.masks import magnitude_mask, topk_keep_mask
from ..quant.functional import fake_quantize_flat_groups, quantize_activation_tensorwise

__all__ = ["CompressedLinear"]


class _TopK(torch.autograd.Function):
    """Binary mask of the top-k scores forward, identity backward (so the scores learn)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, dense_ratio: float) -> torch.Tensor:  # type: ignore[override]
        keep = max(1, int(round(dense_ratio * scores.numel())))
        return topk_keep_mask(scores, keep).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class CompressedLinear(nn.Linear):
    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # technique settings (None = not configured for this module) and on/off state
        self.weight_quant: dict | None = None
        self.weight_bits: int | None = None
        self.act_quant: dict | None = None
        self.act_quant_enabled = False
        self.sparse: dict | None = None
        self.row: dict | None = None
        self.head: dict | None = None

    # -- configuration (init_compression) -------------------------------------------------------
    def configure_scores(self, kind: str) -> None:
        """Learnable scores for 'topk' masks; created at init so the optimizer can see them."""
        shape = {"sparse": self.weight.shape, "row": (self.out_features,), "head": (self.head["num_heads"],)}[kind]
        init = self._importance(kind)
        param = nn.Parameter(init.reshape(shape).clone().to(self.weight.dtype))
        self.register_parameter(f"{kind}_mask_scores", param)

    def _importance(self, kind: str) -> torch.Tensor:
        w = self.weight.detach().float()
        if kind == "sparse":
            return w.abs()
        if kind == "row":
            return w.abs().sum(dim=1)
        n = self.head["num_heads"]
        return w.abs().reshape(self.out_features, n, -1).sum(dim=(0, 2))

    # -- enabling (scheduler) -------------------------------------------------------------------
    def enable_mask(self, kind: str) -> None:
        spec = getattr(self, kind)
        if spec["method"] == "l1":
            imp = self._importance(kind)
            keep = max(1, int(round(spec["dense_ratio"] * imp.numel())))
            mask = magnitude_mask(self.weight, spec["dense_ratio"]) if kind == "sparse" else topk_keep_mask(imp, keep)
            self.register_buffer(f"{kind}_mask", mask.to(self.weight.dtype))
        spec["enabled"] = True

    def current_mask(self, kind: str) -> torch.Tensor | None:
        spec = getattr(self, kind)
        if spec is None or not spec.get("enabled"):
            return None
        if spec["method"] == "l1":
            return getattr(self, f"{kind}_mask")
        return _TopK.apply(getattr(self, f"{kind}_mask_scores"), spec["dense_ratio"])

    # -- forward --------------------------------------------------------------------------------
    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.weight, self.bias
        m = self.current_mask("sparse")
        if m is not None:
            w = w * m
        m = self.current_mask("row")
        if m is not None:
            w = w * m[:, None]
            b = None if b is None else b * m
        m = self.current_mask("head")
        if m is not None:
            w = w * m.repeat_interleave(self.in_features // m.numel())[None, :]
        if self.weight_bits is not None:
            q = self.weight_quant
            w = fake_quantize_flat_groups(w, self.weight_bits, q["groups"], q["symmetric"])
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant_enabled:
            x = quantize_activation_tensorwise(x, self.act_quant["bits"], self.act_quant["symmetric"])
        w, b = self.effective_weight()
        return nn.functional.linear(x, w, b)

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}"]
        if self.weight_bits is not None:
            parts.append(f"w{self.weight_bits}bit")
        for kind in ("sparse", "row", "head"):
            spec = getattr(self, kind)
            if spec is not None:
                parts.append(f"{kind}={spec['dense_ratio']}{'' if spec.get('enabled') else '(pending)'}")
        return ", ".join(parts)
