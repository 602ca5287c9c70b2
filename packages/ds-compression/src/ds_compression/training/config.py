"""DeepSpeed's `compression_training` config section (same keys and defaults), strict.

Options we do not implement are rejected by name when they would change behaviour (e.g.
`rounding: "stochastic"`); keys that are inert in the value given are accepted.
"""
from __future__ import annotations

from typing import Literal

from ds_core.config import DSConfigModel
from pydantic import Field, model_validator

__all__ = ["CompressionTrainingConfig"]


class _Group(DSConfigModel):
    modules: list[str] = Field(default=["*"], description="Module-name patterns (regex search; '*' = every nn.Linear).")
    related_modules: list[list[str]] | None = Field(
        default=None, description="Per entry of `modules`: modules whose inputs/rows shrink with it on redundancy_clean."
    )


class WeightQuantParams(DSConfigModel):
    start_bits: int = Field(ge=1, le=16, description="Bit width when quantization starts.")
    target_bits: int = Field(ge=1, le=16, description="Final bit width (1 = binary, 2 = ternary).")
    quantization_period: int = Field(default=1, ge=1, description="Steps before the first 1-bit reduction; doubles after each.")

    @model_validator(mode="after")
    def _order(self) -> WeightQuantParams:
        if self.target_bits > self.start_bits:
            raise ValueError(f"target_bits ({self.target_bits}) must not exceed start_bits ({self.start_bits})")
        return self


class WeightQuantGroup(_Group):
    params: WeightQuantParams = Field(description="Bit schedule of this group.")


class FP16MixedQuantize(DSConfigModel):
    enabled: bool = Field(default=False, description="Mix fp16 and quantized weights (not supported: must be false).")
    quantize_change_ratio: float = Field(default=0.001, description="Mixing ratio step (unused when disabled).")

    @model_validator(mode="after")
    def _off(self) -> FP16MixedQuantize:
        if self.enabled:
            raise ValueError("fp16_mixed_quantize.enabled=true is not supported")
        return self


class WeightQuantShared(DSConfigModel):
    enabled: bool = Field(default=False, description="Turn weight quantization on.")
    quantizer_kernel: bool = Field(default=False, description="Use DeepSpeed's CUDA quantizer kernel (not supported: must be false).")
    schedule_offset: int = Field(default=0, ge=0, description="Global step at which quantization starts.")
    quantize_groups: int = Field(default=1, ge=1, description="Groups over each flattened weight (one scale each).")
    quantize_verbose: bool = Field(default=False, description="Log each bit-width change.")
    quantization_type: Literal["symmetric", "asymmetric"] = Field(default="symmetric", description="Range type.")
    quantize_weight_in_forward: bool = Field(default=False, description="Quantize in forward (always true here; accepted for compatibility).")
    rounding: Literal["nearest"] = Field(default="nearest", description="Rounding mode ('stochastic' is not supported).")
    fp16_mixed_quantize: FP16MixedQuantize = Field(default_factory=FP16MixedQuantize, description="Unsupported mixing mode.")

    @model_validator(mode="after")
    def _kernel(self) -> WeightQuantShared:
        if self.quantizer_kernel:
            raise ValueError("quantizer_kernel=true is not supported (the quantizer runs in torch ops)")
        return self


class WeightQuantization(DSConfigModel):
    shared_parameters: WeightQuantShared = Field(default_factory=WeightQuantShared, description="Settings for all groups.")
    different_groups: dict[str, WeightQuantGroup] = Field(default_factory=dict, description="Named module groups.")


class ActQuantShared(DSConfigModel):
    enabled: bool = Field(default=False, description="Turn activation quantization on.")
    quantization_type: Literal["symmetric", "asymmetric"] = Field(default="symmetric", description="Range type.")
    range_calibration: Literal["dynamic"] = Field(default="dynamic", description="Per-tensor range computed each forward ('static' is not supported).")
    schedule_offset: int = Field(default=1000, ge=0, description="Global step at which it starts.")


class ActQuantParams(DSConfigModel):
    bits: int = Field(ge=2, le=16, description="Activation bit width.")


