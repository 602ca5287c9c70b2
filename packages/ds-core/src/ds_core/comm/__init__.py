"""`ds_core.comm`: the one door to the network (torch.distributed underneath).

init_distributed() reads torchrun/SLURM/MPI environments; every collective works on every backend,
with fallbacks where a backend lacks one; `comms_logger` counts bytes and time per collective.
"""
from ds_core.comm.collectives import (
    P2POp,
    ProcessGroup,
    ReduceOp,
    all_gather,
    all_gather_by_broadcast,
    all_gather_into_tensor,
    all_gather_object,
    all_reduce,
    all_to_all,
    all_to_all_single,
    barrier,
    batch_isend_irecv,
    broadcast,
    broadcast_object_list,
    destroy_process_group,
    force_fallback,
    get_global_rank,
    get_local_rank,
    get_rank,
    get_world_size,
    irecv,
    is_initialized,
    isend,
    new_group,
    prefers_point_to_point,
    recv,
    reduce_scatter,
    reduce_scatter_by_sends,
    reduce_scatter_tensor,
    send,
)
from ds_core.comm.env import LaunchEnv, LaunchEnvError, discover_launch_env
from ds_core.comm.init import free_port, init_distributed
from ds_core.comm.logger import CommsLogger, comms_logger

__all__ = [
    "CommsLogger", "LaunchEnv", "LaunchEnvError", "P2POp", "ProcessGroup", "ReduceOp",
    "all_gather", "all_gather_by_broadcast", "all_gather_into_tensor", "all_gather_object", "all_reduce",
    "all_to_all", "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list",
    "comms_logger", "destroy_process_group", "discover_launch_env", "force_fallback", "free_port",
    "get_global_rank", "get_local_rank", "get_rank", "get_world_size", "init_distributed", "irecv",
    "is_initialized", "isend", "new_group", "prefers_point_to_point", "recv", "reduce_scatter", "reduce_scatter_by_sends",
    "reduce_scatter_tensor", "send",
]
