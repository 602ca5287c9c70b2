"""Stage-3 / ZeRO-Infinity config keys: DeepSpeed's names accepted, impossible combinations refused by name."""
from __future__ import annotations

import pytest
from ds_core.config import ConfigError
from ds_train.config import load_train_config
from ds_train.zero.stage3 import Stage3Options


def _zero(**zero) -> dict:
    return {"train_batch_size": 2, "zero_optimization": zero}


def test_stage3_keys_reach_the_strategy_options() -> None:
    cfg = load_train_config(_zero(
        stage=3, stage3_prefetch_bucket_size=5e7, stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
        stage3_param_persistence_threshold=1e5, stage3_gather_16bit_weights_on_model_save=True, sub_group_size=1e9,
        offload_param={"device": "nvme", "nvme_path": "/tmp", "buffer_size": 1e8, "buffer_count": 3},
        offload_optimizer={"device": "nvme", "nvme_path": "/tmp", "buffer_count": 4},
    ) | {"aio": {"block_size": 262144, "queue_depth": 16, "thread_count": 2}})
    opts = Stage3Options.from_config(cfg.zero_optimization, cfg.aio)
    assert (opts.prefetch_bucket_size, opts.param_persistence_threshold) == (50_000_000, 100_000)
    assert (opts.offload_param, opts.offload_optimizer, opts.param_nvme_path) == ("nvme", "nvme", "/tmp")
    assert (opts.aio_block_size, opts.aio_queue_depth, opts.aio_threads) == (262144, 16, 2)
    assert (opts.param_buffer_size, opts.param_buffer_count) == (100_000_000, 3)
    assert opts.gather_16bit_weights_on_model_save


def test_deprecated_fp16_gather_key_is_renamed() -> None:
    with pytest.warns(Warning, match="stage3_gather_16bit_weights_on_model_save"):
        cfg = load_train_config(_zero(stage=3, stage3_gather_fp16_weights_on_model_save=True))
    assert cfg.zero_optimization.stage3_gather_16bit_weights_on_model_save


@pytest.mark.parametrize("zero,match", [
    ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs stage 3"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, "needs stage 3"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, "nvme_path"),
    ({"stage": 3, "offload_optimizer": {"device": "nvme"}}, "nvme_path"),
    ({"stage": 3, "stage3_use_all_reduce_for_fetch_params": True}, "stage3_use_all_reduce_for_fetch_params"),
])
def test_impossible_offload_configs_are_refused_by_name(zero: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(_zero(**zero))


def test_aio_gds_and_unaligned_blocks_are_refused() -> None:
    with pytest.raises(ConfigError, match="use_gds"):
        load_train_config({"train_batch_size": 2, "aio": {"use_gds": True}})
    with pytest.raises(ConfigError, match="multiple of 4096"):
        load_train_config({"train_batch_size": 2, "aio": {"block_size": 5000}})


def test_nvme_optimizer_refuses_a_non_adam_optimizer(tmp_path) -> None:
    import ds_train
    from ds_train.testing import make_model

    cfg = {"train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)},
                                 "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    with pytest.raises((ValueError, ConfigError), match="Adam"):
        ds_train.initialize(model=make_model(), config=cfg, dist_init_required=False)


def test_param_nvme_without_optimizer_nvme_is_refused(tmp_path) -> None:
    import ds_train
    from ds_train.testing import make_model

    cfg = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    with pytest.raises(ValueError, match="offload_optimizer.device='nvme'"):
        ds_train.initialize(model=make_model(), config=cfg, dist_init_required=False)


@pytest.mark.parametrize("setting", [None, True, False])
def test_stage3_collective_switches_are_honoured_on_one_process(setting) -> None:
    """reduce_scatter / allgather_partitions reach the reducer and the gatherer (unset: the backend's choice;
    native without a process group, sends/broadcasts if an earlier test left a gloo one here)."""
    import ds_train
    from ds_core import comm
    from ds_train.testing import make_model

    zero = {"stage": 3} if setting is None else {"stage": 3, "reduce_scatter": setting,
                                                  "allgather_partitions": setting}
    cfg = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "zero_optimization": zero}
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg, dist_init_required=False)
    s = engine.strategy
    p2p = comm.prefers_point_to_point()
    if setting is None:
        reduce, gather = ("sends" if p2p else "reduce_scatter"), not p2p
    else:
        reduce, gather = ("reduce_scatter" if setting else "all_reduce"), setting
    assert (s.reduce, s.reducer.reduce, s.allgather_partitions, s.gatherer.allgather) == (reduce, reduce, gather, gather)
    engine.destroy()


@pytest.mark.parametrize("config,match", [
    (_zero(stage=3, offload_param={"device": "nvme", "nvme_path": "/tmp", "max_in_cpu": 5}),
     r"offload_param.max_in_cpu=5 is not supported yet"),
    (_zero(stage=3) | {"aio": {"single_submit": True}}, r"aio.single_submit=True is not supported yet"),
    (_zero(stage=3) | {"aio": {"overlap_events": False}}, r"aio.overlap_events=False is not supported yet"),
])
def test_keys_we_would_ignore_are_refused_unless_at_their_default(config, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(config)
    # the same keys at DeepSpeed's defaults (as example configs write them) are accepted
    load_train_config(_zero(stage=3, offload_param={"device": "nvme", "nvme_path": "/tmp", "max_in_cpu": 1e9,
                                                    "buffer_count": 5}) | {"aio": {"single_submit": False}})
