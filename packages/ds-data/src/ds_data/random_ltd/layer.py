"""Make transformer layers, in training, process only a random subset of the tokens.

`RandomLTDLayer` becomes the ``forward`` of one layer instance; the module tree, parameter names
and ``state_dict`` keys stay exactly those of the plain model, so checkpoints, ``save_pretrained``
and engines that address parameters by name are unaffected. In ``train()`` mode with a kept-token count below the
sequence length it picks ``keep`` sorted random positions per sample, gathers the hidden states,
the attention mask (rows and columns), ``position_ids`` and rotary ``position_embeddings`` at those
positions, runs the layer on the short sequence, and scatters the result back: dropped tokens skip
the layer unchanged (an identity path, as in the random-LTD paper). In ``eval()`` mode it is the
plain layer. Works with Hugging Face GPT-2, Llama-style and BERT layers (transformers 4.45+ and 5.x).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from ds_core.logging import warn_once
from torch import nn

from ds_data.random_ltd.tokens import gather_mask, gather_tokens, sample_kept_indices, scatter_tokens

__all__ = [
    "RandomLTDLayer",
    "RandomLTDState",
    "convert_to_random_ltd",
    "find_layer_list",
    "is_random_ltd_layer",
    "revert_random_ltd",
]

_CACHE_ARGS = ("cache", "layer_past", "past_key_value", "past_key_values")


class RandomLTDState:
    """What every converted layer of one model shares: the kept-token count.

    Token choices come from torch's global RNG on the hidden states' device (as in DeepSpeed):
    activation checkpointing saves and restores that RNG around recomputation, so a recomputed
    layer drops exactly the tokens its first forward dropped. Seed it with ``torch.manual_seed``.
    """

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep

    def state_dict(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keep = state["keep"]


class RandomLTDLayer:
    """The token-dropping forward of one layer (installed as ``layer.forward`` by `convert_to_random_ltd`)."""

    def __init__(
        self,
        layer: nn.Module,
        state: RandomLTDState,
        mask_name: str | None = "attention_mask",
        hidden_state_order: str = "batch_seq_dim",
    ) -> None:
        if hidden_state_order not in ("batch_seq_dim", "seq_batch_dim"):
            raise ValueError(
                f"hidden_state_order must be 'batch_seq_dim' or 'seq_batch_dim', got {hidden_state_order!r}"
            )
        self.layer = layer
        # the class's forward bound to this instance: what the layer did before conversion
        self.plain_forward = type(layer).forward.__get__(layer)
        self.ltd_state = state
        self.mask_name = mask_name
        self.seq_first = hidden_state_order == "seq_batch_dim"
        self._signature = inspect.signature(self.plain_forward)
        params = list(self._signature.parameters)
        if not params:
            raise TypeError(
                f"{type(layer).__name__}.forward takes no arguments; cannot wrap it for random-LTD"
            )
        self._hidden_name = params[0]
        if (
            mask_name is not None
            and mask_name not in self._signature.parameters
            and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self._signature.parameters.values())
        ):
            raise ValueError(
                f"model_mask_name '{mask_name}' is not an argument of {type(layer).__name__}.forward "
                f"(arguments: {', '.join(params)})"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        keep = self.ltd_state.keep
        if not self.layer.training or keep is None:
            return self.plain_forward(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        arguments = bound.arguments
        hidden = arguments[self._hidden_name]
        if self.seq_first:
            hidden = hidden.transpose(0, 1)
        batch, seqlen = hidden.shape[0], hidden.shape[1]
        if keep >= seqlen:
            return self.plain_forward(*args, **kwargs)
        idx = sample_kept_indices(batch, seqlen, keep, hidden.device)
        short = gather_tokens(hidden, idx)
        arguments[self._hidden_name] = short.transpose(0, 1) if self.seq_first else short
        self._gather_arguments(arguments, idx, seqlen)
        out = self.plain_forward(*bound.args, **bound.kwargs)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if self.seq_first:
            first = first.transpose(0, 1)
        merged = scatter_tokens(hidden, first, idx)
        if self.seq_first:
            merged = merged.transpose(0, 1)
        if isinstance(out, (tuple, list)):
            return type(out)((merged, *out[1:]))
        return merged

    def _gather_arguments(self, arguments: dict[str, Any], idx: torch.Tensor, seqlen: int) -> None:
        """Cut every per-token argument to the kept tokens; refuse ones we cannot cut correctly."""
        for name, value in list(arguments.items()):
            if name == self._hidden_name:
                continue
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments[name] = {k: self._gather_one(k, v, idx, seqlen) for k, v in value.items()}
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                arguments[name] = tuple(
                    self._gather_one(f"*{name}[{i}]", v, idx, seqlen) for i, v in enumerate(value)
                )
            else:
                arguments[name] = self._gather_one(name, value, idx, seqlen)

    def _gather_one(self, name: str, value: Any, idx: torch.Tensor, seqlen: int) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if name in _CACHE_ARGS:
            # A fresh training-time cache adds nothing to this forward's attention; the dropped layer
            # cannot fill it coherently, so it gets none (generation runs in eval mode, unwrapped).
            warn_once(f"random-LTD: layers that drop tokens do not fill the KV cache ('{name}') in training")
            return None
        if name == "cache_position":
            return None  # only indexes a KV cache, which training does not use
        if name == self.mask_name or name == "attention_mask":
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"random-LTD cuts tensor attention masks; '{name}' is a {type(value).__name__} (flex/flash "
                    "attention?). Load the model with attn_implementation='sdpa' or 'eager'"
                )
            return gather_mask(value, idx)
        if name == "position_ids":
            return gather_tokens(value, idx)
        if name == "position_embeddings" and isinstance(value, (tuple, list)):
            return type(value)(gather_tokens(t, idx) for t in value)
        if name == "encoder_attention_mask" and isinstance(value, torch.Tensor) and value.dim() == 4:
            rows = idx.view(idx.shape[0], 1, idx.shape[1], 1).expand(
                idx.shape[0], value.shape[1], idx.shape[1], value.shape[3]
            )
            return torch.gather(value.expand(idx.shape[0], *value.shape[1:]), 2, rows)
        if name == "encoder_hidden_states":
            return value  # keys/values of cross-attention come from the encoder, not from the dropped tokens
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seqlen:
            raise ValueError(
                f"random-LTD does not know how to cut the per-token argument '{name}' (shape {tuple(value.shape)}); "
                "pass it as position_ids/position_embeddings/the mask, or exclude this layer from random_ltd_layer_id"
            )
        return value


def find_layer_list(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The model's stack of `num_layers` identical transformer layers (e.g. ``transformer.h``, ``model.layers``)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            found.append((name, module))
            kinds = {type(m).__name__ for m in module}
            if len(module) == num_layers and len(kinds) == 1:
                return name, module
    seen = ", ".join(f"{n or '<root>'} ({len(m)})" for n, m in found) or "none"
    raise ValueError(
        f"random-LTD: no list of {num_layers} identical layers in {type(model).__name__} "
        f"(total_layer_num is {num_layers}; ModuleLists found: {seen})"
    )


def is_random_ltd_layer(module: nn.Module) -> bool:
    """True when `module`'s forward was replaced by `convert_to_random_ltd`."""
    return isinstance(module.__dict__.get("forward"), RandomLTDLayer)


def convert_to_random_ltd(
    model: nn.Module,
    layer_ids: list[int],
    num_layers: int,
    state: RandomLTDState,
    mask_name: str | None = "attention_mask",
    hidden_state_order: str = "batch_seq_dim",
) -> nn.Module:
    """Give layers `layer_ids` of the model's layer stack the token-dropping forward (in place)."""
    name, layers = find_layer_list(model, num_layers)
    for i in layer_ids:
        if not 0 <= i < len(layers):
            raise ValueError(f"random_ltd_layer_id {i} is out of range for {name} with {len(layers)} layers")
        if is_random_ltd_layer(layers[i]):
            raise ValueError(f"layer {name}[{i}] is already converted to random-LTD")
    for i in layer_ids:
        # an instance attribute shadows the class's forward; nn.Module.__call__ (and its hooks) still run
        layers[i].forward = RandomLTDLayer(
            layers[i], state, mask_name=mask_name, hidden_state_order=hidden_state_order
        )
    return model


def revert_random_ltd(model: nn.Module) -> nn.Module:
    """Restore the plain forward of every converted layer (in place)."""
    for module in model.modules():
        if is_random_ltd_layer(module):
            del module.forward
    return model
