"""Random-LTD: kept tokens go through the layer exactly as a short sequence would; the rest skip it."""

import inspect

import pytest
import torch
from ds_data.config import RandomLTDConfig
from ds_data.random_ltd import (
    LayerTokenLR,
    RandomLTDLayer,
    RandomLTDScheduler,
    RandomLTDState,
    convert_to_random_ltd,
    gather_mask,
    gather_tokens,
    is_random_ltd_layer,
    revert_random_ltd,
    sample_kept_indices,
    scatter_tokens,
)


def ltd_config(**over):
    cfg = {
        "enabled": True,
        "total_layer_num": 4,
        "random_ltd_layer_num": 2,
        "random_ltd_layer_id": [1, 2],
        "random_ltd_schedule": {
            "min_value": 16,
            "max_value": 64,
            "schedule_type": "fixed_linear",
            "schedule_config": {"require_steps": 10, "seq_per_step": 8},
        },
    }
    cfg.update(over)
    return RandomLTDConfig.model_validate(cfg)


def test_kept_indices_sorted_distinct_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_kept_indices(5, 20, 7, torch.device("cpu"), g1)
    b = sample_kept_indices(5, 20, 7, torch.device("cpu"), g2)
    assert torch.equal(a, b) and a.shape == (5, 7)
    for row in a.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < 20
    assert len({tuple(r) for r in a.tolist()}) > 1  # each sample draws its own subset


