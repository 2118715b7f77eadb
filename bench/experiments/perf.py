"""`bench perf`: this harness's speed against the tools researchers use otherwise, in two parts.

**training**: DPO in this harness against TRL's `DPOTrainer`, on the same model, pairs, batches and settings.
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
the best bf16 (or fp32) matmul rate, measured once per invocation after a warm-up and used for every variant.

**generation**: sampling tokens/s on the same prompts and settings (by default `bench eval`'s: 64 HH test
prompts, temperature 0.7, 128 new tokens, batches of 64) for plain `model.generate` as an HF or TRL user
calls it (dynamic KV cache, autocast), for this harness's sampler (`bench.sampling.generation`), and the bound that
one weight-bound decode step sets: a decode step at batch 1 reads every weight once, so batches of B
cannot decode faster than B tokens per such step.

Every run records how busy the machine was: the CPU time that other processes used while it ran, from
/proc/stat, and the load average. A contended run says so in its table.
"""

import contextlib
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

VARIANTS = ("harness-cold", "harness-warm", "trl", "trl-precompute")
GENERATION_VARIANTS = ("generate", "harness")
PARTS = ("training", "generation")
BUSY_CORES = 0.1  # other processes using more than this many cores on average: the run was contended


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
    rows_per_forward: int | None = 4  # as the smol-hh recipe trains

    @property
    def pairs(self) -> int:
        return self.steps * self.batch_size


@dataclass(frozen=True)
class GenerationSettings:
    """What the generation part samples: `bench eval`'s defaults."""

    n_prompts: int = 64
    temperature: float = 0.7
    max_new_tokens: int = 128
    batch_size: int = 64
    seed: int = 0


def matmul_peak_flops(bf16: bool, size: int = 2048, repeats: int = 8, trials: int = 16, warmup_s: float = 5.0) -> float:
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
        module = DPO(policy=settings.policy, beta=settings.beta, lr=settings.lr, optimizer="adamw", warmup_steps=0,
                     rows_per_forward=settings.rows_per_forward)
        trainer = L.Trainer(accelerator="auto", devices=1, precision=settings.precision, max_steps=settings.steps,
                            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, gradient_clip_val=settings.max_grad_norm,
                            callbacks=[recorder], default_root_dir=run_dir)
        with contextlib.redirect_stdout(sys.stderr):  # the progress bar: stdout carries the table or --json only
            trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "losses": recorder.losses, "model": module.policy}


def run_trl(settings: PerfSettings, dm, precompute: bool) -> dict:
    import transformers
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    from bench.core.models import load_causal_lm, load_tokenizer

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
        with contextlib.redirect_stdout(sys.stderr):  # its progress and per-step logs, as for the harness
            trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "losses": losses, "model": trainer.model}


def run_variant(variant: str, settings: PerfSettings, reference_cache: str, peak: float) -> dict:
    """One training variant, in a fresh process: the run, and that process's peak RSS."""
    os.environ["BENCH_REFERENCE_CACHE"] = reference_cache
    torch.manual_seed(settings.seed)
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
        "peak_rss_gb": peak_rss_gb(),
        "final_loss": result["losses"][-1] if result["losses"] else float("nan"),
        "losses": result["losses"],
        "params": params,
        "training_tokens": tokens,
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def generation_prompts(settings: PerfSettings, generation: GenerationSettings, tokenizer) -> list[list[int]]:
    """`bench eval`'s prompts: a seeded sample of the test split, formatted as the policy samples them."""
    from bench.evaluation.evaluate import eval_pairs
    from datamodules.formatting import Formatter

    pairs = eval_pairs({"path": settings.data_path}, "test", generation.n_prompts, generation.seed)
    formatter = Formatter(tokenizer, True, settings.max_length, settings.max_prompt_length)
    return [formatter.generation_prompt_ids(pair.prompt) for pair in pairs]


