"""The engine hook `DataEfficiency`: config validation, per-step behaviour, state round trip."""

import numpy as np
import pytest
import torch
from ds_core.config import ConfigError
from ds_data.analyzer import build_index
from ds_data.integration import DataEfficiency
from ds_data.random_ltd import is_random_ltd_layer


def full_config(**legacy_over):
    legacy = {
        "enabled": True,
        "curriculum_type": "seqlen",
        "min_difficulty": 4,
        "max_difficulty": 16,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 4},
    }
    legacy.update(legacy_over)
    return {
        "train_batch_size": 4,
        "curriculum_learning": legacy,
        "data_efficiency": {
            "enabled": True,
            "seed": 5,
            "data_routing": {
                "enabled": True,
                "random_ltd": {
                    "enabled": True,
                    "total_layer_num": 4,
                    "random_ltd_layer_num": 2,
                    "random_ltd_layer_id": [1, 2],
                    "random_ltd_schedule": {
                        "min_value": 4,
                        "max_value": 16,
                        "schedule_type": "fixed_linear",
                        "schedule_config": {"require_steps": 6, "seq_per_step": 4},
                    },
                    "layer_token_lr_schedule": {"enabled": True, "warmup_layer_tokens": 0},
                },
            },
        },
    }


def test_step_hooks_drive_seqlen_random_ltd_and_lr(tiny_model):
    model = tiny_model("gpt2")
    de = DataEfficiency.from_ds_config(full_config(), model=model, train_iters=10)
    assert de.enabled and de.drives_lr and not de.needs_data_sampler
    assert is_random_ltd_layer(model.transformer.h[1]) and not is_random_ltd_layer(model.transformer.h[0])
    ids = torch.randint(1, 97, (4, 16))
    seen = []
    for step in range(8):
        de.on_step_begin(step)
        batch = de.transform_batch({"input_ids": ids, "labels": ids})
        assert batch["input_ids"].shape[1] == de.current_seqlen
        model.train()
        model(**batch).loss.backward()
        seen.append((de.current_seqlen, de.random_ltd_keep, de.lr_scale()))
    assert [s[0] for s in seen] == [4, 8, 8, 12, 12, 16, 16, 16]  # difficulty of step + 1
    assert [s[1] for s in seen] == [4, 4, 8, 8, 12, 12, 16, 16]
    lrs = [s[2] for s in seen]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1.0 and lrs[-1] > 0.0


def test_state_dict_round_trip_resumes_schedules_and_token_choice(tiny_model):
    cfg = full_config()
    a = DataEfficiency.from_ds_config(cfg, train_iters=10)
    for step in range(3):
        a.on_step_begin(step)
    b = DataEfficiency.from_ds_config(cfg, train_iters=10)
    b.load_state_dict(a.state_dict())
    assert (b.current_seqlen, b.random_ltd_keep, b.lr_scale()) == (
        a.current_seqlen,
        a.random_ltd_keep,
        a.lr_scale(),
    )
    assert b.ltd_state.keep == a.ltd_state.keep
    plain = DataEfficiency.from_ds_config({"train_batch_size": 4})
    assert not plain.enabled
    with pytest.raises(ValueError, match="does not enable"):
        plain.load_state_dict(a.state_dict())


def test_config_errors_name_the_full_path():
    cfg = full_config()
    cfg["data_efficiency"]["data_routing"]["random_ltd"]["random_ltd_schedule"]["schedule_config"][
        "seq_per_stp"
    ] = 1
    with pytest.raises(
        ConfigError,
        match=r"data_efficiency\.data_routing\.random_ltd\.random_ltd_schedule\.schedule_config\.seq_per_stp",
    ):
        DataEfficiency.from_ds_config(cfg)
    cfg = full_config(schedule_type="fixed_root")
    with pytest.raises(ConfigError, match="root_degree"):
        DataEfficiency.from_ds_config(cfg)
    cfg = full_config()
    cfg["data_efficiency"]["data_sampling"] = {"dynamic_batching": {"enabled": True}}
    with pytest.raises(ConfigError, match="dynamic_batching' is not supported"):
        DataEfficiency.from_ds_config(cfg)
    cfg = full_config()
    del cfg["train_batch_size"]
    with pytest.raises(ConfigError, match="global batch size"):
        DataEfficiency.from_ds_config(cfg, train_iters=10)
    with pytest.raises(ConfigError, match="total_layer_tokens"):
        DataEfficiency.from_ds_config(full_config())


def test_legacy_and_new_seqlen_curricula_conflict():
    cfg = full_config()
    cfg["data_efficiency"]["data_sampling"] = {
        "enabled": True,
        "curriculum_learning": {
            "enabled": True,
            "curriculum_metrics": {
                "seqlen_truncate": {
                    "min_difficulty": 4,
                    "max_difficulty": 16,
                    "schedule_type": "fixed_linear",
                    "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 4},
                }
            },
        },
    }
    with pytest.raises(ConfigError, match="keep one"):
        DataEfficiency.from_ds_config(cfg, train_iters=10)
    del cfg["curriculum_learning"]
    de = DataEfficiency.from_ds_config(cfg, train_iters=10)
    de.on_step_begin(0)
    assert de.transform_batch(torch.zeros(2, 16)).shape == (2, 4)


