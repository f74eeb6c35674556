"""Cost of global head BatchNorm: forward + backward of the MSN head with BatchNorm1d vs GlobalBatchNorm1d.

Runs N gloo processes on this machine (CPU) and prints milliseconds per head forward + backward,
median of the repeats, for per-process statistics and for global ones.

    python scripts/bench_sync_bn.py --processes 2 --batch 256 --dim 384
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msn.models.heads import ProjectionHead


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.processes)
    x = torch.randn(args.batch, args.dim)
    for sync in (False, True):
        head = ProjectionHead(args.dim, hidden_dim=2048, out_dim=256, num_layers=3, batchnorm=True, sync_batchnorm=sync)
        times = []
        for i in range(args.warmup + args.repeats):
            dist.barrier()
            tic = time.perf_counter()
            head(x).square().mean().backward()
            if i >= args.warmup:
                times.append(time.perf_counter() - tic)
        if rank == 0:
            name = "global (GlobalBatchNorm1d)" if sync else "per process (BatchNorm1d)"
            print(f"{name:>28}: {1e3 * statistics.median(times):7.2f} ms per head forward + backward")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch", type=int, default=256, help="rows per process (images x views)")
    p.add_argument("--dim", type=int, default=384, help="backbone width")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"{args.processes} gloo processes, head {args.dim} -> 2048 -> 2048 -> 256, {args.batch} rows each")
    mp.spawn(_worker, args=(args, port), nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
