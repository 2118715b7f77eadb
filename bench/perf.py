"""`bench perf`: DPO in this harness against TRL's `DPOTrainer`, on the same model, pairs, batches and settings.

Four variants, each in its own process so that peak memory is its own:

- harness-cold: this harness with an empty reference log-prob cache (it scores the pairs once, then trains);
- harness-warm: the same run again, served by that cache (the reference is never loaded);
- trl: TRL's DPOTrainer as it comes, but with our tokenized pairs in our batch order and no gradient
  checkpointing (TRL turns it on by default; it trades speed for memory, which is not what is compared);
- trl-precompute: the same with `precompute_ref_log_probs=True`.

Aligned: policy, tokenized pairs and their order (TRL gets the harness's rows, in the order of its
length-grouped sampler), batch size, lengths, precision, steps, AdamW (torch, not fused), constant lr, no
warmup, gradient clipping at 1.0, beta, seed. Each variant is timed from loading the policy to the end of
training: reference set-up and any precompute included.

MFU = (6 * params * training tokens + 2 * params * reference tokens) / seconds / peak, where the peak is
the best bf16 (or fp32) matmul rate measured when the variant's process starts.
"""

import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

VARIANTS = ("harness-cold", "harness-warm", "trl", "trl-precompute")


@dataclass(frozen=True)
class PerfSettings:
    data_path: str = "../shared/data/hh-rlhf"
    policy: str = "smollm2-135m-instruct"
    steps: int = 8
    batch_size: int = 8
    max_length: int = 512
    max_prompt_length: int = 256
    lr: float = 5e-5
    beta: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "bf16-mixed"

    @property
    def pairs(self) -> int:
        return self.steps * self.batch_size


def matmul_peak_flops(bf16: bool, size: int = 2048, repeats: int = 8, trials: int = 8, warmup_s: float = 2.0) -> float:
    """The best FLOP/s of square matmuls in the training dtype: the denominator of MFU."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    started = time.perf_counter()
    while time.perf_counter() - started < warmup_s:  # thread pool, kernel selection, the cores' clocks
        a @ b
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def harness_datamodule(settings: PerfSettings):
    from datamodules.hh_datamodule import HHRLHFDataModule

    dm = HHRLHFDataModule(path=settings.data_path, tokenizer=settings.policy, view="paired",
                          max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
                          batch_size=settings.batch_size, max_train_pairs=settings.pairs, max_val_pairs=1,
                          seed=settings.seed)
    dm.setup("fit")
    return dm


def pair_tokens(rows) -> int:
    """Tokens of the chosen and rejected sequences: what the policy trains on and the reference scores."""
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


def run_harness(settings: PerfSettings, dm) -> dict:
    import lightning.pytorch as L

    from modules import DPO

    class LossRecorder(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    L.seed_everything(settings.seed, verbose=False)
    recorder = LossRecorder()
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        module = DPO(policy=settings.policy, beta=settings.beta, lr=settings.lr, optimizer="adamw", warmup_steps=0)
        trainer = L.Trainer(accelerator="auto", devices=1, precision=settings.precision, max_steps=settings.steps,
                            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, gradient_clip_val=settings.max_grad_norm,
                            callbacks=[recorder], default_root_dir=run_dir)
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "losses": recorder.losses, "model": module.policy}


def run_trl(settings: PerfSettings, dm, precompute: bool) -> dict:
    import transformers
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    from bench.models import load_causal_lm, load_tokenizer

    class AlignedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized, exactly as the harness tokenizes it

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # already in the harness's batch order

    transformers.set_seed(settings.seed)
    order = list(iter(dm.train_dataloader().sampler))
    rows = dm.views["train"].select(order).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir, per_device_train_batch_size=settings.batch_size, max_steps=settings.steps,
            learning_rate=settings.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            weight_decay=0.0, max_grad_norm=settings.max_grad_norm, bf16=settings.precision == "bf16-mixed",
            use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, beta=settings.beta,
            max_length=settings.max_length, precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=2 * settings.batch_size, logging_steps=1, report_to=[], save_strategy="no",
            seed=settings.seed, dataloader_num_workers=0,
        )
        started = time.perf_counter()
        trainer = AlignedDPOTrainer(model=load_causal_lm(settings.policy), args=args, train_dataset=rows,
                                    processing_class=load_tokenizer(settings.policy))
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "losses": losses, "model": trainer.model}


def run_variant(variant: str, settings: PerfSettings, reference_cache: str) -> dict:
    """One variant, in a fresh process: the peak, the run, and that process's peak RSS."""
    os.environ["BENCH_REFERENCE_CACHE"] = reference_cache
    torch.manual_seed(settings.seed)
    peak = matmul_peak_flops(settings.precision == "bf16-mixed")
    dm = harness_datamodule(settings)
    tokens = pair_tokens(dm.views["train"])
    if variant.startswith("harness"):
        result = run_harness(settings, dm)
    else:
        result = run_trl(settings, dm, precompute=variant == "trl-precompute")
    params = sum(p.numel() for p in result["model"].parameters())
    reference_tokens = 0 if variant == "harness-warm" else tokens
    seconds = result["seconds"]
    return {
        "variant": variant,
        "seconds": seconds,
        "pairs_per_s": settings.pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": (6 * params * tokens + 2 * params * reference_tokens) / seconds / peak,
        "peak_flops": peak,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": result["losses"][-1] if result["losses"] else float("nan"),
        "losses": result["losses"],
        "params": params,
        "training_tokens": tokens,
    }


