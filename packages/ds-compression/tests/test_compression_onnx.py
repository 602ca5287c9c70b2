import pytest
import torch
from ds_compression import quantize
from ds_compression.export.onnx_export import export_onnx, run_onnx
from ds_compression.testing import make_bert

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("kw", [
    dict(weight_bits=8, act_bits=8),
    dict(weight_bits=4, group_size=16, symmetric=False),
    dict(method="xtc", weight_bits=2),
], ids=["w8a8", "w4-asym-g16", "ternary"])
def test_qdq_onnx_matches_torch_in_onnxruntime_with_new_shapes(tmp_path, kw):
    model = make_bert()
    model.config._attn_implementation = "eager"
    q = quantize(model, show_progress=False, exclude=(), **kw)
    gen = torch.Generator().manual_seed(0)
    ex = {"input_ids": torch.randint(0, 100, (2, 10), generator=gen), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    path = export_onnx(q, tmp_path / "m.onnx", ex, output_names=["last_hidden_state"])
    new = {"input_ids": torch.randint(0, 100, (3, 7), generator=gen), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    got = torch.from_numpy(run_onnx(path, new)[0])
    torch.testing.assert_close(got, q(**new).last_hidden_state, atol=1e-4, rtol=1e-4)

    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") >= 12  # every quantized linear dequantizes an integer initializer
    if kw.get("act_bits"):
        assert ops.count("QuantizeLinear") >= 12
    int8_inits = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_inits) >= 12
    float_weight_elems = sum(
        int(torch.tensor(i.dims).prod()) for i in graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and 64 in i.dims and i.dims[0] != 100
        and i.dims[0] != 64 * 0 + 512
    )
    assert float_weight_elems < 64 * 128  # the big matrices are not stored in float


def test_export_leaves_model_usable(tmp_path):
    model = make_bert()
    model.config._attn_implementation = "eager"
    q = quantize(model, weight_bits=8, show_progress=False)
    ids = torch.randint(0, 100, (1, 5))
    before = q(input_ids=ids).last_hidden_state
    export_onnx(q, tmp_path / "m.onnx", {"input_ids": ids})
    torch.testing.assert_close(q(input_ids=ids).last_hidden_state, before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
