"""Which precision the hardware computes fast in. bf16 autocast where it has bf16 arithmetic (CUDA since Ampere;
CPUs with AVX512-BF16 or AMX, where bf16 runs about 4x faster than fp32); fp32 elsewhere, where bf16 is
emulated: on an AVX2 EPYC a SmolLM2 forward ran 5.9x slower under bf16 autocast than in fp32 and a 2048²
matmul over 250x slower (docs/performance.md). Training's default precision, evaluation's `eval.bf16`, and
the sampling and scoring that labelling and RRHF's candidates do all follow this one rule, read for the device
that sampling and scoring run on (`inference_device`: the GPU where there is one)."""

import contextlib
from pathlib import Path

import torch


BF16_UNITS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}  # the CPU flags of bf16 arithmetic, as reports name them


def inference_device() -> torch.device:
    """Where a model that samples or scores outside training runs: the current CUDA device where there is one
    (`CUDA_VISIBLE_DEVICES=` keeps it on the CPU), else the CPU. Training's models are placed by Lightning (and
    sharded under FSDP), so they load on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def bf16_arithmetic(device_type: str | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether `device_type` ("cpu", "cuda"; default: `inference_device()`'s) has bf16 arithmetic; a CPU's flags
    are read from `cpuinfo`."""
    device_type = device_type or inference_device().type
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return bool(flags & BF16_UNITS.keys())


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model as /proc/cpuinfo names it (family and model numbers too: a virtual machine's name is
    often only the vendor's line, "AMD EPYC") and whether it has bf16 arithmetic, which sets the precision
    everything runs in: a report's speed and its bf16 rounding are comparable only between such machines."""
    if not cpuinfo.exists():
        return "CPU unknown"
    fields = {}
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    units = sorted(BF16_UNITS[flag] for flag in set(fields.get("flags", "").split()) & BF16_UNITS.keys())
    numbers = ", ".join(f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model")) if key in fields)
    return (f"{fields.get('model name', 'CPU')}" + (f" ({numbers})" if numbers else "") + ", "
            + (f"bf16 arithmetic ({' and '.join(units)})" if units else "no bf16 arithmetic"))


def autocast_enabled(device: torch.device | str, enabled: bool | None = None) -> bool:
    """Whether sampling and scoring on `device` run under bf16 autocast: `enabled`, or by default where the
    device has bf16 arithmetic."""
    return bf16_arithmetic(torch.device(device).type) if enabled is None else enabled


def inference_autocast(device: torch.device | str, enabled: bool | None = None):
    """bf16 autocast for sampling and scoring on `device` where `autocast_enabled`, else no autocast (the
    models' own dtype)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if autocast_enabled(device, enabled) else contextlib.nullcontext()


def cache_key_part(autocast: bool) -> dict:
    """What a cache key records of how samples or scores were computed: the precision (bf16 `autocast` or fp32)
    and the kind of device they ran on (`inference_device()`'s: a CUDA kernel rounds otherwise than a CPU's). Either
    can flip a sampled token at a near-tie, so an entry of one is not reused for another (a cache folder shared by
    a CPU machine and a GPU node). bf16 autocast on the CPU, which every cached entry had before keys recorded
    these, adds nothing, so those entries keep their keys."""
    part = {} if autocast else {"precision": "fp32"}
    device_type = inference_device().type
    return part if device_type == "cpu" else {**part, "device": device_type}


def inference_key_part() -> dict:
    """`cache_key_part` of the precision that sampling and scoring on `inference_device()` run in by default: what
    a cache of on-policy samples, RRHF's candidates or a reward-model gold's scores records of it."""
    return cache_key_part(autocast_enabled(inference_device()))
