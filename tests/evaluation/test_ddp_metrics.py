"""The win-rate metric under 2-process DDP (gloo on CPU) equals one process on the combined inputs."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.evaluation.metrics import WinRate

POLICY = torch.tensor([0.3, 1.2, -0.5, 2.0, 0.0, 0.7, 0.7, -1.0, 0.4, 1.5, 0.9, -0.2, 0.1])
BASELINE = torch.tensor([0.1, 1.5, -0.5, 1.0, 0.2, 0.7, 0.1, -2.0, 0.8, 1.4, 0.9, 0.3, -0.1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    metric = WinRate()
    # Uneven shards (7 and 6 prompts), as a DistributedSampler without padding would give.
    metric.update(POLICY[rank::world_size], BASELINE[rank::world_size])
    result = metric.compute()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_win_rate_is_the_same_under_ddp(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    single = WinRate()
    single.update(POLICY, BASELINE)
    expected = single.compute()
    assert expected["n"] == 13
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            assert json.load(f) == expected
