import pytest
import torch
from ds_compression import CompressionInputError, QuantLinear, quantize
from ds_compression.testing import assert_unchanged, make_llama, state_snapshot
from ds_compression.xtc import xtc_compress


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_xtc_distillation_beats_plain_ternary_rounding():
    teacher = make_llama(layers=2)
    snap = state_snapshot(teacher)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 12), generator=gen) for _ in range(4)]
    student = xtc_compress(teacher, batches, weight_bits=2, steps=30, lr=1e-3, show_progress=False)
    assert_unchanged(teacher, snap)
    rtn = quantize(teacher, method="xtc", weight_bits=2, show_progress=False)
    x = torch.randint(0, 256, (2, 12), generator=gen)
    ref = teacher(x).logits
    assert _rel(student(x).logits, ref) < _rel(rtn(x).logits, ref)
    layers = [m for m in student.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.weight_bits == 2 for m in layers)
    w = layers[0].dequantized_weight()
    assert all(len(torch.unique(row.abs())) <= 2 for row in w)  # ternary: {0, alpha} per row
    e = student.ds_compression_history[-1]
    assert e["kd_loss_last"] < e["kd_loss_first"]


def test_xtc_layer_reduction_keeps_requested_layers():
    teacher = make_llama(layers=4)
    batches = [torch.randint(0, 256, (2, 8))]
    student = xtc_compress(teacher, batches, weight_bits=1, keep_layers=[0, 3], steps=2, show_progress=False)
    assert len(student.model.layers) == 2 and student.config.num_hidden_layers == 2
    assert student(torch.randint(0, 256, (1, 8))).logits.shape == (1, 8, 256)


@pytest.mark.parametrize("kw,msg", [
    (dict(weight_bits=4), "bits must be one of"),
    (dict(weight_bits=2, keep_layers=[5]), "keep_layers"),
])
def test_xtc_rejects_bad_arguments(kw, msg):
    with pytest.raises((CompressionInputError, ValueError), match=msg):
        xtc_compress(make_llama(), [torch.randint(0, 256, (1, 4))], show_progress=False, **kw)
