"""A rank's process entry point, torch-free until the environment is set.

NVLink multicast stays off in every process of a group (NCCL, PyTorch symmetric memory and
NVSHMEM): on shared GPU hosts a program that uses it can put the GPUs out of service. The
variables are forced here, before torch is imported, whoever started the process.

- `avatar serve` starts its ranks itself through `torch.multiprocessing` (spawn): `spawned`.
- torchrun starts them on one or several hosts: `python -m engine.parallel.entry --server
  HOST:PORT` on every node (the server's `[engine] group_listen` address; the group's key in the
  AVATAR_GROUP_KEY environment variable, hex), e.g. for `layout = "4+vae"` on two hosts:

      host A:  AVATAR_GROUP_KEY=... torchrun --nnodes 2 --nproc-per-node 3 \\
                   --rdzv-backend c10d --rdzv-endpoint HOSTA:29400 --max-restarts 100 \\
                   -m engine.parallel.entry --server HOSTA:29600
      host B:  the same with --nproc-per-node 2

  (the processes of all hosts together must be the layout's world, here 5). torchrun's
  `--max-restarts` is what brings a group back after a failure: the server closes every rank's
  socket, the ranks exit, torchrun starts them again and they join the waiting server.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def no_multicast() -> None:
    os.environ.update(NO_MULTICAST)


@dataclass(frozen=True)
class RankSpec:
    """How a rank finds its server: the control socket's address and key, and its rank when
    the server spawned it (None: torchrun's RANK)."""

    server: tuple[str, int]
    key: bytes
    rank: int | None = None
    local_rank: int | None = None


def spawned(spec: RankSpec) -> None:
    """The target of the server's spawned rank processes."""
    no_multicast()
    from engine.parallel.worker import main

    sys.exit(main(spec))


def cli(argv: list[str] | None = None) -> int:
    no_multicast()
    p = argparse.ArgumentParser(prog="python -m engine.parallel.entry",
                                description="one rank of an avatar server's GPU group, "
                                            "started by torchrun")
    p.add_argument("--server", required=True,
                   help="HOST:PORT of the server's group_listen address")
    args = p.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    key = os.environ.get("AVATAR_GROUP_KEY", "")
    if not host or not port.isdigit() or not key:
        print("error: --server HOST:PORT and the AVATAR_GROUP_KEY environment variable (the "
              "server's group key, hex) are required", file=sys.stderr)
        return 2
    from engine.parallel.worker import main

    return main(RankSpec((host, int(port)), bytes.fromhex(key),
                         local_rank=int(os.environ.get("LOCAL_RANK", "0"))))


if __name__ == "__main__":
    sys.exit(cli())
