"""Hugging Face `transformers.Trainer` on the ds_train engine: change one import.

    from ds_train.hf import Trainer          # instead of: from transformers import Trainer
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=ds, ds_config="ds_config.json")
    trainer.train()

The ds config may hold DeepSpeed's ``"auto"`` values; they are filled from the TrainingArguments
as the transformers DeepSpeed integration does (batch sizes, accumulation, clipping, precision,
AdamW hyperparameters, the schedule). Without a config, ZeRO stage 2 is used. The training loop
is the engine's (forward, backward, step per micro batch); logging goes through the Trainer's
callbacks (`log_history`, `on_log`), checkpoints are the engine's (`output_dir/checkpoint-<step>`),
and `save_model()` writes a `save_pretrained` directory.

TrainingArguments that this loop does not implement are rejected by name when they are not at
their defaults (evaluation during training, torch.compile, FSDP, ...).
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
from ds_core import comm
from ds_core.config import is_auto, load_config_source

try:
    import transformers
    from transformers.trainer_utils import TrainOutput
except ImportError as exc:  # pragma: no cover - the 'hf' extra
    raise ImportError("ds_train.hf needs transformers: pip install 'ds-train[hf]'") from exc

import ds_train
from ds_train.zero.hf_zero3 import zero3_for_transformers

__all__ = ["Trainer", "fill_auto_from_training_args", "zero3_for_transformers"]

# TrainingArguments the engine loop does not implement: name -> value that means "off"
_UNSUPPORTED_ARGS = {
    "eval_strategy": ("no", "IntervalStrategy.NO"),
    "torch_compile": (False,),
    "fsdp": ("", [], None),
    "deepspeed": (None,),
    "gradient_checkpointing": (False,),
    "include_num_input_tokens_seen": (False, "no"),
    "neftune_noise_alpha": (None,),
    "optim_target_modules": (None,),
}
_SCHEDULES = {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR", "constant": "WarmupLR",
              "constant_with_warmup": "WarmupLR"}


def _check_args(args: transformers.TrainingArguments) -> None:
    bad = []
    for name, off in _UNSUPPORTED_ARGS.items():
        value = getattr(args, name, None)
        if value not in off and str(value) not in {str(v) for v in off}:
            bad.append(f"{name}={value!r}")
    schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if schedule not in _SCHEDULES:
        bad.append(f"lr_scheduler_type={schedule!r} (supported: {', '.join(_SCHEDULES)})")
    optim = str(getattr(args.optim, "value", args.optim))
    if not optim.startswith("adamw"):
        bad.append(f"optim={optim!r} (AdamW only; put another optimizer in ds_config)")
    if bad:
        raise ValueError("ds_train.hf.Trainer does not support these TrainingArguments: " + ", ".join(bad))


def _global_mean(total: float, count: int) -> float:
    """Mean of the micro-batch losses of all data-parallel ranks (transformers logs the gathered mean too)."""
    if comm.is_initialized() and comm.get_world_size() > 1:
        both = torch.tensor([total, float(count)], dtype=torch.float64)
        comm.all_reduce(both)
        total, count = float(both[0]), int(both[1])
    return total / max(count, 1)


def _fill(section: dict, key: str, value: Any) -> None:
    if key not in section or is_auto(section[key]):
        section[key] = value


def fill_auto_from_training_args(config: dict, args: transformers.TrainingArguments, total_steps: int) -> dict:
    """A copy of `config` with missing or ``"auto"`` values taken from `args` (HF's integration rules)."""
    cfg = copy.deepcopy(config)
    world = max(1, args.world_size)
    _fill(cfg, "train_micro_batch_size_per_gpu", args.per_device_train_batch_size)
    _fill(cfg, "gradient_accumulation_steps", args.gradient_accumulation_steps)
    _fill(cfg, "train_batch_size", args.per_device_train_batch_size * args.gradient_accumulation_steps * world)
    _fill(cfg, "gradient_clipping", args.max_grad_norm)
    _fill(cfg, "steps_per_print", 0)
    for name, flag in (("bf16", args.bf16), ("fp16", args.fp16)):
        section = cfg.setdefault(name, {})
        _fill(section, "enabled", bool(flag))
    if "optimizer" not in cfg:
        cfg["optimizer"] = {"type": "AdamW", "params": {}}
    params = cfg["optimizer"].setdefault("params", {})
    for key, value in (("lr", args.learning_rate), ("betas", [args.adam_beta1, args.adam_beta2]),
                       ("eps", args.adam_epsilon), ("weight_decay", args.weight_decay)):
        _fill(params, key, value)
    warmup = args.get_warmup_steps(total_steps)
    schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if "scheduler" not in cfg:
        cfg["scheduler"] = {"type": _SCHEDULES[schedule], "params": {}}
    sched = cfg["scheduler"].setdefault("params", {})
    kind = cfg["scheduler"]["type"]
    if kind in ("WarmupLR", "WarmupDecayLR"):
        _fill(sched, "warmup_min_lr", 0.0)
        _fill(sched, "warmup_max_lr", args.learning_rate)
    if kind in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        _fill(sched, "warmup_num_steps", max(1, warmup))
        _fill(sched, "warmup_type", "linear")
    if kind in ("WarmupDecayLR", "WarmupCosineLR"):
        _fill(sched, "total_num_steps", total_steps)
    cfg.setdefault("zero_optimization", {"stage": 2})
    return cfg


class Trainer(transformers.Trainer):
    """`transformers.Trainer` whose training loop runs on a ds_train engine (ZeRO, mixed precision)."""

    def __init__(self, *args: Any, ds_config: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_args(self.args)
        if self.optimizer is not None or self.lr_scheduler is not None:
            raise ValueError("ds_train.hf.Trainer builds its optimizer from ds_config / TrainingArguments; "
                             "do not pass optimizers=")
        self.ds_config = load_config_source(ds_config) if ds_config is not None else {}
        self.engine: ds_train.DeepSpeedEngine | None = None

    def _train_dataset(self) -> Any:
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("Trainer.train() needs train_dataset")
        remove = getattr(self, "_remove_unused_columns", None)
        if remove is not None and getattr(dataset, "column_names", None) is not None:
            dataset = remove(dataset, description="training")
        return dataset

    def _to_device(self, batch: Any) -> Any:
        device = self.engine.device
        if isinstance(batch, dict):
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def train(self, resume_from_checkpoint: str | None = None, trial: Any = None,
              ignore_keys_for_eval: Any = None, **kwargs: Any) -> TrainOutput:
        if trial is not None or kwargs:
            raise ValueError("ds_train.hf.Trainer.train(): hyperparameter search arguments are not supported")
        args = self.args
        dataset = self._train_dataset()
        micro = args.per_device_train_batch_size
        batches_per_epoch = math.ceil(len(dataset) / (micro * max(1, args.world_size)))
        steps_per_epoch = max(1, batches_per_epoch // args.gradient_accumulation_steps)
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        config = fill_auto_from_training_args(self.ds_config, args, total)
        config.setdefault("seed", args.seed)
        engine, _, loader, _ = ds_train.initialize(model=self.model, config=config, training_data=dataset,
                                                   collate_fn=self.data_collator)
        self.engine = self.model_wrapped = engine
        if resume_from_checkpoint:
            engine.load_checkpoint(resume_from_checkpoint)
        self.state.max_steps = total
        # only rank 0 prints progress and logs (the callbacks read these, transformers' train() sets them)
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.state.global_step = engine.global_steps
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        running, count, logged_total, logged_count = 0.0, 0, 0.0, 0
        while engine.global_steps < total:
            for batch in loader:
                loss = self.compute_loss(engine, self._to_device(batch))
                engine.backward(loss)
                engine.step()
                running += float(loss.detach())
                count += 1
                if engine.micro_steps % engine.gradient_accumulation_steps():
                    continue
                self.state.global_step = engine.global_steps
                self.state.epoch = engine.global_steps / steps_per_epoch
                if args.logging_steps and engine.global_steps % args.logging_steps == 0:
                    logged_total += running
                    logged_count += count
                    self.log({"loss": _global_mean(running, count), "learning_rate": engine.get_lr()[0],
                              "grad_norm": engine.get_global_grad_norm() or 0.0})
                    running, count = 0.0, 0
                if args.save_steps and args.save_strategy != "no" and engine.global_steps % int(args.save_steps) == 0:
                    engine.save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{engine.global_steps}"))
                if engine.global_steps >= total:
                    break
        logged_total += running
        logged_count += count
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        train_loss = _global_mean(logged_total, logged_count)
        return TrainOutput(engine.global_steps, train_loss, {"train_loss": train_loss})

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`save_pretrained` of the trained module (rank 0), weights in the training dtype.

        At ZeRO stage 3 every rank must call it: a rank holds only pieces of the parameters, so the
        whole weights are gathered (a collective) and rank 0 writes them.
        """
        output_dir = output_dir or self.args.output_dir
        state = None
        if self.engine is not None and self.engine.zero_optimization_stage() == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        if self.args.process_index == 0:
            module = self.engine.module if self.engine is not None else self.model
            module.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
