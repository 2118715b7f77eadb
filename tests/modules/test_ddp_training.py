"""DPO and KTO trained under 2-process DDP equal one process trained on the same global batches.

Each algorithm trains the tiny policy twice, in fp32 ("32-true") on CPU, for `STEPS` optimizer steps,
then validates once: (a) under Lightning's `strategy="ddp", accelerator="cpu", devices=2` with gloo and
`PER_DEVICE` examples per process, and (b) in one process with 2 * `PER_DEVICE` examples per step. The
two DDP ranks are started by `torch.multiprocessing.spawn` with the environment that Lightning's `ddp`
launcher gives the processes it starts (MASTER_ADDR/PORT, NODE_RANK, LOCAL_RANK, WORLD_SIZE), so each
rank runs the Trainer a rank of `bench train --trainer.strategy=ddp --trainer.devices=2` runs (the
launcher itself re-runs `sys.argv`, which under pytest is pytest; the last test runs `bench train` so). One spawn trains DPO, then KTO, so the
two processes import torch and Lightning once. Every run starts with an empty reference log-prob cache,
so the DDP runs compute it split across the ranks (`AlignmentModule.cache_reference_logps`, gathered with
`all_gather_objects`); the cache each run wrote is compared too.

How both runs get the same data at every step. The datamodule's train sampler (`GlobalBatchSampler`, a
DistributedSampler, which Lightning keeps as it is) draws one order for the global batch from
`data.seed` + epoch, grouped by length in mega-batches of the global batch, and gives rank r positions
r, r + 2, r + 4, ...: the two ranks' step-k batches of B are together the single process's step-k batch
of 2B. The test checks this precondition row by row (token ids, and KTO's desirable flag) before it
compares numbers.

What then has to hold: the loss is a mean over examples, and DDP averages the gradients of two equal
halves, so the gradient, and with it every weight, equals the single process's; a per-step metric over
the whole batch is a `sync_dist` mean of two per-rank means over equal halves, which is the global mean.
KTO's KL reference point must be the mean over the global batch's mismatched completions, and its
metrics over the desirable or undesirable rows average over per-rank subsets of unequal size, so they
must be reduced across ranks as sums and counts, not as a mean of per-rank means. "Equal" is float32
equality up to summation order and padding width: see RTOL, LOGRATIO_SPACINGS and UPDATE_RTOL.
"""

import contextlib
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import datasets
import lightning.pytorch as L
import mlflow
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import load_file

from bench.core.models import resolve as resolve_model
from datamodules.hh_datamodule import HHRLHFDataModule
from modules import DPO, KTO

SEED = 0
PER_DEVICE = 2  # examples per process per step under DDP; the single process takes twice as many
STEPS = 3
LR = 1e-3  # large enough that log-ratios, rewards and KTO's KL move well away from 0 within STEPS
TRAIN_PAIRS, VAL_PAIRS = 16, 4
ALGORITHMS = {"dpo": DPO, "kto": KTO}
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
METRICS = {"dpo": [*METRICS, "rewards/accuracies"], "kto": [*METRICS, "kl"]}
BETA = 0.1
RTOL, ATOL = 1e-5, 1e-7
# Rewards (beta * log-ratio), margins and KTO's KL are differences of two summed log-probs of about -520
# (~48 response tokens at ~ln(49k) each under the random-init policy), where float32 numbers are
# 2**-15 ~ 3e-5 apart. The two runs pad their batches to different widths and sum the same gradients in
# another order, so those sums agree only to about one such spacing (the logps themselves to ~1e-7
# relative), and a log-ratio of ~0.05 inherits that absolute error: relative to the log-ratio it is
# ~1e-3. Those metrics are compared to RTOL plus LOGRATIO_SPACINGS spacings of the log-probs they
# are differences of, which is still ~100 times finer than the errors these tests are for (a mean of
# per-rank means over unequal subsets, or a per-rank KL, moves them by ~1e-2 of their value).
LOGRATIO_SPACINGS = 8
UPDATE_RTOL = 1e-4  # for the trained weights: see the test


