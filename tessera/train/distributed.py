"""Data-parallel training across the processes torchrun starts (`torchrun --nproc-per-node N --no-python tessera
train run.yaml`): every process holds the whole model and takes its share of each batch's rows, and the gradients
are summed across the processes before every optimizer step. So a run on N processes computes what the same run
computes in one — the same batches, the same loss, the same update — up to the order of float additions, and
`batch_size` stays the batch of a step, whatever N is.

The gradients are summed here, once per optimizer step, rather than by `DistributedDataParallel`:
- a run's stages freeze and unfreeze components, where DDP fixes the parameters it syncs when it is built;
- a step may leave a trainable parameter without a gradient in one process and not in another (a process whose
  rows hold no image leaves the vision encoder's untouched — the hang nanoVLM hit). DDP either hangs or needs
  `find_unused_parameters`; here a parameter gets a gradient wherever some process gave it one (zeros where none),
  and keeps none where none did, as in one process, where AdamW then leaves it alone;
- the loss is already the sum over the answer tokens of every process divided by their total count (the
  loop all-reduces the count), so the gradients are summed, not averaged; with gradient accumulation, the
  micro-batches are summed locally first, which is what DDP's `no_sync` is for.
What it gives up is DDP's overlap of the communication with the backward pass.

On CPU (what tessera trains on), the processes talk through gloo. Only the first process (rank 0) writes into OUT
and logs; the others read what it reads before it writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from tessera.errors import ConfigError, DataError, ProcessGroupError

PATIENCE = timedelta(hours=2)  # how long a process waits for the others at an exchange
BUCKET_ELEMENTS = 1 << 22  # gradients are summed in flat buckets of about this many floats (16 MB): few messages


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes; one process (the default) makes every operation a no-op."""

    rank: int = 0
    count: int = 1
    joined: bool = field(default=False, compare=False)  # whether join() made the process group (leave() ends it)

    @property
    def main(self) -> bool:
        """The process that writes into OUT and logs."""
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.count:
            raise ConfigError(f"batch_size={batch_size} with {self.count} processes: expected a multiple of the "
                              f"process count (each process takes an equal share of a step's batch)")

    def share(self, rows: list) -> list:
        """This process's rows of a batch: every count-th, from its rank."""
        mine = rows[self.rank::self.count]
        if not mine:
            raise ConfigError(f"a batch of {len(rows)} rows leaves process {self.rank} of {self.count} none: expected "
                              f"at least {self.count} training examples in every stage's data")
        return mine

    def sum(self, value: float) -> float:
        """value summed over the processes."""
        if self.count == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        with _talking():
            dist.all_reduce(total)
        return total.item()

    def sum_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Every parameter's gradient summed over the processes, in place. A parameter that has a gradient in some
        process gets one in all (zeros where it had none); one that has none anywhere keeps none."""
        if self.count == 1:
            return
        parameters = list(parameters)
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32)
        with _talking():
            dist.all_reduce(present)
        grads = []
        for p, anywhere in zip(parameters, present.tolist()):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
            if anywhere:
                grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            with _talking():
                dist.all_reduce(flat)
            for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(summed.view_as(g))

    def same_as_main(self, value):
        """The main process's value (a picklable object), in every process."""
        if self.count == 1:
            return value
        holder = [value]
        with _talking():
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def same_weights_as_main(self, module: torch.nn.Module) -> None:
        """The main process's weights in every process (each built its model from the same seed; this makes sure)."""
        if self.count == 1:
            return
        with _talking():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def check_same_records(self, source: str, ids: list[str], skipped: dict[str, int]) -> None:
        """Every process must have kept the records of `source` the main one kept (their ids, in order): one
        missing an image the others read would train on other batches, and the run would silently compute
        something no single process would. Each process learns of any difference, so all stop together."""
        if self.count == 1:
            return
        mine = (len(ids), hashlib.sha256("\n".join(ids).encode()).hexdigest(), skipped)
        everyone = [None] * self.count
        with _talking():
            dist.all_gather_object(everyone, mine)
        for rank, (kept, digest, reasons) in enumerate(everyone):
            if digest != everyone[0][1]:
                why = ", ".join(f"{count} {reason}" for reason, count in reasons.items()) or "none skipped"
                raise DataError(f"{source}: process {rank} kept {kept} records ({why}) where process 0 kept "
                                f"{everyone[0][0]}; expected every process to read the same data (the same files "
                                f"and images, on a file system they share)")

    def wait_for_all(self) -> None:
        if self.count > 1:
            with _talking():
                dist.barrier()


SINGLE = Processes()


# what gloo says when the process at the other end of a connection has gone
PEER_GONE = re.compile(r"closed by peer|reset by peer|Connection (closed|reset)|Broken pipe|Read error|Write error")


@contextlib.contextmanager
def _talking():
    """An exchange between the processes. When another process has stopped (its error, Ctrl-C, kill), gloo raises
    here at once: that is said in one line, the other process's own message being the one that says why."""
    try:
        yield
    except RuntimeError as e:  # gloo's "Connection closed by peer", "Read error", … (a plain RuntimeError)
        if not PEER_GONE.search(str(e)):  # this process's own error, or a timeout: as it is
            raise
        # the first sentence, without gloo's source location: "Read error [127.0.0.1]:23949: Connection reset by peer"
        what = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split(". ")[0].splitlines()[0] if str(e).strip() \
            else type(e).__name__
        # a process killed outright (SIGKILL, out of memory) leaves no message: torchrun's summary names its signal
        raise ProcessGroupError(f"another process of this run stopped ({what}); its own message says why, or, if it "
                                f"was killed, torchrun's summary of the failed processes") from e


def _buckets(grads: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket, size = [], 0
    for g in grads:
        bucket.append(g)
        size += g.numel()
        if size >= BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def join() -> Processes:
    """The run's processes: those torchrun started (its WORLD_SIZE, RANK and rendezvous in the environment), whose
    process group this joins; else this process alone."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    if count == 1:
        return SINGLE
    joined = not dist.is_initialized()
    if joined:  # torchrun's environment says where to meet
        # torch 2.13: importing torch._inductor while a process group exists keeps references to the group that
        # destroy_process_group does not drop. Building the run's optimizer imports it (add_param_group is wrapped
        # by torch._disable_dynamo, which imports torch._dynamo, which imports torch._inductor), so the group's gloo
        # threads outlived leave(), and one still releasing a collective's tensors when the interpreter shut down
        # needed the GIL there and aborted the process ("terminate called without an active exception": about 1
        # torchrun run in 10 on a busy machine). Imported before the group exists, nothing holds it, and leave()
        # ends its threads.
        import torch._dynamo  # noqa: F401
        # the others wait while the main process alone trains the tokenizer or saves a checkpoint, which can take
        # longer than gloo's default half hour on a big run (a process that dies is noticed at once regardless)
        dist.init_process_group("gloo", timeout=PATIENCE)
    return Processes(rank=dist.get_rank(), count=dist.get_world_size(), joined=joined)


def leave(processes: Processes) -> None:
    """Leave the process group join() made (one the caller made stays theirs)."""
    if processes.joined and dist.is_initialized():
        dist.destroy_process_group()