class ActQuantGroup(_Group):
    params: ActQuantParams = Field(description="Bits of this group.")


class ActivationQuantization(DSConfigModel):
    shared_parameters: ActQuantShared = Field(default_factory=ActQuantShared, description="Settings for all groups.")
    different_groups: dict[str, ActQuantGroup] = Field(default_factory=dict, description="Named module groups.")


class PruneShared(DSConfigModel):
    enabled: bool = Field(default=False, description="Turn this pruning on.")
    method: Literal["l1", "topk"] = Field(default="l1", description="'l1': fixed magnitude mask; 'topk': learned scores (STE).")
    schedule_offset: int = Field(default=1000, ge=0, description="Global step at which the mask is applied.")


class HeadPruneShared(PruneShared):
    method: Literal["l1", "topk"] = Field(default="topk", description="'l1': head norm mask; 'topk': learned head scores.")
    num_heads: int | None = Field(default=None, ge=1, description="Attention heads of each pruned output projection.")


class DenseRatio(DSConfigModel):
    dense_ratio: float = Field(gt=0.0, le=1.0, description="Fraction kept.")


class PruneGroup(_Group):
    params: DenseRatio = Field(description="Fraction kept in this group.")


class SparsePruning(DSConfigModel):
    shared_parameters: PruneShared = Field(default_factory=PruneShared, description="Settings for all groups.")
    different_groups: dict[str, PruneGroup] = Field(default_factory=dict, description="Named module groups.")


class RowPruning(SparsePruning):
    pass


class HeadPruning(DSConfigModel):
    shared_parameters: HeadPruneShared = Field(default_factory=HeadPruneShared, description="Settings for all groups.")
    different_groups: dict[str, PruneGroup] = Field(default_factory=dict, description="Named module groups.")

    @model_validator(mode="after")
    def _heads(self) -> HeadPruning:
        if self.shared_parameters.enabled and self.shared_parameters.num_heads is None:
            raise ValueError("head_pruning needs shared_parameters.num_heads")
        return self


class ChannelPruning(SparsePruning):
    @model_validator(mode="after")
    def _off(self) -> ChannelPruning:
        if self.shared_parameters.enabled:
            raise ValueError("channel_pruning (Conv2d output channels) is not supported; use row_pruning for linears")
        return self


class LayerReduction(DSConfigModel):
    enabled: bool = Field(default=False, description="Keep only some transformer layers.")
    keep_number_layer: int | None = Field(default=None, ge=1, description="How many layers the student keeps.")
    module_name_prefix: str = Field(default="", description="Name of the layer ModuleList, e.g. 'bert.encoder.layer'.")
    teacher_layer: list[int] = Field(default_factory=list, description="Teacher layer index for each student layer.")
    other_module_name: list[str] = Field(default_factory=list, description="Other modules copied from the teacher.")

    @model_validator(mode="after")
    def _consistent(self) -> LayerReduction:
        if self.enabled:
            if not self.module_name_prefix or not self.teacher_layer:
                raise ValueError("layer_reduction needs module_name_prefix and teacher_layer")
            if self.keep_number_layer is not None and self.keep_number_layer != len(self.teacher_layer):
                raise ValueError(f"keep_number_layer={self.keep_number_layer} but teacher_layer lists "
                                 f"{len(self.teacher_layer)} layers")
        return self


class CompressionTrainingConfig(DSConfigModel):
    weight_quantization: WeightQuantization = Field(default_factory=WeightQuantization, description="QAT of weights.")
    activation_quantization: ActivationQuantization = Field(default_factory=ActivationQuantization, description="QAT of activations.")
    sparse_pruning: SparsePruning = Field(default_factory=SparsePruning, description="Unstructured pruning.")
    row_pruning: RowPruning = Field(default_factory=RowPruning, description="Output-row pruning of linears.")
    head_pruning: HeadPruning = Field(default_factory=HeadPruning, description="Attention-head pruning.")
    channel_pruning: ChannelPruning = Field(default_factory=ChannelPruning, description="Conv2d channel pruning (unsupported).")
    layer_reduction: LayerReduction = Field(default_factory=LayerReduction, description="Layer reduction (XTC).")