def test_gather_scatter_roundtrip_and_mask_slicing():
    x = torch.randn(2, 6, 3)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    part = gather_tokens(x, idx)
    assert torch.equal(part[1, 2], x[1, 4])
    assert torch.equal(scatter_tokens(x, part, idx), x)
    y = scatter_tokens(x, torch.zeros_like(part), idx)
    assert torch.equal(y[0, 1], x[0, 1]) and y[0, 2].abs().sum() == 0
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool)).view(1, 1, 6, 6)
    m = gather_mask(causal, idx)
    assert m.shape == (2, 1, 3, 3) and torch.equal(m[0, 0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    pad = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert gather_mask(pad, idx).tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_dropping_layer_equals_layer_on_the_kept_subsequence(kind, tiny_model):
    """Reference: run the unwrapped model with the kept tokens only for layers 1-2, by hand."""
    model = tiny_model(kind)
    ref = tiny_model(kind)  # same seed -> same weights
    state = RandomLTDState(keep=6)
    convert_to_random_ltd(model, [1, 2], 4, state)
    ids = torch.randint(1, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 8:] = 0
    model.train()
    ref.train()
    captured = {}

    def capture(module, args, kwargs, output):
        captured.setdefault("inputs", []).append((args, kwargs))

    stack = {
        "gpt2": lambda m: m.transformer.h,
        "llama": lambda m: m.model.layers,
        "bert": lambda m: m.bert.encoder.layer,
    }[kind]
    handles = [layer.register_forward_hook(capture, with_kwargs=True) for layer in stack(ref)]
    rng_state = torch.get_rng_state()
    out = model(input_ids=ids, attention_mask=mask).logits
    ref(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    # replay layers by hand: layers 0 and 3 see all tokens, 1 and 2 the kept ones
    torch.set_rng_state(rng_state)
    args, kwargs = captured["inputs"][0]
    hidden = args[0]
    layers = stack(ref)
    for i, layer in enumerate(layers):
        a, kw = captured["inputs"][i]
        kw = dict(kw)
        if i in (1, 2):
            layer_args = list(a)
            idx = sample_kept_indices(3, 10, 6, hidden.device)
            # the masks/positions each model passes positionally or by name
            names = list(inspect.signature(layer.forward).parameters)
            bound = dict(zip(names, layer_args))
            bound.update(kw)
            bound[names[0]] = gather_tokens(hidden, idx)
            if bound.get("attention_mask") is not None:
                bound["attention_mask"] = gather_mask(bound["attention_mask"], idx)
            if bound.get("position_ids") is not None:
                bound["position_ids"] = gather_tokens(bound["position_ids"], idx)
            if bound.get("position_embeddings") is not None:
                bound["position_embeddings"] = tuple(
                    gather_tokens(t, idx) for t in bound["position_embeddings"]
                )
            bound.pop("cache", None)
            bound.pop("cache_position", None)
            short = layer(**bound)
            short = short[0] if isinstance(short, tuple) else short
            hidden = scatter_tokens(hidden, short, idx)
        else:
            names = list(inspect.signature(layer.forward).parameters)
            bound = dict(zip(names, a))
            bound.update(kw)
            bound[names[0]] = hidden
            bound.pop("cache", None)  # the reference run filled it; a replay must not attend to it again
            res = layer(**bound)
            hidden = res[0] if isinstance(res, tuple) else res
    if kind == "gpt2":
        expected = ref.lm_head(ref.transformer.ln_f(hidden))
    elif kind == "llama":
        expected = ref.lm_head(ref.model.norm(hidden))
    else:
        expected = ref.cls(hidden)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_eval_and_full_keep_are_the_plain_model(kind, tiny_model):
    model, ref = tiny_model(kind), tiny_model(kind)
    state = RandomLTDState(keep=4)
    convert_to_random_ltd(model, [0, 3], 4, state)
    ids = torch.randint(1, 97, (2, 9))
    model.eval(), ref.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    model.train(), ref.train()
    state.keep = 9
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    state.keep = 4
    assert not torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_gradients_reach_dropping_layers_and_dropped_tokens(tiny_model):
    model = tiny_model("gpt2")
    state = RandomLTDState(keep=3)
    convert_to_random_ltd(model, [1, 2], 4, state)
    model.train()
    ids = torch.randint(1, 97, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.transformer.h[1].attn.c_attn.weight.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad[ids[0]].abs().sum(dim=1).gt(0).all()


def test_seq_batch_order(tiny_model):
    class SeqFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, hidden_states, attention_mask=None):
            return self.lin(hidden_states)

    inner = SeqFirst()
    state = RandomLTDState(keep=3)
    wrapped = RandomLTDLayer(inner, state, hidden_state_order="seq_batch_dim")
    x = torch.randn(8, 2, 4)  # [T, B, H]
    y = wrapped(x)
    changed = (y != x).any(dim=2)  # [T, B]
    assert changed.sum(dim=0).tolist() == [3, 3]
    torch.testing.assert_close(y[changed], inner(x)[changed])


def test_convert_errors_are_clear(tiny_model):
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="no list of 6 identical layers"):
        convert_to_random_ltd(model, [1], 6, RandomLTDState(2))
    convert_to_random_ltd(model, [1], 4, RandomLTDState(2))
    with pytest.raises(ValueError, match="already converted"):
        convert_to_random_ltd(model, [1], 4, RandomLTDState(2))
    with pytest.raises(ValueError, match="model_mask_name 'mask'"):
        RandomLTDLayer(torch.nn.Linear(2, 2), RandomLTDState(1), mask_name="mask")


def test_scheduler_formula_and_layer_tokens():
    sched = RandomLTDScheduler(ltd_config(), global_batch_size=4)
    assert [sched.get_value(s) for s in (0, 1, 5, 10, 50)] == [16, 16, 40, 64, 64]
    for step in range(3):
        sched.update_seq(step)
        sched.update_seq(step)  # a repeated step is counted once
    per_step = [4 * (v * 2 + 64 * 2) for v in (16, 16, 24)]
    assert sched.consumed_layer_tokens == sum(per_step)
    assert sched.get_total_layer_tokens(3) == sum(per_step)
    other = RandomLTDScheduler(ltd_config(), global_batch_size=4)
    other.load_state_dict(sched.state_dict())
    assert other.consumed_layer_tokens == sched.consumed_layer_tokens and other.current_value == 24


def test_layer_token_lr_warmup_then_decay():
    cfg = ltd_config(
        layer_token_lr_schedule={"enabled": True, "warmup_layer_tokens": 100, "total_layer_tokens": 1100}
    )
    lr = LayerTokenLR(cfg.layer_token_lr_schedule, 1100)
    assert lr.scale(0) == 0 and lr.scale(50) == pytest.approx(0.5) and lr.scale(100) == pytest.approx(1.0)
    assert (
        lr.scale(600) == pytest.approx(0.5)
        and lr.scale(1100) == pytest.approx(0.0)
        and lr.scale(5000) == pytest.approx(0.0)
    )
    with pytest.raises(ValueError, match="warmup_layer_tokens"):
        LayerTokenLR(cfg.layer_token_lr_schedule, 50)


def test_config_rejects_inconsistent_layers():
    with pytest.raises(ValueError, match="random_ltd_layer_num"):
        ltd_config(random_ltd_layer_id=[1])
    with pytest.raises(ValueError, match="distinct layer indices"):
        ltd_config(random_ltd_layer_id=[1, 4])


def test_conversion_keeps_parameter_names_and_state_dict_keys(tiny_model):
    model, ref = tiny_model("llama"), tiny_model("llama")
    state = RandomLTDState(keep=3)
    convert_to_random_ltd(model, [1, 2], 4, state)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(model.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(model.state_dict())  # a checkpoint of the converted model loads into the plain one
    assert is_random_ltd_layer(model.model.layers[1]) and not is_random_ltd_layer(model.model.layers[0])
    ids = torch.randint(1, 97, (2, 9))
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, ref.train()(input_ids=ids).logits)
    revert_random_ltd(model)
    assert not any(is_random_ltd_layer(m) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_activation_checkpointing_recomputes_the_same_tokens(kind, tiny_model):
    """With transformers' own activation checkpointing, gradients equal those without it."""
    plain, ckpt = tiny_model(kind), tiny_model(kind)
    for m in (plain, ckpt):
        convert_to_random_ltd(m, [1, 2], 4, RandomLTDState(keep=5))
        m.train()
    # transformers 5 renamed the switch; 4.x only has the old name
    if hasattr(ckpt, "activation_checkpointing_enable"):
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(1, 97, (3, 12))
    for m in (plain, ckpt):
        torch.manual_seed(11)
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


class _MixBlock(torch.nn.Module):
    """Token-mixing block: a token's output depends on which other tokens the layer sees."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states + torch.tanh(self.lin(hidden_states) + hidden_states.mean(dim=1, keepdim=True))


class _Stack(torch.nn.Module):
    def __init__(self, outer_checkpoint: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_MixBlock() for _ in range(4))
        self.outer_checkpoint = outer_checkpoint

    def forward(self, x):
        for layer in self.layers:
            # the whole layer call (token choice included) is recomputed in backward
            x = (
                torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
                if self.outer_checkpoint
                else layer(x)
            )
        return x.pow(2).mean()


def test_outer_checkpoint_of_the_whole_layer_recomputes_the_same_tokens():
    plain, ckpt = _Stack(False), _Stack(True)
    for m in (plain, ckpt):
        convert_to_random_ltd(m, [1, 2], 4, RandomLTDState(keep=3))
    x = torch.randn(2, 10, 8)
    for m in (plain, ckpt):
        torch.manual_seed(5)
        m(x).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
