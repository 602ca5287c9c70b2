"""ONNX export in QDQ form, checked with onnxruntime.

Each `QuantLinear` becomes: its integer weight as an int8 initializer -> DequantizeLinear (one scale
per group, as a per-axis scale over the [out * groups, group_size] view) -> Reshape -> MatMul; with
activation quantization the input first goes through QuantizeLinear/DequantizeLinear with one
dynamic scale per token (per-axis over the flattened tokens). Asymmetric weights add their float
zero offset after DequantizeLinear (ds_kernels stores a float offset, not an integer zero point).
Exported with torch's TorchScript-based exporter (no onnxscript needed); opset 17.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model_utils import CompressionInputError
from ..quant.modules import QuantLinear

__all__ = ["export_onnx", "run_onnx", "OPSET"]

OPSET = 17
_INT8 = 3  # onnx.TensorProto.INT8


class _QDQLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qint, scale, zero, bias, out_f, in_f, act_bits, has_zero, has_bias):  # type: ignore[override]
        if act_bits:
            qmax = (1 << (act_bits - 1)) - 1
            x2 = x.reshape(-1, in_f).float()
            s = (x2.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-8)
            x = (torch.round(x2 / s).clamp(-128, 127) * s).reshape(x.shape).to(x.dtype)
        w = qint.float() * scale[:, None]
        if has_zero:
            w = w + zero
        w = w.reshape(out_f, in_f).to(x.dtype)
        y = x @ w.t()
        return y + bias if has_bias else y

    @staticmethod
    def symbolic(g, x, qint, scale, zero, bias, out_f, in_f, act_bits, has_zero, has_bias):  # type: ignore[override]
        x_shape = g.op("Shape", x)
        x2 = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([-1, in_f], dtype=torch.int64)))
        if act_bits:
            qmax = float((1 << (act_bits - 1)) - 1)
            absmax = g.op("ReduceMax", g.op("Abs", x2), axes_i=[1], keepdims_i=0)
            s = g.op("Max", g.op("Div", absmax, g.op("Constant", value_t=torch.tensor(qmax))),
                     g.op("Constant", value_t=torch.tensor(1e-8)))
            zp = g.op("Cast", g.op("Mul", s, g.op("Constant", value_t=torch.tensor(0.0))), to_i=_INT8)
            q = g.op("QuantizeLinear", x2, s, zp, axis_i=0)
            x2 = g.op("DequantizeLinear", q, s, zp, axis_i=0)
        w = g.op("DequantizeLinear", qint, scale, axis_i=0)
        if has_zero:
            w = g.op("Add", w, zero)
        w = g.op("Reshape", w, g.op("Constant", value_t=torch.tensor([out_f, in_f], dtype=torch.int64)))
        y = g.op("MatMul", x2, g.op("Transpose", w, perm_i=[1, 0]))
        if has_bias:
            y = g.op("Add", y, bias)
        lead = g.op("Slice", x_shape, g.op("Constant", value_t=torch.tensor([0])),
                    g.op("Constant", value_t=torch.tensor([-1])))
        out_shape = g.op("Concat", lead, g.op("Constant", value_t=torch.tensor([out_f])), axis_i=0)
        return g.op("Reshape", y, out_shape)


def _qdq_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    qint, scale, zero = self._onnx_qint, self._onnx_scale, self._onnx_zero
    bias = self.bias if self.bias is not None else torch.zeros(0)
    return _QDQLinear.apply(x, qint, scale, zero, bias, self.out_features, self.in_features,
                            self.act_bits or 0, self.zeros is not None, self.bias is not None)


@contextlib.contextmanager
def _qdq_mode(model: nn.Module) -> Iterator[None]:
    patched = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            if mod.act_bits is not None and not mod.act_symmetric:
                raise CompressionInputError(f"{name}: asymmetric activation quantization has no QDQ export")
            scale, zero = mod.weight_scales()
            groups = scale.shape[1]
            qint = mod.int_weight().reshape(mod.out_features * groups, -1).contiguous()
            zero_col = torch.zeros(0) if zero is None else zero.reshape(-1, 1).contiguous()
            # buffers (not plain tensors) so the exporter stores them as named initializers
            mod.register_buffer("_onnx_qint", qint, persistent=False)
            mod.register_buffer("_onnx_scale", scale.reshape(-1).contiguous(), persistent=False)
            mod.register_buffer("_onnx_zero", zero_col, persistent=False)
            mod.forward = _qdq_forward.__get__(mod)
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward
            for name in ("_onnx_qint", "_onnx_scale", "_onnx_zero"):
                delattr(mod, name)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: dict[str, torch.Tensor],
    output_names: list[str] | None = None,
    opset: int = OPSET,
) -> Path:
    """Export `model` (called as model(**example_inputs)) to `path`; dynamic batch and sequence axes."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(example_inputs)
    requested = output_names
    output_names = output_names or ["output"]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names if example_inputs[n].dim() >= 2}
    dynamic.update({n: {0: "batch", 1: "sequence"} for n in output_names})

    class _Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> Any:
            res = self.inner(**dict(zip(names, args)))
            if isinstance(res, torch.Tensor):
                return res
            if requested and hasattr(res, "keys"):
                return tuple(res[k] for k in requested)
            return res[0]

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    was_training = model.training
    model.eval()
    try:
        with _qdq_mode(model), torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter's deprecation notice and transformers' tracer notes are not actionable here
            warnings.simplefilter("ignore")
            torch.onnx.export(_Wrapper(model), tuple(example_inputs[n] for n in names), str(tmp),
                              input_names=names, output_names=output_names, dynamic_axes=dynamic,
                              opset_version=opset, dynamo=False, do_constant_folding=False)
        _constants_to_initializers(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
        model.train(was_training)
    return out


def _constants_to_initializers(path: Path, min_elements: int = 64) -> None:
    """The tracer folds the quantized weights into Constant nodes; store large ones as initializers
    instead (same values, same names) so tools see them as the model's weights."""
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'ds-compression[onnx]'") from None
    model = onnx.load(str(path))
    keep = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and len(node.output) == 1 and _numel(value.dims) >= min_elements:
            value.name = node.output[0]
            model.graph.initializer.append(value)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, str(path))


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def run_onnx(path: str | os.PathLike, inputs: dict[str, torch.Tensor]) -> list[Any]:
    """Outputs of the ONNX model at `path` under onnxruntime (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("onnxruntime is needed to run the exported model: pip install onnxruntime") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})
