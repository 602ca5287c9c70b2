"""ds_train: Training engine: ZeRO 0-3, offload, mixed precision, checkpoints, launcher."""

__version__ = "0.1.0"
