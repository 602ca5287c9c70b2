"""ZeRO-3 with frozen parameters (requires_grad=False) handed over whole: partitioned, trained like torch.

The frozen weights (TinyLM's `up` layer) must stay 1/N per rank between uses, never change, have no
optimizer state, and the trainable ones must follow a single-process torch reference that optimizes
only the trainable parameters (fp32 tolerances of test_train_stage3.py: losses 1e-5, weights 2e-5).
Checkpoints keep frozen weights in the module file (as DeepSpeed's model states do): saved on 2 ranks
and loaded into a differently initialised model on 1 or 2 ranks, they come back bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.testing import lm_loss, make_batch, make_model, train_steps
from ds_train.zero.stage3_testing import stage3_config, swap_dir

STEPS = 6
LOSS_TOL, PARAM_TOL = 1e-5, 2e-5
FROZEN = ("up.weight", "up.bias")


def _frozen_model(seed: int = 0) -> torch.nn.Module:
    model = make_model(seed)
    for p in model.up.parameters():
        p.requires_grad_(False)
    return model


def _reference(steps: int, world: int) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """Torch AdamW over the trainable parameters only, on the mean gradient of `world` ranks, clipped at 0.5."""
    model = _frozen_model()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        grads = {n: torch.zeros_like(p) for n, p in trainable.items()}
        row = []
        for rank in range(world):
            ids = make_batch(step, 0, rank)
            model.zero_grad(set_to_none=True)
            loss = lm_loss(model(ids), ids)
            loss.backward()
            row.append(float(loss.detach()))
            for n, p in trainable.items():
                grads[n] += p.grad / world
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()
        coef = min(0.5 / (norm + 1e-6), 1.0)
        for n, p in trainable.items():
            p.grad = grads[n] * coef
        opt.step()
        losses.append(row)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _whole_frozen(engine) -> dict[str, torch.Tensor]:
    with engine.strategy.gathered_params():
        return {n: p.detach().clone() for n, p in engine.module.named_parameters() if n in FROZEN}


def _train_worker(offload: str, base: str, threshold: int) -> dict:
    import ds_train
    from ds_core import comm

    rank = comm.get_rank()
    model = _frozen_model()
    cfg = stage3_config("fp32", 2, offload=offload, swap=swap_dir(base, "swap"),
                        stage3_param_persistence_threshold=threshold)
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    frozen = [model.up.weight, model.up.bias]
    # persistent (small) ones are whole between uses on every rank, as trainable persistent ones are
    between = [hasattr(p, "ds3") and p.numel() == (p.ds3.numel if threshold else 0) for p in frozen]
    out = {"partitioned": all(between)}
    losses = train_steps(engine, STEPS, rank)
    out["losses"] = losses
    out["still_partitioned"] = all(hasattr(p, "ds3") and p.numel() == (p.ds3.numel if threshold else 0)
                                   and p.grad is None for p in frozen)
    out["fp32"] = engine.get_fp32_state_dict()
    out["frozen"] = _whole_frozen(engine)
    tensors, _ = engine.strategy.shard_state()
    out["shard_numel"] = sum(t.numel() for k, t in tensors.items() if k.endswith(".fp32"))
    engine.destroy()
    return out


@pytest.mark.parametrize("offload,threshold", [("none", 0), ("cpu", 0), ("nvme", 0), ("none", 10**6)])
def test_stage3_frozen_parameters_handed_over_whole_are_partitioned_and_match_torch(offload, threshold,
                                                                                    tmp_path) -> None:
    results = run_distributed(_train_worker, 2, offload, str(tmp_path), threshold)
    ref_losses, ref_params = _reference(STEPS, 2)
    start = dict(_frozen_model().named_parameters())
    trainable_numel = sum(p.numel() for n, p in start.items() if n not in FROZEN)
    for rank, res in enumerate(results):
        assert res["partitioned"] and res["still_partitioned"]
        for step in range(STEPS):
            assert abs(res["losses"][step] - ref_losses[step][rank]) <= LOSS_TOL, (rank, step)
        assert set(res["fp32"]) == set(ref_params) - set(FROZEN)  # frozen weights have no master
        for name, got in res["fp32"].items():
            assert (got - ref_params[name]).abs().max().item() <= PARAM_TOL, (rank, name)
        for name in FROZEN:  # never updated, not even by weight decay
            assert torch.equal(res["frozen"][name], start[name].detach()), (rank, name)
        # the optimizer shard holds only trainable weights: about half of them per rank (padding aside)
        assert trainable_numel / 2 <= res["shard_numel"] < trainable_numel / 2 + 16


def _save_worker(base: str) -> dict[str, torch.Tensor]:
    import ds_train
    from ds_core import comm

    rank = comm.get_rank()
    engine, *_ = ds_train.initialize(model=_frozen_model(), config=stage3_config("fp32", 2))
    with engine.strategy.gathered_params():  # a frozen weight changed by the user is saved as changed
        with torch.no_grad():
            engine.module.up.weight.add_(0.5)
    for step in range(3):
        ids = make_batch(step, 0, rank)
        engine.backward(lm_loss(engine(ids), ids))
        engine.step()
    engine.save_checkpoint(os.path.join(base, "ckpt"), tag="t")
    out = _whole_frozen(engine)
    engine.destroy()
    return out


def _load_worker(base: str, world: int) -> dict:
    import ds_train
    from ds_core import comm

    rank = comm.get_rank()
    engine, *_ = ds_train.initialize(model=_frozen_model(seed=7), config=stage3_config("fp32", world))
    before = _whole_frozen(engine)
    engine.load_checkpoint(os.path.join(base, "ckpt"), tag="t")
    out = {"before": before, "after": _whole_frozen(engine),
           "partitioned": hasattr(engine.module.up.weight, "ds3") and engine.module.up.weight.numel() == 0}
    ids = make_batch(3, 0, rank)
    out["loss"] = float(lm_loss(engine(ids), ids).detach())
    engine.destroy()
    return out


def test_stage3_frozen_parameters_round_trip_checkpoints_across_world_sizes(tmp_path) -> None:
    from safetensors.torch import load_file

    saved = run_distributed(_save_worker, 2, str(tmp_path))[0]
    module_file = load_file(str(tmp_path / "ckpt" / "t" / "model_states.safetensors"))
    for name in FROZEN:
        assert torch.equal(module_file[name], saved[name])  # in the model-states file, whole
    assert not torch.equal(saved["up.weight"], _frozen_model().up.weight.detach())  # the user's change is kept
    rank0_loss = {}
    for world in (2, 1):
        results = run_distributed(_load_worker, world, str(tmp_path), world)
        rank0_loss[world] = results[0]["loss"]
        for res in results:
            assert not torch.equal(res["before"]["up.weight"], saved["up.weight"])  # another init before loading
            for name in FROZEN:
                assert torch.equal(res["after"][name], saved[name]), (world, name)
            assert res["partitioned"]
    assert abs(rank0_loss[1] - rank0_loss[2]) <= LOSS_TOL  # the same model, resharded from 2 ranks to 1


class _FrozenStack(torch.nn.Module):
    """A trainable embedding and head around a stack of frozen layers (a LoRA-like base model)."""

    def __init__(self, hidden: int = 24, depth: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, hidden)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(depth))
        self.head = torch.nn.Linear(hidden, 64)
        for p in self.layers.parameters():
            p.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        self.first_input = h
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h)


def _backward_live_worker() -> dict:
    import ds_train
    from ds_core import comm

    torch.manual_seed(0)
    model = _FrozenStack()
    engine, *_ = ds_train.initialize(model=model, config=stage3_config("fp32", 2))
    seen = []
    for step in range(2):  # the second step runs with the recorded-order prefetch
        ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(step * 10 + comm.get_rank()))
        logits = engine(ids)
        # the gradient of the stack's input is the last thing the stack's backward computes
        model.first_input.register_hook(lambda g: seen.append(
            [p.numel() > 0 for layer in model.layers[1:] for p in layer.parameters()]))
        engine.backward(logits.float().logsumexp(-1).mean())
        engine.step()
    out = {"whole_at_end": seen, "after": [p.numel() > 0 for p in model.layers.parameters()]}
    engine.destroy()
    return out


def test_stage3_frozen_weights_are_released_after_their_modules_backward() -> None:
    for res in run_distributed(_backward_live_worker, 2):
        # layers 1..3 finished their backward before layer 0's input gradient exists: already released
        assert res["whole_at_end"] == [[False] * 6, [False] * 6]
        assert not any(res["after"])


class _FrozenExperts(torch.nn.Module):
    """MoE blocks marked as z3 leaves whose experts are frozen (only the routers train), then a frozen
    layer applied to data that needs no gradient and read again by a later module (a tied weight)."""

    def __init__(self, hidden: int = 16, blocks: int = 3) -> None:
        super().__init__()
        from ds_train.zero.stage3_testing import MoEBlock

        self.embed = torch.nn.Embedding(64, hidden)
        self.frozen_in = torch.nn.Embedding(64, hidden)
        self.tied = torch.nn.Linear(hidden, hidden, bias=False)
        self.blocks = torch.nn.ModuleList(MoEBlock(hidden, 3) for _ in range(blocks))
        self.reader = _ReadsWeightOf(self.tied)
        self.head = torch.nn.Linear(hidden, 64)
        for p in [*self.frozen_in.parameters(), *self.tied.parameters()]:
            p.requires_grad_(False)
        for block in self.blocks:
            for p in block.experts.parameters():
                p.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        side = self.tied(self.frozen_in(ids))  # needs no gradient: `tied` has no backward of its own here
        h = self.embed(ids) + side
        self.first_input = h
        for block in self.blocks:
            h = h + block(h)
        self.reader_input = h
        return self.head(self.reader(h))


class _ReadsWeightOf(torch.nn.Module):
    def __init__(self, source: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: its weight is read from outside

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(torch.nn.functional.linear(h, self.source.weight))


def _frozen_leaf_worker() -> dict:
    import ds_train
    from ds_core import comm
    from ds_train.zero import set_z3_leaf_modules
    from ds_train.zero.stage3_testing import MoEBlock

    world = comm.get_world_size()
    torch.manual_seed(0)
    model = _FrozenExperts()
    torch.manual_seed(0)
    ref = _FrozenExperts()  # the same weights, whole, trained by torch on the mean gradient of the ranks
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    set_z3_leaf_modules(model, [MoEBlock])
    cfg = stage3_config("fp32", world)
    cfg["gradient_clipping"] = 0.0
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    tied_whole, experts_whole, losses, ref_losses = [], [], [], []
    for step in range(3):  # from the second step on, the recorded-order prefetch runs too
        ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step * 10 + comm.get_rank()))
        logits = engine(ids)
        # the reader's input gradient exists once its backward is done: the tied weight is no longer needed
        model.reader_input.register_hook(lambda g: tied_whole.append(model.tied.weight.numel() > 0))
        # the first block's input gradient comes after blocks 1.. finished every call's backward
        model.first_input.register_hook(lambda g: experts_whole.append(
            [p.numel() > 0 for block in model.blocks[1:] for p in block.experts.parameters()]))
        loss = logits.logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        ref_loss = ref(ids).logsumexp(-1).mean()
        ref_loss.backward()
        for p in ref.parameters():
            if p.grad is not None:
                comm.all_reduce(p.grad)
                p.grad /= world
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(float(ref_loss))
    whole_after = [p.numel() > 0 for n, p in model.named_parameters() if not p.requires_grad]
    engine.destroy()
    return {"tied_whole": tied_whole, "experts_whole": experts_whole, "after": whole_after,
            "losses": losses, "ref_losses": ref_losses}


def test_stage3_frozen_weights_of_leaves_and_tied_readers_are_released_before_backward_ends() -> None:
    """Leaf modules' frozen weights once every call's backward is done; a frozen weight read by another
    module once that module's backward is done (not at the end of backward); same losses as torch."""
    for res in run_distributed(_frozen_leaf_worker, 2):
        assert res["tied_whole"] == [False] * 3, res["tied_whole"]
        assert res["experts_whole"] == [[False] * 24] * 3, res["experts_whole"]
        assert not any(res["after"])
        for got, want in zip(res["losses"], res["ref_losses"]):
            assert abs(got - want) <= LOSS_TOL, (res["losses"], res["ref_losses"])