def _child(variant: str, settings: PerfSettings, reference_cache: str, queue) -> None:
    os.dup2(2, 1)  # trainers print progress and logs to stdout; keep it for the report (and --json)
    sys.stdout = sys.stderr
    try:
        queue.put(run_variant(variant, settings, reference_cache))
    except BaseException as err:  # report it to the parent, which names the variant
        queue.put({"variant": variant, "error": f"{type(err).__name__}: {err}"})
        raise


def perf(settings: PerfSettings, variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    """Each variant in order, each in a spawned process; the warm variant reuses the cold one's cache."""
    from bench.errors import BenchError

    context = multiprocessing.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-perf-reference-cache-") as reference_cache:
        for variant in variants:
            queue = context.Queue()
            process = context.Process(target=_child, args=(variant, settings, reference_cache, queue))
            process.start()
            result = queue.get()
            process.join()
            if "error" in result:
                raise BenchError(f"bench perf: variant {variant} failed: {result['error']}")
            results.append(result)
            print(f"{variant}: {result['pairs_per_s']:.3f} pairs/s, final loss {result['final_loss']:.4f}",
                  file=sys.stderr, flush=True)
    return results


def ratios(results: list[dict]) -> dict[str, float]:
    by_variant = {r["variant"]: r for r in results}

    def ratio(a: str, b: str) -> float | None:
        return by_variant[a]["pairs_per_s"] / by_variant[b]["pairs_per_s"] if a in by_variant and b in by_variant else None

    return {
        "warm / trl": ratio("harness-warm", "trl"),
        "cold / trl-precompute": ratio("harness-cold", "trl-precompute"),
        "cold / trl": ratio("harness-cold", "trl"),
        "warm / trl-precompute": ratio("harness-warm", "trl-precompute"),
    }


def loss_gap(results: list[dict]) -> float | None:
    """Relative gap of final losses, harness (cold) against TRL (default)."""
    by_variant = {r["variant"]: r for r in results}
    if "harness-cold" not in by_variant or "trl" not in by_variant:
        return None
    ours, theirs = by_variant["harness-cold"]["final_loss"], by_variant["trl"]["final_loss"]
    return abs(ours - theirs) / abs(theirs)


def markdown(results: list[dict], settings: PerfSettings, command: str) -> str:
    from bench import tracking
    from bench.table import machine

    lines = [
        "# DPO speed: this harness against TRL's DPOTrainer",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {machine()}  ",
        f"Commit: {tracking.git_commit()}  ",
        f"Settings: {settings.policy}, {settings.steps} steps of {settings.batch_size} pairs, lengths "
        f"{settings.max_length}/{settings.max_prompt_length}, {settings.precision}, AdamW lr {settings.lr}, "
        f"beta {settings.beta}, seed {settings.seed}",
        "",
        "| variant | seconds | pairs/s | training tokens/s | MFU | matmul peak (TFLOP/s) | peak RSS (GiB) | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['variant']} | {r['seconds']:.1f} | {r['pairs_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu']:.1f} % | {r['peak_flops'] / 1e12:.2f} | {r['peak_rss_gb']:.1f} | "
                     f"{r['final_loss']:.5f} |")
    lines.append("")
    for name, value in ratios(results).items():
        if value is not None:
            lines.append(f"- pairs/s {name}: **{value:.2f}x**")
    gap = loss_gap(results)
    if gap is not None:
        lines.append(f"- final loss, harness vs TRL after {settings.steps} steps: {100 * gap:.2f} % apart")
    return "\n".join(lines)


def report(results: list[dict], settings: PerfSettings) -> dict:
    return {"settings": asdict(settings), "results": results, "ratios": ratios(results),
            "final_loss_gap": loss_gap(results)}


def dumps(results: list[dict], settings: PerfSettings) -> str:
    return json.dumps(report(results, settings), indent=1)
