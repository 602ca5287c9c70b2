"""ZeRO-Offload / ZeRO-Infinity: model states in host memory or in files on an NVMe drive.

- `swap_folder.SwapFolder`: one rank's folder of swap files over ds-kernels' aio, with clear errors.
- `nvme_params.NvmeParamTier`: ZeRO-3 parameter shards in a file, read ahead of use (the prefetcher's
  recorded order) into `offload_param.buffer_count` buffers.
- `nvme_optimizer.NvmeOptimizerSwapper`: fp32 master weights and Adam moments in files, streamed
  through a few aligned buffers chunk by chunk while the CPU Adam kernel updates the previous chunk.
"""

__all__ = ["config", "swap_folder", "nvme_params", "nvme_optimizer"]
