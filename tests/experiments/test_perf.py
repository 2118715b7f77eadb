"""`bench perf` on the tiny model: four training variants in their own processes, aligned closely enough with
TRL that the per-step losses agree; the generation part against plain `model.generate`; one peak for every
variant; the machine's load."""

import json

import pytest
import torch

from bench.cli import main
from bench.experiments import perf


@pytest.fixture(scope="module")
def report(hh_path):
    settings = perf.PerfSettings(data_path=hh_path, policy="tiny", steps=3, batch_size=2, max_length=64,
                                 max_prompt_length=32, lr=1e-2, precision="32-true")
    generation = perf.GenerationSettings(n_prompts=6, max_new_tokens=8, batch_size=3)
    return settings, perf.perf(settings, generation=generation)


@pytest.mark.slow  # its module fixture runs a benchmark/comparison
def test_every_variant_reports_speed_and_memory(report):
    settings, found = report
    rows = found["results"]
    assert [r["variant"] for r in rows] == list(perf.VARIANTS)
    for r in rows:
        assert r["pairs_per_s"] == pytest.approx(settings.pairs / r["seconds"])
        assert 0 < r["mfu"] < 1 and r["peak_rss_gb"] > 0.1
        assert r["peak_flops"] == found["peak_flops"] > 1e9  # measured once, for every variant
        assert len(r["losses"]) == settings.steps
    table = perf.markdown(found, "bench perf --test")
    assert "| harness-warm |" in table and "pairs/s warm / trl:" in table and "Machine:" in table
    assert f"; {torch.get_num_threads()} torch threads" in table  # the threads it ran with
    assert "## Generation" in table and "tokens/s harness / generate:" in table and "Load:" in table
    assert set(found["ratios"]) == {"warm / trl", "cold / trl-precompute", "cold / trl", "warm / trl-precompute"}


@pytest.mark.slow  # its module fixture runs a benchmark/comparison
def test_generation_part_compares_the_sampler_with_generate_and_the_weight_bound(report):
    _, found = report
    by_variant = {r["variant"]: r for r in found["generation"]}
    assert set(by_variant) == set(perf.GENERATION_VARIANTS)
    for r in by_variant.values():
        assert r["prompts"] == 6 and 6 <= r["tokens"] <= 6 * 8
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    harness = by_variant["harness"]
    assert harness["bound_tokens_per_s"] == pytest.approx(3 / harness["weight_bound_step_s"])
    # Where the time went: prompts and decode steps account for the whole sampling time.
    assert 0 < harness["prefill_s"] and 0 < harness["decode_s"]
    assert harness["prefill_s"] + harness["decode_s"] == pytest.approx(harness["seconds"], rel=0.2)
    assert 1 <= harness["mean_rows_per_step"] <= 3 and harness["decode_steps"] >= 8
    ratios = found["generation_ratios"]
    assert ratios["harness / generate"] == pytest.approx(harness["tokens_per_s"] / by_variant["generate"]["tokens_per_s"])
    assert ratios["harness / weight-bound"] == pytest.approx(harness["tokens_per_s"] / harness["bound_tokens_per_s"])


@pytest.mark.slow  # its module fixture runs a benchmark/comparison
def test_machine_load_is_recorded(report):
    _, found = report
    load = found["machine_load"]
    assert load["other_processes_cores"] >= 0 and load["wall_seconds"] > 0
    assert load["busy"] == (load["other_processes_cores"] > perf.BUSY_CORES)


def test_a_busy_machine_is_flagged(monkeypatch):
    """Another process's CPU time during the run, which is not this process's, marks the run busy."""
    clock = iter([100.0, 160.0])  # /proc/stat: 60 CPU-seconds in all while this process used none
    monkeypatch.setattr(perf, "busy_cpu_seconds", lambda: next(clock))
    monkeypatch.setattr(perf, "own_cpu_seconds", lambda: 5.0)
    times = iter([0.0, 60.0])
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(times))
    with perf.MachineLoad() as load:
        pass
    assert load.report["other_processes_cores"] == pytest.approx(1.0) and load.report["busy"]


@pytest.mark.slow  # its module fixture runs a benchmark/comparison
def test_harness_and_trl_train_the_same_steps(report):
    """Same pairs, order, optimizer and loss: the per-step losses match, whichever way the reference is served."""
    _, found = report
    losses = {r["variant"]: r["losses"] for r in found["results"]}
    assert losses["harness-cold"][-1] != pytest.approx(losses["harness-cold"][0], abs=1e-3)  # it trained
    for variant in ("harness-warm", "trl", "trl-precompute"):
        assert losses[variant] == pytest.approx(losses["harness-cold"], abs=1e-4), variant
    assert perf.loss_gap(found["results"]) < 1e-4


def test_bad_perf_settings_are_one_clear_line(capsys):
    for argv, message in ((["--steps", "0"], "--steps must be >= 1, got 0"),
                          (["--gen-batch-size", "0"], "--gen-batch-size must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["perf", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


@pytest.mark.slow  # its module fixture runs a benchmark/comparison
def test_json_report_round_trips(report):
    _, found = report
    decoded = json.loads(perf.dumps(found))
    assert decoded["settings"]["steps"] == 3 and len(decoded["results"]) == 4
    assert set(decoded["generation_ratios"]) == {"harness / generate", "harness / weight-bound"}
    assert "busy" in decoded["machine_load"]
