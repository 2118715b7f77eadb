"""`bench perf` on the tiny model: four variants in their own processes, aligned closely enough with TRL
that the per-step losses agree."""

import json

import pytest

from bench import perf
from bench.cli import main


@pytest.fixture(scope="module")
def results(hh_path):
    settings = perf.PerfSettings(data_path=hh_path, policy="tiny", steps=3, batch_size=2, max_length=64,
                                 max_prompt_length=32, lr=1e-2, precision="32-true")
    return settings, perf.perf(settings)


def test_every_variant_reports_speed_and_memory(results):
    settings, rows = results
    assert [r["variant"] for r in rows] == list(perf.VARIANTS)
    for r in rows:
        assert r["pairs_per_s"] == pytest.approx(settings.pairs / r["seconds"])
        assert 0 < r["mfu"] < 1 and r["peak_flops"] > 1e9 and r["peak_rss_gb"] > 0.1
        assert len(r["losses"]) == settings.steps
    table = perf.markdown(rows, settings, "bench perf --test")
    assert "| harness-warm |" in table and "pairs/s warm / trl:" in table and "Machine:" in table
    assert set(perf.ratios(rows)) == {"warm / trl", "cold / trl-precompute", "cold / trl", "warm / trl-precompute"}


def test_harness_and_trl_train_the_same_steps(results):
    """Same pairs, order, optimizer and loss: the per-step losses match, whichever way the reference is served."""
    _, rows = results
    losses = {r["variant"]: r["losses"] for r in rows}
    assert losses["harness-cold"][-1] != pytest.approx(losses["harness-cold"][0], abs=1e-3)  # it trained
    for variant in ("harness-warm", "trl", "trl-precompute"):
        assert losses[variant] == pytest.approx(losses["harness-cold"], abs=1e-4), variant
    assert perf.loss_gap(rows) < 1e-4


def test_bad_perf_settings_are_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["perf", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_json_report_round_trips(results):
    settings, rows = results
    report = json.loads(perf.dumps(rows, settings))
    assert report["settings"]["steps"] == 3 and len(report["results"]) == 4