class MetricsRecorder(Logger):
    """Every metric dict the trainer logs (on rank 0, as any logger), one JSON line per call."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")


class BatchRecorder(L.Callback):
    """The rows each process trains on at each step: a hash of each row's unpadded token ids (and of its
    mismatched completion's, for KTO), and KTO's desirable flag."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = []
        for i in range(len(batch["input_ids"])):
            tokens = [batch[f"{p}input_ids"][i][batch[f"{p}attention_mask"][i].bool()].tolist()
                      for p in ("", "kl_") if f"{p}input_ids" in batch]
            row = {"tokens": hashlib.blake2b(json.dumps(tokens).encode(), digest_size=8).hexdigest()}
            if "desirable" in batch:
                row["desirable"] = bool(batch["desirable"][i])
            rows.append(row)
        with (self.folder / f"rows.{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(rows) + "\n")


@dataclass
class Run:
    train: list[dict]  # the train metrics logged at each step
    val: dict  # the validation metrics logged at the end (epoch means)
    rows: list[list[list[dict]]]  # rank -> step -> rows
    weights: dict[str, torch.Tensor]  # the trained policy, as saved
    reference_logps: dict[str, float]  # the reference log-prob cache the run wrote
    seconds: float


@contextlib.contextmanager
def environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(algorithm: str, hh_path: str, folder: Path, devices: int) -> None:
    """Train, validate once, and leave the logged metrics, the rows of every step, the policy and the
    reference log-prob cache in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    module = ALGORITHMS[algorithm](policy="tiny", lr=LR, beta=BETA)
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view=module.data_view, max_length=96, max_prompt_length=48,
                          batch_size=PER_DEVICE * 2 // devices, max_train_pairs=TRAIN_PAIRS, max_val_pairs=VAL_PAIRS,
                          seed=SEED)
    # A collective that one rank never joins fails after the timeout instead of hanging the test.
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, precision="32-true", max_epochs=1,
                        limit_train_batches=STEPS, num_sanity_val_steps=0, log_every_n_steps=1,
                        logger=MetricsRecorder(folder / "metrics.jsonl"), callbacks=[BatchRecorder(folder)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=folder)
    started = time.perf_counter()
    # An empty cache: this run computes every reference log-prob (split across the ranks under DDP).
    with environment(BENCH_REFERENCE_CACHE=str(folder / "reference_logps")):
        trainer.fit(module, datamodule=dm)
    if trainer.is_global_zero:
        (folder / "seconds").write_text(str(time.perf_counter() - started))


def ddp_worker(rank: int, port: int, jobs: list[tuple[str, str, Path]]) -> None:
    """One rank, with the environment Lightning's `ddp` launcher gives the processes it starts."""
    with environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                     WORLD_SIZE="2"):
        for algorithm, hh_path, folder in jobs:
            train(algorithm, hh_path, folder, devices=2)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_run(folder: Path, devices: int) -> Run:
    logged = read_jsonl(folder / "metrics.jsonl")
    [val] = [m for m in logged if "val/loss" in m]
    [cache] = [p for p in (folder / "reference_logps").iterdir() if p.is_dir()]  # one reference, one setting
    reference_logps = {}
    for shard in sorted(cache.glob("shard-*")):
        rows = datasets.load_from_disk(str(shard))
        reference_logps.update(zip(rows["key"], rows["logp"]))
    return Run(train=[m for m in logged if "train/loss" in m], val=val,
               rows=[read_jsonl(folder / f"rows.{rank}.jsonl") for rank in range(devices)],
               weights=load_file(folder / "policy" / "model.safetensors"), reference_logps=reference_logps,
               seconds=float((folder / "seconds").read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(hh_path, tmp_path_factory) -> dict[str, Run]:
    """DPO, then KTO, under 2-process DDP, in one pair of processes."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [(algorithm, hh_path, root / algorithm) for algorithm in ALGORITHMS]
    started = time.perf_counter()
    mp.spawn(ddp_worker, args=(free_port(), jobs), nprocs=2, join=True)
    print(f"DDP: {time.perf_counter() - started:.1f} s for both algorithms, processes included")
    return {algorithm: read_run(folder, devices=2) for algorithm, _, folder in jobs}


def tolerance(name: str, expected: float, logp_scale: float) -> float:
    """How far apart a metric of the two runs may be (see LOGRATIO_SPACINGS)."""
    logratio = LOGRATIO_SPACINGS * float(np.spacing(np.float32(logp_scale)))
    return RTOL * abs(expected) + {"rewards": BETA * logratio, "kl": logratio}.get(name.split("/")[0], ATOL)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_ddp_training_equals_one_process_on_the_global_batch(algorithm, ddp_runs, hh_path, tmp_path):
    train(algorithm, hh_path, tmp_path, devices=1)
    single, ddp = read_run(tmp_path, devices=1), ddp_runs[algorithm]
    print(f"{algorithm}: one process {single.seconds:.1f} s, DDP {ddp.seconds:.1f} s (fit only)")

    # The precondition: at every step the two ranks' rows together are the single process's rows.
    assert len(single.rows[0]) == len(ddp.rows[0]) == len(ddp.rows[1]) == STEPS
    for step in range(STEPS):
        halves = [ddp.rows[rank][step] for rank in (0, 1)]
        assert len(halves[0]) == len(halves[1]) == len(single.rows[0][step]) // 2
        assert sorted(map(json.dumps, halves[0] + halves[1])) == sorted(map(json.dumps, single.rows[0][step])), step
    if algorithm == "kto":
        desirable = [[sum(row["desirable"] for row in ddp.rows[rank][step]) for rank in (0, 1)]
                     for step in range(STEPS)]
        # The cases that per-rank statistics get wrong: ranks whose desirable (or undesirable) subsets differ
        # in size, and a rank whose rows are all of one kind, so that it has no statistic for the other.
        assert any(counts[0] != counts[1] for counts in desirable), desirable
        assert any(count in (0, PER_DEVICE) for counts in desirable for count in counts), desirable

    # Every per-step train metric and the validation means.
    assert len(single.train) == len(ddp.train) == STEPS
    pairs = {f"step {step} train/{name}": (got.get(f"train/{name}"), expected.get(f"train/{name}"))
             for step, (expected, got) in enumerate(zip(single.train, ddp.train)) for name in METRICS[algorithm]}
    pairs |= {f"val/{name}": (ddp.val.get(f"val/{name}"), single.val.get(f"val/{name}")) for name in METRICS[algorithm]}
    missing = [where for where, values in pairs.items() if None in values]
    assert not missing, f"not logged by both runs: {missing}"
    logp_scale = max(abs(value) for where, (_, value) in pairs.items() if "/logps/" in where and not math.isnan(value))
    differences = {}
    for where, (got, expected) in pairs.items():
        name = where.split("/", 1)[1]
        if math.isnan(got) and math.isnan(expected):  # both runs: a statistic over none of that step's rows
            differences[where] = (got, expected, 0.0, 0.0)
        else:
            differences[where] = (got, expected, abs(got - expected), tolerance(name, expected, logp_scale))
        print(f"  {where}: DDP {got!r}, one process {expected!r}, difference {differences[where][2]:.2g} "
              f"(tolerance {differences[where][3]:.2g})")
    mismatched = {where: values[:2] for where, values in differences.items() if not values[2] <= values[3]}
    assert not mismatched, f"DDP differs from one process (DDP, one process): {mismatched}"
    if algorithm == "kto":  # the KL reference point is not clamped to 0 at every step, so its value is compared
        assert sum(single.train[step]["train/kl"] > 1e-2 for step in range(STEPS)) >= 2

    # The trained weights, through the update each run made to the initial ones (~STEPS * LR per weight).
    # AdamW divides each gradient by its own running magnitude, so a weight whose gradient is nearly 0
    # (a sum that cancels) takes a step of up to LR from a gradient that is mostly float noise; such
    # weights differ by up to a few percent of LR. The whole update agrees to UPDATE_RTOL.
    initial = load_file(Path(resolve_model("tiny")) / "model.safetensors")
    assert single.weights.keys() == ddp.weights.keys() == initial.keys()
    single_update = torch.cat([(single.weights[k] - initial[k]).flatten() for k in initial])
    ddp_update = torch.cat([(ddp.weights[k] - initial[k]).flatten() for k in initial])
    update_difference = ((ddp_update - single_update).norm() / single_update.norm()).item()
    largest = (ddp_update - single_update).abs().max().item()
    print(f"  weights: update norm {single_update.norm().item():.3g}, relative difference {update_difference:.2g}, "
          f"largest difference {largest:.2g} = {largest / LR:.2g} LR")
    assert update_difference <= UPDATE_RTOL
    assert largest <= 0.1 * LR

    # The reference log-prob cache that the DDP ranks computed between them.
    assert ddp.reference_logps.keys() == single.reference_logps.keys()
    keys = sorted(single.reference_logps)
    print("  max reference log-prob difference",
          max(abs(ddp.reference_logps[k] - single.reference_logps[k]) for k in keys))
    torch.testing.assert_close(torch.tensor([ddp.reference_logps[k] for k in keys]),
                               torch.tensor([single.reference_logps[k] for k in keys]), rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_bench_train_launches_ddp_processes_that_share_one_run(tmp_path, hh_path):
    """`bench train --trainer.devices=2 --trainer.strategy=ddp`: Lightning's launcher reruns the command in a
    second process, which must train in rank 0's run directory and leave the run's records to rank 0."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "bench.cli", "train", "dpo", "--recipe", "tiny", f"--data.path={hh_path}",
                           "--trainer.devices=2", "--trainer.strategy=ddp", "--eval", "false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert (run_dir / "policy" / "model.safetensors").exists()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["output_path"] == str((run_dir / "policy").resolve())
    assert run.info.run_name.startswith("dpo · seed ")  # what, seed and budget at a glance
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2, 3]