def precision_context(settings: PerfSettings, device: torch.device):
    if settings.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def weight_bound_step_seconds(model, repeats: int = 20) -> float:
    """The median time of one decode step at batch 1 over an 8-token cache, in the caller's precision (autocast
    casts each weight once, at the first step, and reuses the cast): the time to read every weight once, which
    no decode step beats."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.arange(1, 9, device=model.device)[None], past_key_values=cache, use_cache=True)
    token = torch.ones((1, 1), dtype=torch.long, device=model.device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - started)
        cache.crop(-1)  # the same 8-token cache every time
    return sorted(times)[len(times) // 2]


def run_generation_variant(variant: str, settings: PerfSettings, generation: GenerationSettings) -> dict:
    """Sample `generation.n_prompts` prompts with one backend, after a short untimed warm-up."""
    from bench.core.models import load_causal_lm, load_tokenizer
    from bench.sampling.generation import SAMPLING_STATS, Sampling, sample

    model, tokenizer = load_causal_lm(settings.policy).eval(), load_tokenizer(settings.policy)
    prompts = generation_prompts(settings, generation, tokenizer)
    backend = {"generate": "hf", "harness": "harness"}[variant]
    sampling = Sampling(temperature=generation.temperature, max_new_tokens=generation.max_new_tokens,
                        batch_size=generation.batch_size, seed=generation.seed, backend=backend)
    with precision_context(settings, model.device):
        sample(model, tokenizer, prompts[:2], Sampling(max_new_tokens=8, backend=backend), desc="warm-up", leave=False)
        before = replace(SAMPLING_STATS)
        started = time.perf_counter()
        generated = sample(model, tokenizer, prompts, sampling, desc=f"{variant}: sample")
        seconds = time.perf_counter() - started
        spent = SAMPLING_STATS.since(before)
        step = weight_bound_step_seconds(model) if variant == "harness" else None
    tokens = sum(map(len, generated))
    result = {"variant": variant, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
              "prompts": len(prompts), "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
              "peak_rss_gb": peak_rss_gb()}
    if step is not None:  # where the harness's time went: prompts, then decode steps
        result.update(weight_bound_step_s=step, bound_tokens_per_s=generation.batch_size / step,
                      prefill_s=spent.prefill_seconds, decode_s=spent.decode_seconds, decode_steps=spent.decode_steps,
                      mean_step_ms=1000 * spent.decode_seconds / max(spent.decode_steps, 1),
                      mean_rows_per_step=spent.decode_rows / max(spent.decode_steps, 1))
    return result


def _child(function, args: tuple, queue) -> None:
    os.dup2(2, 1)  # trainers print progress and logs to stdout; keep it for the report (and --json)
    sys.stdout = sys.stderr
    try:
        queue.put(function(*args))
    except BaseException as err:  # report it to the parent, which names the variant
        queue.put({"variant": args[0], "error": f"{type(err).__name__}: {err}"})
        raise


def in_own_process(function, *args) -> dict:
    """`function(*args)` in a spawned process, so that its peak memory and warm-up are its own."""
    from bench.core.errors import BenchError

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise BenchError(f"bench perf: variant {args[0]} failed: {result['error']}")
    return result


def busy_cpu_seconds() -> float:
    """CPU time every process on the machine has spent, from /proc/stat (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process and its finished children (the variants)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


class MachineLoad:
    """How much of the machine other processes took while `bench perf` ran: their CPU time per second of
    wall time (in cores), and the 1-minute load average before and after."""

    def __enter__(self):
        self.load_before, self.started = os.getloadavg()[0], time.perf_counter()
        self.busy_before, self.own_before = busy_cpu_seconds(), own_cpu_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.started
        others = (busy_cpu_seconds() - self.busy_before) - (own_cpu_seconds() - self.own_before)
        self.report = {"other_processes_cores": max(others, 0.0) / wall, "load_average_before": self.load_before,
                       "load_average_after": os.getloadavg()[0], "wall_seconds": wall}
        self.report["busy"] = self.report["other_processes_cores"] > BUSY_CORES
        return False


def perf(settings: PerfSettings, variants: tuple[str, ...] = VARIANTS,
         generation: GenerationSettings | None = GenerationSettings(),
         generation_variants: tuple[str, ...] = GENERATION_VARIANTS) -> dict:
    """Both parts, each variant in its own spawned process; the warm variant reuses the cold one's cache.
    The matmul peak is measured once, here, for every variant."""
    with MachineLoad() as load:
        peak = matmul_peak_flops(settings.precision == "bf16-mixed")
        training = []
        with tempfile.TemporaryDirectory(prefix="bench-perf-reference-cache-") as reference_cache:
            for variant in variants:
                result = in_own_process(run_variant, variant, settings, reference_cache, peak)
                training.append(result)
                print(f"{variant}: {result['pairs_per_s']:.3f} pairs/s, final loss {result['final_loss']:.4f}",
                      file=sys.stderr, flush=True)
        sampling = []
        for variant in generation_variants if generation else ():
            result = in_own_process(run_generation_variant, variant, settings, generation)
            sampling.append(result)
            print(f"{variant}: {result['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    return {"settings": asdict(settings), "generation_settings": asdict(generation) if generation else None,
            "peak_flops": peak, "torch_threads": torch.get_num_threads(), "machine_load": load.report,
            "results": training, "generation": sampling,
            "ratios": ratios(training), "generation_ratios": generation_ratios(sampling),
            "final_loss_gap": loss_gap(training)}


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


def generation_ratios(results: list[dict]) -> dict[str, float]:
    by_variant = {r["variant"]: r for r in results}
    found = {}
    if "harness" in by_variant and "generate" in by_variant:
        found["harness / generate"] = by_variant["harness"]["tokens_per_s"] / by_variant["generate"]["tokens_per_s"]
    if "harness" in by_variant:
        harness = by_variant["harness"]
        found["harness / weight-bound"] = harness["tokens_per_s"] / harness["bound_tokens_per_s"]
    return found


def loss_gap(results: list[dict]) -> float | None:
    """Relative gap of final losses, harness (cold) against TRL (default)."""
    by_variant = {r["variant"]: r for r in results}
    if "harness-cold" not in by_variant or "trl" not in by_variant:
        return None
    ours, theirs = by_variant["harness-cold"]["final_loss"], by_variant["trl"]["final_loss"]
    return abs(ours - theirs) / abs(theirs)


def markdown(report: dict, command: str) -> str:
    from bench.reports.table import machine
    from bench.runs import tracking

    settings, load = PerfSettings(**report["settings"]), report["machine_load"]
    contended = (f"**busy**: other processes used {load['other_processes_cores']:.2f} cores on average; these "
                 "numbers are not an idle machine's" if load["busy"] else
                 f"idle: other processes used {load['other_processes_cores']:.2f} cores on average")
    lines = [
        "# Speed: this harness against TRL's DPOTrainer and plain `model.generate`",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {machine()}; {report.get('torch_threads', '?')} torch threads (`OMP_NUM_THREADS` sets them)  ",
        f"Commit: {tracking.git_commit()}  ",
        f"Load: {contended}; 1-minute load average {load['load_average_before']:.2f} before, "
        f"{load['load_average_after']:.2f} after; {load['wall_seconds'] / 60:.1f} min in all  ",
        f"Matmul peak: {report['peak_flops'] / 1e12:.2f} TFLOP/s ({'bf16' if settings.precision == 'bf16-mixed' else 'fp32'}"
        ", 2048² matrices, measured once after a 5 s warm-up), the denominator of every MFU below",
    ]
    if report["results"]:
        lines += [
            "",
            "## Training: DPO",
            "",
            f"Settings: {settings.policy}, {settings.steps} steps of {settings.batch_size} pairs, lengths "
            f"{settings.max_length}/{settings.max_prompt_length}, {settings.precision}, AdamW lr {settings.lr}, "
            f"beta {settings.beta}, seed {settings.seed}",
            "",
            "| variant | seconds | pairs/s | training tokens/s | MFU | peak RSS (GiB) | final loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["results"]:
            lines.append(f"| {r['variant']} | {r['seconds']:.1f} | {r['pairs_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{100 * r['mfu']:.1f} % | {r['peak_rss_gb']:.1f} | {r['final_loss']:.5f} |")
        lines.append("")
        for name, value in report["ratios"].items():
            if value is not None:
                lines.append(f"- pairs/s {name}: **{value:.2f}x**")
        if report["final_loss_gap"] is not None:
            lines.append(f"- final loss, harness vs TRL after {settings.steps} steps: "
                         f"{100 * report['final_loss_gap']:.2f} % apart")
    if report["generation"]:
        generation = GenerationSettings(**report["generation_settings"])
        first = report["generation"][0]
        lines += [
            "",
            "## Generation",
            "",
            f"Settings: {settings.policy}, {first['prompts']} HH test prompts (mean {first['mean_prompt_tokens']:.0f} "
            f"prompt tokens), temperature {generation.temperature}, up to {generation.max_new_tokens} new tokens, "
            f"batches of {generation.batch_size}, {settings.precision}, seed {generation.seed}",
            "",
            "| variant | seconds | tokens | tokens/s | peak RSS (GiB) |",
            "|---|---|---|---|---|",
        ]
        for r in report["generation"]:
            lines.append(f"| {r['variant']} | {r['seconds']:.1f} | {r['tokens']:,} | {r['tokens_per_s']:.1f} | "
                         f"{r['peak_rss_gb']:.1f} |")
        harness = next((r for r in report["generation"] if "bound_tokens_per_s" in r), None)
        if harness:
            lines.append(f"| weight-bound (one decode step at batch 1: {1000 * harness['weight_bound_step_s']:.1f} ms) "
                         f"| | | {harness['bound_tokens_per_s']:.1f} | |")
        lines.append("")
        for name, value in report["generation_ratios"].items():
            lines.append(f"- tokens/s {name}: **{value:.2f}x**")
        if harness:
            lines.append(f"- where the harness's {harness['seconds']:.1f} s went: {harness['prefill_s']:.1f} s running "
                         f"the prompts through the model (prefill), {harness['decode_s']:.1f} s in "
                         f"{harness['decode_steps']} decode steps of {harness['mean_step_ms']:.0f} ms on average, "
                         f"over {harness['mean_rows_per_step']:.1f} rows per step")
    return "\n".join(lines)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=1)
