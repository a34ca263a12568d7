"""torch.distributed under torchrun: each rank takes its share of independent work."""
import copy
import os

import torch
import torch.distributed as dist

from .errors import MimiqError


def init_from_env() -> tuple[int, int]:
    """(rank, world_size); joins the process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if cuda and ranks_here > torch.cuda.device_count():  # NCCL refuses two ranks on one GPU, deep in its setup
            raise MimiqError(f"{ranks_here} ranks on this node but {torch.cuda.device_count()} CUDA device(s): "
                             f"start one rank per GPU (torchrun --nproc_per_node {torch.cuda.device_count()}), or "
                             "hide the GPUs (CUDA_VISIBLE_DEVICES=) to run the ranks on CPU")
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device_for_rank(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` itself if it lives on `device`, else a copy moved there: the caller's model stays where it was
    (a CPU teacher passed to synthesize / finetune on a GPU host must still take CPU tensors afterwards)."""
    first = next(model.parameters(), None)
    if first is None or first.device == torch.device(device):
        return model
    return copy.deepcopy(model).to(device)
