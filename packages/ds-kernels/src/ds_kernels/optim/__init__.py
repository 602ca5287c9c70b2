"""CPU optimizers over flat fp32 master parameters: functional steps and torch.optim classes."""

from ds_kernels.optim.functional import available, cpu_adagrad_step, cpu_adam_step, cpu_lion_step
from ds_kernels.optim.optimizers import DSCPUAdagrad, DSCPUAdam, DSCPULion

__all__ = [
    "available",
    "cpu_adam_step",
    "cpu_adagrad_step",
    "cpu_lion_step",
    "DSCPUAdam",
    "DSCPUAdagrad",
    "DSCPULion",
]
