"""torchrun-style process groups: one process per device, environment variables set by the launcher."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(gpu_ids=None):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) and pick this rank's device.

    gpu_ids: the --gpu list; under torchrun local rank i uses gpu_ids[i] when given, else cuda:i.
    CUDA ranks talk over nccl, CPU ranks over gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    info = DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=world_size, local_rank=local_rank,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if torch.cuda.is_available() and gpu_ids != []:
        ids = gpu_ids or list(range(torch.cuda.device_count()))
        info.device = torch.device("cuda", ids[local_rank % len(ids)])
        torch.cuda.set_device(info.device)
    if info.distributed:
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=info.device if backend == "nccl" else None)
    return info


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks, in float64 so counts and sums stay exact."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank (a decision rank 0 took alone)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def broadcast_buffers(model):
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP broadcasts them at the start of
    each forward, so after the last training step every rank has updated its own copy once."""
    if dist.is_available() and dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
