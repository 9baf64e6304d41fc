"""Ranks started by torchrun on two "hosts" (two torchrun agents on 127.0.0.1 sharing one
rendezvous, 2 + 1 processes) join the server and compute the single-process frames bit for bit:
the documented multi-host command, run on the CPU with gloo."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.api import SessionParams
from engine.parallel.channel import KEY_ENV
from engine.parallel.engine import ParallelEngine
from tests.conftest import REPO
from tests.engine.parallel.conftest import THREADS, reference_blocks, run_scenario, tiny_config

SCENARIO = [("blocks", 3), ("seek", 5), ("blocks", 6)]  # a seek, and the refresh at block 9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(nproc: int, rdzv: int, server: int, key: str) -> subprocess.Popen:
    env = {**os.environ, KEY_ENV: key, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
         "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "--max-restarts", "0",
         "-m", "engine.parallel.entry", "--server", f"127.0.0.1:{server}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ranks_on_two_hosts_started_by_torchrun(tiny_models, tiny_ckpt_master, example_image,
                                                example_audio, monkeypatch) -> None:  # noqa: ANN001
    audio = example_audio[:16000 * 8]
    params = SessionParams(image=example_image, size="64*64", seed=4)
    want = reference_blocks(tiny_models, tiny_ckpt_master, params, audio, SCENARIO)
    key = secrets.token_hex(32)
    monkeypatch.setenv(KEY_ENV, key)
    server = free_port()
    config = tiny_config(tiny_ckpt_master, layout="2+vae", group_launch="torchrun",
                         group_listen=f"127.0.0.1:{server}", group_start_timeout_s=120.0)
    engine = ParallelEngine(config, threads=THREADS)  # listening before the ranks start
    rdzv = free_port()
    hosts = [torchrun(2, rdzv, server, key), torchrun(1, rdzv, server, key)]
    try:
        engine.start()
        session = engine.open_session(params)
        got = run_scenario(session, audio, engine.max_in_flight, SCENARIO)
        session.close()
        assert [b.index for b in got] == [0, 1, 2, *range(5, 11)]
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g.frames, w.frames), f"block {g.index} differs"
    finally:
        engine.close()  # the ranks stop, then their agents exit
        logs = []
        end = time.monotonic() + 60
        for p in hosts:
            try:
                out, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            logs.append(out)
    assert [p.returncode for p in hosts] == [0, 0], "\n".join(x[-3000:] for x in logs)


@pytest.mark.parametrize("argv, needle", [
    (["--server", "127.0.0.1:1"], "AVATAR_GROUP_KEY"),
    (["--server", "nowhere"], "--server HOST:PORT"),
])
def test_the_torchrun_entry_point_says_what_it_needs(argv: list, needle: str, monkeypatch,
                                                     capsys) -> None:  # noqa: ANN001
    from engine.parallel.entry import cli

    monkeypatch.delenv(KEY_ENV, raising=False)
    for name in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        monkeypatch.setenv(name, "unset by the test")  # (restored afterwards)
    assert cli(argv) == 2
    assert needle in capsys.readouterr().err
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
