"""torch.distributed helpers: set-up from the torchrun environment, DDP wrapping, feature gathering.

Under `torchrun` the environment holds RANK, WORLD_SIZE and LOCAL_RANK; the process group uses NCCL on GPUs and
gloo on CPUs. Without it everything here degrades to single-process no-ops.
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Callable, ContextManager, Dict, Iterator, Tuple

import torch
import torch.distributed as dist

from utils.errors import UserError


def env_world() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device_name: str = "auto") -> Tuple[int, int, int]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); (rank, world_size, local_rank)."""
    rank, world_size, local_rank = env_world()
    if world_size > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return rank, world_size, local_rank


def is_main_process() -> bool:
    """True on rank 0 or without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if any (safe to call more than once)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel.

    Without `find_unused_parameters`: every parameter takes part in every step's loss (the MoE runs all experts
    densely, the MLM loss of a batch without masked tokens is a zero that keeps the graph; tests check this per
    head combination), so the unused-parameter search would only cost a graph traversal per step. The only
    buffer (the text attention mask) is a constant, so it is not re-broadcast before each forward.
    """
    from torch.nn.parallel import DistributedDataParallel
    ids = None
    if device.type == "cuda":
        # '--device cuda' leaves the index open; init_distributed made cuda:LOCAL_RANK the current device.
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over every process (no gradient); `x` itself without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process in rank order; the gradient flows to this process's part only."""
    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over every process; the gradient flows to this process's `x` only."""
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


def scale_gradient(value: torch.Tensor, factor: float) -> torch.Tensor:
    """`value` unchanged, its gradient multiplied by `factor`."""
    return value.detach() + factor * (value - value.detach())


def feature_gatherer(world_size: int):
    """A `RetrievalModel.gather` function for contrastive losses over the global batch: {name: tensor [B, ...]}
    -> {name: the tensors of every process, concatenated in rank order}.

    Each process computes the loss of the whole global batch, with gradients through its own features only;
    DDP then averages the parameter gradients over processes, which divides by world_size. Scaling the gradient
    of the gathered features by world_size makes the update equal to single-process training on the global
    batch, while the reported loss stays the global-batch value.
    """
    def gather(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if world_size <= 1:
            return dict(tensors)
        # Integer tensors (pids) carry no gradient to scale.
        return {key: scale_gradient(all_gather_with_grad(x), world_size) if x.is_floating_point()
                else all_gather_with_grad(x) for key, x in tensors.items()}
    return gather


def statistics_reducer(world_size: int):
    """A `MoE.reduce_stats` function: sums batch statistics (e.g. routing-probability sums) over processes.

    As with `feature_gatherer`, every process then computes the global-batch load-balancing loss with gradients
    through its own tokens, scaled by world_size to undo DDP's gradient averaging.
    """
    def reduce(stats: torch.Tensor) -> torch.Tensor:
        if world_size <= 1:
            return stats
        return scale_gradient(all_reduce_with_grad(stats), world_size)
    return reduce


def use_global_batch(model: torch.nn.Module, world_size: int) -> None:
    """Make the batch-level losses of `model` (contrastive losses, MoE load balancing) global-batch losses.

    Sets `model.gather` and the `reduce_stats` of every submodule that has one (the MoE layers); they act in
    training mode only, so evaluation on a single process issues no collective.
    """
    model.gather = feature_gatherer(world_size)
    reducer = statistics_reducer(world_size)
    for module in model.modules():
        if hasattr(module, "reduce_stats"):
            module.reduce_stats = reducer


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others once it is done (e.g. generating a data set they then read)."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


@contextlib.contextmanager
def on_main_process(make_context: Callable[[], ContextManager]) -> Iterator[None]:
    """Enter `make_context()` on rank 0 only (e.g. a run folder's lock); if rank 0 fails to, every rank raises."""
    context = make_context() if is_main_process() else contextlib.nullcontext()
    error = None
    try:
        context.__enter__()
    except UserError as e:
        error = e
    ok = error is None
    if dist.is_initialized():
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if error is not None:
        raise error
    if not ok:
        raise UserError("the main process (rank 0) could not take the run folder's lock; see its error")
    try:
        yield
    except BaseException:
        if not context.__exit__(*sys.exc_info()):
            raise
    else:
        context.__exit__(None, None, None)
