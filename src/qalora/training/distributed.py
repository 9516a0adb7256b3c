"""Data-parallel training across processes (``torchrun --nproc-per-node N -m qalora train …``).

The trainer takes a :class:`Ranks` value instead of reading process state itself, so the core
holds nothing process-bound: :func:`from_env` is what the command line (or a user's own
``torchrun`` script) calls, once, to join the process group torchrun describes in the
environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``); backend gloo on CPU,
nccl on CUDA. Communication is ``torch.distributed`` only, in one of two forms
(``--parallel``):

- ``ddp``: DDP over the adapter parameters (the frozen base and its packed buffers are never sent);
- ``fsdp2``: ``fully_shard`` on every decoder layer and on the model, so each process holds
  ``1/W`` of every parameter (adapters, norms, embeddings) and its optimizer state, gathered for a
  layer's forward and backward and reduce-scattered after; the packed codes and qparams stay
  buffers, whole on every process. Checkpoints hold full tensors (gathered on every process,
  written by process 0), so a run resumes under either form and any number of processes.

The batch plan is global: optimizer step ``s`` consumes the ``W·A`` micro-batches
``k = s·W·A + j·W + r`` (``W`` ranks, ``A = grad_accum``, ``j < A``), rank ``r`` the ones with
its ``r``. Every micro-batch's loss is divided by the step's total number of response tokens over
all ranks, DDP averages gradients over ranks, and each rank's loss is multiplied by ``W`` before
the backward, so the gradient is the same sum a single process computes with
``grad_accum = W·A`` — up to the order of floating-point additions. A run is therefore
identified by its global micro-batches per step (``W·A``), not by ``A``, and ``--resume`` may
change the number of processes as long as ``W·A`` stays the same.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from qalora.errors import QaloraError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (``world = 1``: a single process)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def micro_batches(self, step: int, grad_accum: int) -> list[int]:
        """Global micro-batch numbers this rank runs in optimizer step ``step`` (0-based)."""
        first = step * self.world * grad_accum
        return [first + j * self.world + self.rank for j in range(grad_accum)]

    def sum(self, value: float | int) -> float:
        """``value`` summed over ranks (the value itself in a single process)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def from_env() -> Ranks:
    """Join the process group ``torchrun`` set up in the environment (or the one already joined);
    a plain ``python -m qalora train`` is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        except (RuntimeError, ValueError) as e:
            raise QaloraError(f"could not join the {world}-process group torchrun describes "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    device = "cpu"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def leave(ranks: Ranks) -> None:
    """Leave the process group :func:`from_env` joined (after the last collective)."""
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


PARALLEL = ("ddp", "fsdp2")


def wrap(model: torch.nn.Module, ranks: Ranks, parallel: str = "ddp") -> torch.nn.Module:
    """``model`` under DDP (``parallel="ddp"``: gradients of the trainable parameters averaged;
    buffers — the packed codes and qparams — neither broadcast nor reduced) or sharded in place by
    FSDP2 (``"fsdp2"``: one ``fully_shard`` unit per decoder layer, the rest in the root unit) for
    ``ranks.world > 1``; else ``model`` itself."""
    if not ranks.distributed:
        return model
    if parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        from qalora.patch import decoder_layers

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(ranks.device).index] if ranks.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def no_sync(model: torch.nn.Module, last: bool):
    """Gradients reduce once per step: DDP's ``no_sync`` for every micro-batch but the step's last,
    FSDP2's ``set_requires_gradient_sync(last)``."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t):
    """The whole tensor behind ``t`` (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def full_state(obj):
    """``obj`` (a state dict, nested) with every sharded tensor gathered whole, in a fixed order."""
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return full(obj) if torch.is_tensor(obj) else obj


def shard_like(t: torch.Tensor, like) -> torch.Tensor:
    """``t`` (whole) sharded as the parameter ``like`` is (``t`` itself when ``like`` is whole)."""
    if not is_sharded(like) or not torch.is_tensor(t) or t.dim() == 0:
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def micro_seed(seed: int, k: int) -> int:
    """Seed of micro-batch ``k``'s random draws (adapter dropout): a pure function of the run's
    seed and ``k``, so the masks are the same whichever rank runs ``k`` and after a resume."""
    return (seed * 1_000_003 + k * 7919 + 1) % (2**63 - 1)
