import pytest
import torch
from ds_compression.model_utils import count_parameters
from ds_compression.testing import make_bert
from ds_compression.training import (
    CompressedLinear,
    CompressionScheduler,
    bits_at,
    init_compression,
    redundancy_clean,
)
from ds_core.config import ConfigError


def test_bit_schedule_halves_speed_after_each_drop():
    got = [bits_at(s, offset=5, start_bits=8, target_bits=5, period=10) for s in (0, 4, 5, 14, 15, 34, 35, 74, 75, 999)]
    assert got == [None, None, 8, 8, 7, 7, 6, 6, 5, 5]


def _ids():
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


def _train(model, scheduler, steps, lr=1e-3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        loss = model(_ids()).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step(step)


DS_CONFIG = {
    "train_batch_size": 8,
    "compression_training": {
        "weight_quantization": {
            "shared_parameters": {"enabled": True, "schedule_offset": 2, "quantize_groups": 4,
                                  "quantization_type": "symmetric"},
            "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 4, "quantization_period": 1},
                                         "modules": ["attention.self", "intermediate"]}},
        },
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "schedule_offset": 2},
            "different_groups": {"aq1": {"params": {"bits": 8}, "modules": ["intermediate"]}},
        },
        "sparse_pruning": {
            "shared_parameters": {"enabled": True, "schedule_offset": 3, "method": "l1"},
            "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.self.query"]}},
        },
        "row_pruning": {
            "shared_parameters": {"enabled": True, "schedule_offset": 3, "method": "l1"},
            "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"],
                                         "related_modules": [["output.dense"]]}},
        },
        "head_pruning": {
            "shared_parameters": {"enabled": True, "schedule_offset": 3, "method": "topk", "num_heads": 4},
            "different_groups": {"hp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.output.dense"],
                                         "related_modules": [["self.query", "self.key", "self.value"]]}},
        },
    },
}


def test_schedule_turns_techniques_on_and_clean_gives_smaller_equivalent_model():
    model = make_bert()
    params_before = count_parameters(model)
    init_compression(model, DS_CONFIG)
    sched = CompressionScheduler(model, DS_CONFIG)
    q0 = model.encoder.layer[0].attention.self.query
    assert isinstance(q0, CompressedLinear) and q0.weight_bits is None
    changed = sched.step(2)
    assert "weight_quantization" in changed and "sparse_pruning" not in changed
    assert q0.weight_bits == 8 and model.encoder.layer[0].intermediate.dense.act_quant_enabled
    _train(model, sched, steps=6)
    assert q0.weight_bits == 6  # step 6: 8 -> 7 after 1 step, -> 6 after 2 more
    assert q0.sparse.get("enabled") and model.encoder.layer[0].attention.output.dense.head["enabled"]
    scores = model.encoder.layer[0].attention.output.dense.head_mask_scores
    assert scores.grad is not None  # topk scores learn through the straight-through mask
    model.eval()
    before = model(_ids()).last_hidden_state
    redundancy_clean(model, DS_CONFIG)
    after = model(_ids()).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    layer = model.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 64 and layer.output.dense.in_features == 64
    assert layer.attention.self.query.out_features == 32 and layer.attention.self.num_attention_heads == 2
    assert count_parameters(model) < params_before
    w = layer.attention.self.query.weight
    assert (w == 0).float().mean() >= 0.45  # the sparse mask is now in the weight


def test_layer_reduction_keeps_chosen_teacher_layers():
    teacher = make_bert(layers=4)
    cfg = {"layer_reduction": {"enabled": True, "keep_number_layer": 2, "module_name_prefix": "encoder.layer",
                               "teacher_layer": [1, 3], "other_module_name": ["embeddings"]}}
    student = make_bert(layers=2, seed=5)
    init_compression(student, cfg, teacher_model=teacher)
    torch.testing.assert_close(student.encoder.layer[1].output.dense.weight, teacher.encoder.layer[3].output.dense.weight)
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    alone = make_bert(layers=4)
    init_compression(alone, cfg)
    assert len(alone.encoder.layer) == 2 and alone.config.num_hidden_layers == 2
    torch.testing.assert_close(alone.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight)


@pytest.mark.parametrize("section,msg", [
    ({"weight_quantization": {"shared_parameters": {"enabled": True, "rounding": "stochastic"}}}, "rounding"),
    ({"channel_pruning": {"shared_parameters": {"enabled": True}}}, "channel_pruning"),
    ({"sparse_pruning": {"shared_parametres": {}}}, "did you mean 'shared_parameters'"),
    ({"head_pruning": {"shared_parameters": {"enabled": True}}}, "num_heads"),
    ({"weight_quantization": {"shared_parameters": {"enabled": True}, "different_groups": {
        "g": {"params": {"start_bits": 4, "target_bits": 8}}}}}, "must not exceed"),
    ({"sparse_pruning": {"shared_parameters": {"enabled": True}, "different_groups": {
        "g": {"params": {"dense_ratio": 0.5}, "modules": ["no_such_module"]}}}}, "match no nn.Linear"),
])
def test_bad_compression_config_is_rejected_by_name(section, msg):
    with pytest.raises(ConfigError, match=msg):
        init_compression(make_bert(), {"compression_training": section})


def test_scheduler_requires_init_compression():
    with pytest.raises(ValueError, match="init_compression"):
        CompressionScheduler(make_bert(), DS_CONFIG)