def test_seqlen_reshape_metric_folds_batches():
    cfg = {
        "data_efficiency": {
            "enabled": True,
            "data_sampling": {
                "enabled": True,
                "curriculum_learning": {
                    "enabled": True,
                    "curriculum_metrics": {
                        "seqlen_reshape": {
                            "min_difficulty": 4,
                            "max_difficulty": 16,
                            "schedule_type": "fixed_discrete",
                            "schedule_config": {"difficulty": [4, 16], "max_step": [3]},
                        }
                    },
                },
            },
        }
    }
    de = DataEfficiency.from_ds_config(cfg)
    de.on_step_begin(0)
    assert de.transform_batch(torch.zeros(2, 16)).shape == (8, 4)
    de.on_step_begin(5)
    assert de.transform_batch(torch.zeros(2, 16)).shape == (2, 16)


def test_metric_curriculum_builds_a_checkpointable_sampler(tmp_path):
    build_index(np.arange(100) % 10, tmp_path / "difficulty", "difficulty")
    cfg = {
        "data_efficiency": {
            "enabled": True,
            "seed": 1,
            "data_sampling": {
                "enabled": True,
                "curriculum_learning": {
                    "enabled": True,
                    "curriculum_metrics": {
                        "difficulty": {
                            "index_to_sample_path": str(tmp_path / "difficulty"),
                            "min_difficulty": 2,
                            "max_difficulty": 9,
                            "schedule_type": "fixed_linear",
                            "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 1},
                        }
                    },
                },
            },
        }
    }
    de = DataEfficiency.from_ds_config(cfg)
    assert de.needs_data_sampler
    loader = torch.utils.data.DataLoader(list(range(100)), batch_sampler=de.build_data_sampler(4, 0, 2, 1))
    it = iter(loader)
    first = [next(it).tolist() for _ in range(5)]
    assert all(v % 10 <= 3 for b in first[:2] for v in b)
    state = de.state_dict()
    rest = [next(it).tolist() for _ in range(5)]
    de2 = DataEfficiency.from_ds_config(cfg)
    de2.build_data_sampler(4, 0, 2, 1)
    de2.load_state_dict(state)
    it2 = iter(torch.utils.data.DataLoader(list(range(100)), batch_sampler=de2.sampler))
    assert [next(it2).tolist() for _ in range(5)] == rest


def test_data_loader_uses_num_workers_and_parent_switch_off_disables(tmp_path):
    build_index(np.arange(40) % 4, tmp_path / "d", "d")
    metric = {
        "index_to_sample_path": str(tmp_path / "d"),
        "min_difficulty": 3,
        "max_difficulty": 3,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": 2, "difficulty_step": 1},
    }
    cfg = {
        "data_efficiency": {
            "enabled": True,
            "data_sampling": {
                "enabled": True,
                "num_workers": 1,
                "num_epochs": 1,
                "curriculum_learning": {"enabled": True, "curriculum_metrics": {"d": metric}},
            },
        }
    }
    loader = DataEfficiency.from_ds_config(cfg).build_data_loader(list(range(40)), micro_batch_size=5)
    assert loader.num_workers == 1
    assert sorted(torch.cat(list(loader)).tolist()) == list(range(40))  # one epoch, everything once
    cfg["data_efficiency"]["data_sampling"]["enabled"] = False
    de = DataEfficiency.from_ds_config(cfg)  # a one-time warning names the switch
    assert not de.enabled and not de.needs_data_sampler


def test_deepspeed_docs_style_config_validates():
    """The shape of DeepSpeed's documented data_efficiency example is accepted unchanged."""
    from ds_data.config import parse_data_efficiency

    cfg = parse_data_efficiency(
        {
            "enabled": True,
            "seed": 1234,
            "data_routing": {
                "enabled": True,
                "random_ltd": {
                    "enabled": True,
                    "total_layer_num": 24,
                    "random_ltd_layer_num": 22,
                    "random_ltd_layer_id": list(range(1, 23)),
                    "model_mask_name": "attention_mask",
                    "model_type": "decoder",
                    "hidden_state_order": "seq_batch_dim",
                    "random_ltd_schedule": {
                        "min_value": 128,
                        "max_value": 2048,
                        "schedule_type": "fixed_linear",
                        "schedule_config": {"require_steps": 200000, "seq_per_step": 16},
                    },
                },
            },
            "data_sampling": {
                "enabled": True,
                "num_epochs": 1,
                "num_workers": 0,
                "curriculum_learning": {
                    "enabled": True,
                    "data_cluster_path": "/tmp/clusters",
                    "curriculum_metrics": {
                        "vocabularyrarity": {
                            "index_to_sample_path": "/data/vocab_rarity_index_to_sample_percentile_merged",
                            "index_to_metric_path": "/data/vocab_rarity_index_to_metric",
                            "difficulty_type": "percentile",
                            "clustering_type": "schedule_based",
                            "min_difficulty": 1,
                            "max_difficulty": 100,
                            "schedule_type": "fixed_root",
                            "schedule_config": {
                                "total_curriculum_step": 110000,
                                "difficulty_step": 1,
                                "root_degree": 2,
                            },
                        },
                        "seqlen_truncate": {
                            "min_difficulty": 80,
                            "max_difficulty": 2048,
                            "schedule_type": "fixed_linear",
                            "schedule_config": {"total_curriculum_step": 110000, "difficulty_step": 8},
                        },
                    },
                },
            },
        }
    )
    assert cfg.random_ltd_enabled and cfg.curriculum_enabled
    assert cfg.data_routing.random_ltd.random_ltd_schedule.schedule_config.seq_per_step == 16
