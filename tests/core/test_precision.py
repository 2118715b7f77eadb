"""One rule for the precision sampling, scoring and training run in: bf16 autocast where the hardware has bf16
arithmetic, the models' own fp32 elsewhere (where bf16 is emulated and several times slower)."""

import pytest
import torch

from bench.core import precision
from bench.core.precision import bf16_arithmetic, inference_autocast
from bench.evaluation.evaluate import EvalSettings
from bench.runs.training import default_precision


@pytest.mark.parametrize("flags, expected", [("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                                             ("avx512f amx_bf16 amx_tile", True), ("avx512f avx512_vnni", False)])
def test_a_cpu_has_bf16_arithmetic_with_avx512_bf16_or_amx(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert bf16_arithmetic("cpu", cpuinfo=cpuinfo) is expected
    assert bf16_arithmetic("cpu", cpuinfo=tmp_path / "missing") is False  # not Linux: fp32
    assert bf16_arithmetic("mps", cpuinfo=cpuinfo) is False


@pytest.mark.parametrize("has_bf16", [False, True])
def test_sampling_scoring_and_training_follow_the_hardware(monkeypatch, has_bf16):
    monkeypatch.setattr(precision, "bf16_arithmetic", lambda device_type=None: has_bf16)
    a = torch.randn(4, 4)
    with inference_autocast("cpu"):
        assert (a @ a).dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert default_precision() == ("bf16-mixed" if has_bf16 else "32-true")
    assert EvalSettings.from_dict({}).bf16 is has_bf16
    assert EvalSettings.from_dict({"bf16": not has_bf16}).bf16 is (not has_bf16)  # a recipe may say otherwise


def test_an_explicit_choice_wins_over_the_hardware():
    a = torch.randn(4, 4)
    with inference_autocast(torch.device("cpu"), enabled=True):
        assert (a @ a).dtype == torch.bfloat16
    with inference_autocast("cpu", enabled=False):
        assert (a @ a).dtype == torch.float32
    assert EvalSettings().bf16 is bf16_arithmetic()


def test_a_report_names_the_cpu_and_whether_it_computes_in_bf16(tmp_path):
    from bench.core.precision import cpu_description

    cpuinfo = tmp_path / "cpuinfo"
    cpu = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\n"
    cpuinfo.write_text(cpu.format(n=0, flags="avx2 avx512f avx512_bf16") + cpu.format(n=1, flags="avx2 avx512f avx512_bf16"))
    assert cpu_description(cpuinfo) == "AMD EPYC (family 26, model 2), bf16 arithmetic (AVX512-BF16)"
    cpuinfo.write_text(cpu.format(n=0, flags="avx2 fma"))
    assert cpu_description(cpuinfo) == "AMD EPYC (family 26, model 2), no bf16 arithmetic"
    cpuinfo.write_text("model name\t: Intel Xeon\nflags\t\t: avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_description(cpuinfo) == "Intel Xeon, bf16 arithmetic (AMX and AVX512-BF16)"
    assert cpu_description(tmp_path / "missing") == "CPU unknown"


def test_sampling_and_scoring_run_on_the_gpu_where_there_is_one(monkeypatch):
    if not torch.cuda.is_available():
        assert precision.inference_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # the rank's GPU, as Lightning's DDP sets it
    assert precision.inference_device() == torch.device("cuda", 1)
    # Evaluation's default precision is read for the GPU, not for this CPU's flags.
    for gpu_has_bf16 in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: gpu_has_bf16)
        assert bf16_arithmetic() is gpu_has_bf16
        assert EvalSettings.from_dict({}).bf16 is gpu_has_bf16


def test_models_that_sample_or_score_load_on_the_inference_device_and_training_s_on_the_cpu(monkeypatch, reward_models):
    from bench.core.models import load_causal_lm
    from modules.dpo import DPO
    from modules.reward_model import load_proxy, load_reward_model
    from modules.rloo import RLOO

    # "meta" stands in for a GPU: a device other than the CPU, which this machine can place models on.
    monkeypatch.setattr(precision, "inference_device", lambda: torch.device("meta"))
    assert next(load_causal_lm("tiny").parameters()).device.type == "meta"
    assert next(load_reward_model(reward_models["judge"], role="judge").parameters()).device.type == "meta"
    assert next(load_proxy(reward_models["proxy"]).parameters()).device.type == "meta"
    assert next(load_causal_lm("tiny", device="cpu").parameters()).device.type == "cpu"
    # Lightning moves training's models to its own device (and FSDP shards them from the CPU).
    dpo = DPO(policy="tiny", reference_cache=False)
    dpo.configure_model()
    rloo = RLOO(policy="tiny", proxy=reward_models["proxy"], num_generations=2, max_new_tokens=6)
    rloo.configure_model()
    for model in (dpo.policy, dpo.reference, rloo.policy, rloo.proxy):
        assert next(model.parameters()).device.type == "cpu"
