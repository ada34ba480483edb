"""How a torchrun job's ranks share the work: DDP detected from RANK, so one file runs under `python` and `torchrun`
(on one node or several); FSDP2 sharding as a setting; the reductions and broadcasts every decision is taken on; the
checks that ranks agree; what one rank holds in memory. Imports only cli.py, the floor, for its errors.
"""
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import ConfigError, Diverged


PARALLEL = ("ddp", "fsdp", "hsdp")  # the --parallel choices: see setup_distributed


@dataclass
class Dist:
    rank: int = 0
    ranks: int = 1        # processes in the job (torch's "world size")
    device: str = "cpu"
    mesh: object = None   # the device mesh the weights are sharded over (FSDP2); None: every rank holds them whole

    @property
    def main(self):
        return self.rank == 0

    @property
    def sharded(self):
        return self.mesh is not None


def setup_distributed(device="auto", parallel="ddp"):
    """One process, or a torchrun job (RANK set; one node or several): gloo on CPU, nccl on GPU. parallel:
    'ddp'  every rank holds the whole policy, reference, EMA and optimizer state, and gradients are averaged;
    'fsdp' FSDP2: every rank holds 1/ranks of each (a 1-D mesh over all ranks), gathered block by block as used;
    'hsdp' FSDP2 within a node, replicas across nodes (a 2-D mesh: nodes x ranks per node): the gathers stay on
    the fast links inside a node, and only the gradient mean crosses nodes."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if parallel not in PARALLEL:
        raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but this machine has no usable CUDA GPU; use --device=cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return Dist(0, 1, device)
    rank, ranks, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    mesh = None
    if parallel != "ddp" and ranks > 1:
        import torch.distributed.fsdp as fsdp
        if not hasattr(fsdp, "fully_shard"):   # public from torch 2.6; tested on 2.13
            raise ConfigError(f"--parallel={parallel} needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}: "
                              f"use --parallel=ddp, or torch 2.13 (`make setup TORCH=torch==2.13.0`)")
        from torch.distributed.device_mesh import init_device_mesh
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
        shape, names = ((ranks // per_node, per_node), ("replicate", "shard")) if parallel == "hsdp" else ((ranks,), ("shard",))
        mesh = init_device_mesh(torch.device(device).type, shape, mesh_dim_names=names)
    return Dist(rank, ranks, device, mesh)


def shard(d: Dist, *nets):
    """FSDP2 on each net: every unit a policy names (net.shard_units(): its blocks, then itself) is fully_shard-ed
    over d.mesh, so its weights, their EMA and AdamW moments live 1/ranks per rank, and a forward gathers one unit
    at a time. Copies (EMA, reference, sampler) are made before this, each sharded alike. A net without units (a
    LoRA policy's adapter-off view of itself) shares the policy's. Every forward of a sharded net is a collective:
    all ranks run it (the stages evaluate and sample hand-offs on every rank; rank 0 writes)."""
    if not d.sharded:
        return
    from torch.distributed.fsdp import fully_shard
    for net in nets:
        for unit in (net.shard_units() if hasattr(net, "shard_units") else []):
            # True, said outright, reshards the outermost unit after a forward too (left to its default, FSDP2 keeps
            # it whole for the backward): between passes every weight is its shard, even in a copy that only samples,
            # so the EMA, the rollback, the sampler's refresh and the checkpoint all read and write the shards
            fully_shard(unit, mesh=d.mesh, reshard_after_forward=True)


def whole(t):
    """The whole tensor of a (possibly sharded) weight or optimizer state: a collective when sharded."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shaped_like(full, own):
    """A whole tensor (from a file) laid out as `own` is: this rank's shard of it when `own` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(own, DTensor):  # every rank read the whole file: each cuts its own shard, nothing is sent
        return distribute_tensor(full.to(own.device), own.device_mesh, own.placements, src_data_rank=None)
    return full


def teardown(d: Dist):
    """Leave the process group together. A rank that tears down while another still works (rank 0 writing the
    hand-off) closes gloo's connections under it, and one aborting rank makes torchrun kill the others."""
    if d.ranks > 1:
        dist.barrier()
        dist.destroy_process_group()


def memory_use(d: Dist, nets, opt):
    """What one rank holds, in MB: the weights of `nets` (policy, EMA, reference...; a tensor they share counted once)
    and the optimizer's state, its shards only when sharded; and the process's peak over the run, the largest over
    ranks (resident memory on a CPU, allocated memory on a GPU)."""
    from torch.distributed.tensor import DTensor
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    seen, held = set(), {"weights": 0, "optimizer": 0}
    tensors = [("weights", t) for n in nets for t in (*n.parameters(), *n.buffers())]
    tensors += [("optimizer", v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for kind, t in tensors:
        t = local(t)
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            held[kind] += t.numel() * t.element_size()
    if torch.device(d.device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(d.device)
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports kB
    peak = torch.tensor(float(peak), dtype=torch.float64)
    if d.ranks > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {f"{k}_mb_per_rank": round(v / 2 ** 20, 3) for k, v in held.items()} | {"peak_mb": round(peak.item() / 2 ** 20, 1)}


def check_ranks_agree(model, d: Dist):
    """Ranks that hold the same weights must end with them equal (each applied the same averaged gradients and
    decisions): compare float64 checksums and refuse to hand off if two differ. Under DDP that is every rank; under
    hsdp the ranks holding the same shard, one per node; under fsdp each shard lives on one rank only."""
    if d.ranks == 1:
        return
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
        part = d.mesh.get_local_rank("shard") if d.sharded else 0                     # which shard this rank holds
        mine = torch.stack([sum(p.double().sum() for p in local), sum(p.double().abs().sum() for p in local),
                            torch.tensor(float(part), dtype=torch.float64)])
    every = [torch.zeros_like(mine) for _ in range(d.ranks)]
    dist.all_gather(every, mine)
    first = {}
    for e in every:                                          # the first holder of each shard against the others
        if not torch.equal(first.setdefault(float(e[2]), e), e):
            raise Diverged(f"the ranks ended with different weights (checksums {[e.tolist() for e in every]}); "
                           f"a decision was taken on one rank's own statistics")


def make_logger(d: Dist):
    from tqdm import tqdm
    return (lambda msg: tqdm.write(str(msg))) if d.main else (lambda msg: None)


def all_mean(x, d: Dist):
    """Mean of a tensor over ranks (identity on one process)."""
    if d.ranks > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.ranks
    return x


def from_rank0(value, d: Dist):
    """rank 0's float on every rank: decisions (stop, skip) are taken once, not by each rank on its own view."""
    if d.ranks == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, 0)
    return t.item()


def mean_over_ranks(value, d: Dist):
    """A float's mean over ranks, reduced in float64: what a decision every rank takes alike is taken on."""
    return all_mean(torch.tensor(value, dtype=torch.float64), d).item()


def rank_slice(n, d: Dist):
    """This rank's consecutive share of n items split evenly over the ranks."""
    share = n // d.ranks
    return slice(d.rank * share, (d.rank + 1) * share)


def rows_of_rank(rows, mine):
    """Of a minibatch's global rows (indices), those in this rank's slice `mine`, as indices into it."""
    return rows[(rows >= mine.start) & (rows < mine.stop)] - mine.start


def on_shard(n, d: Dist, stats, run):
    """run(stats) on this rank's n rows of a minibatch; its loss. A rank with no row adds nothing (zeros
    to the gradients' all-reduce), except sharded: each forward gathers weights with every rank, so it
    runs its passes anyway (the caller hands them one row weighted 0: a network may refuse an empty
    batch) and their statistics are dropped."""
    if n:
        return run(stats)
    if d.sharded:
        return run(defaultdict(list))
    return 0.0


def average_gradients(params, d: Dist):
    """Mean the gradients over ranks by hand: the loop calls the model several times per update (CFG halves,
    several denoising steps), which DDP's one-forward-one-backward hooks do not fit. A rank that had no
    sample in this minibatch contributes zeros, so every rank joins every all_reduce. Frozen weights (a LoRA
    policy's base) are skipped: they have no gradient to agree on. Sharded weights arrive averaged: FSDP2's
    backward reduce-scatters each unit's gradients as it goes."""
    if d.ranks > 1 and not d.sharded:
        for p in (p for p in params if p.requires_grad):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= d.ranks


def gather_rows(x, d: Dist):
    """Every rank's x (n, ...) stacked in rank order, (ranks * n, ...), on every rank; x itself with one rank."""
    if d.ranks == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(d.ranks)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


if __name__ == "__main__":   # a library module; a command that once lived here says where it went
    import sys
    print("error: distributed.py takes no command: launch a stage under torchrun (see the "
          "README's Scale out)", file=sys.stderr)
    sys.exit(2)
