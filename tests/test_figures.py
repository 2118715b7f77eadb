"""bench/figures.py: the Pareto frontier, the three cross-run figures on hand-made runs, and the MLflow
collectors and outputs against a temporary sqlite store. No models: the whole file takes seconds."""

import itertools
import os
import random

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from bench import figures as F
from bench.figures import RunData

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_open_figures():
    yield
    plt.close("all")


# --- pareto_frontier ------------------------------------------------------------------------------------
def test_pareto_frontier_hand_made_points():
    h = (-0.5, 0.2, "h")  # negative KL (a Monte Carlo estimate can be): best KL, on the frontier
    a = (0.0, 1.0, "a")
    g = (0.5, 0.5, "g")  # dominated by a (lower KL and higher reward)
    b = (1.0, 2.0, "b")
    c = (1.0, 1.5, "c")  # same KL as b, lower reward: dominated
    d = (2.0, 2.0, "d")  # same reward as b, higher KL: dominated
    e = (3.0, 3.0, "e")
    e2 = (3.0, 3.0, "e2")  # identical to e: neither dominates the other, both stay
    points = [d, e, c, g, b, e2, a, h]
    random.Random(0).shuffle(points)
    frontier = F.pareto_frontier(points)
    assert [p[2] for p in frontier[:3]] == ["h", "a", "b"]
    assert sorted(p[2] for p in frontier[3:]) == ["e", "e2"]
    assert len(frontier) == 5


def test_pareto_frontier_key_functions_and_edge_cases():
    points = [{"kl": 1.0, "r": 0.2}, {"kl": 0.5, "r": 0.4}, {"kl": 2.0, "r": 0.9}]
    frontier = F.pareto_frontier(points, kl=lambda p: p["kl"], reward=lambda p: p["r"])
    assert frontier == [{"kl": 0.5, "r": 0.4}, {"kl": 2.0, "r": 0.9}]
    assert F.pareto_frontier([]) == []
    assert F.pareto_frontier([(1.0, 1.0)]) == [(1.0, 1.0)]
    with pytest.raises(ValueError, match="finite"):
        F.pareto_frontier([(0.0, 1.0), (float("nan"), 2.0)])


def test_pareto_frontier_matches_the_definition_on_random_ties():
    """Small integer grids make many ties; the frontier is checked against the pairwise definition."""
    rng = random.Random(1)
    for _ in range(200):
        points = [(rng.randint(0, 4), rng.randint(0, 4), i) for i in range(rng.randint(1, 12))]

        def dominates(q, p):
            return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])

        expected = {p for p in points if not any(dominates(q, p) for q in points)}
        frontier = F.pareto_frontier(points)
        assert set(frontier) == expected
        assert frontier == sorted(frontier, key=lambda p: (p[0], -p[1]))


# --- hand-made runs --------------------------------------------------------------------------------------
def win_metrics(chosen=None, ref=None, ci=0.1):
    metrics = {}
    for name, value in (("eval/win_rate_vs_chosen", chosen), ("eval/win_rate_vs_ref", ref)):
        if value is not None:
            metrics.update({name: value, f"{name}_ci_low": value - ci, f"{name}_ci_high": value + ci / 2})
    return metrics


def containers(axis, label):
    return [c for c in axis.containers if c.get_label() == label]


def footnote(figure) -> str:
    """The notes under the axes, unwrapped."""
    return " ".join(t.get_text().replace("\n", " ") for t in figure.texts if t.get_gid() == "footnote")


def test_win_rate_bars_values_errors_colours_and_skipped():
    runs = [RunData("r1", "dpo", "dpo", win_metrics(0.45, 0.62)),
            RunData("r2", "ipo", "ipo", win_metrics(0.50, 0.70, ci=0.2)),
            RunData("r3", "kto", "kto", win_metrics(0.60)),  # no vs-reference win rate
            RunData("r4", "ppo", "ppo", {"eval/kl": 1.0})]  # never evaluated: skipped and named
    figure = F.win_rate_bars(runs)
    axis = figure.axes[0]
    (chosen,) = containers(axis, "vs chosen")
    (ref,) = containers(axis, "vs reference")
    assert [bar.get_height() for bar in chosen] == pytest.approx([0.45, 0.50, 0.60])
    assert [bar.get_height() for bar in ref] == pytest.approx([0.62, 0.70])
    assert [bar.get_facecolor() for bar in chosen] == [to_rgba(F.colour_of(a)) for a in ("dpo", "ipo", "kto")]
    assert [bar.get_facecolor()[:3] for bar in ref] == [to_rgba(F.colour_of(a))[:3] for a in ("dpo", "ipo")]
    # The error bars span exactly the logged CI.
    (errors,) = containers(axis, "_ci:eval/win_rate_vs_chosen")
    spans = [(segment[0][1], segment[1][1]) for segment in errors.lines[2][0].get_segments()]
    expected = [(r.metrics["eval/win_rate_vs_chosen_ci_low"], r.metrics["eval/win_rate_vs_chosen_ci_high"])
                for r in runs[:3]]
    assert np.allclose(spans, expected)
    (ref_errors,) = containers(axis, "_ci:eval/win_rate_vs_ref")
    assert np.allclose([(s[0][1], s[1][1]) for s in ref_errors.lines[2][0].get_segments()], [(0.52, 0.67), (0.5, 0.8)])
    assert [t.get_text() for t in axis.get_xticklabels()] == ["dpo", "ipo", "kto"]
    note = footnote(figure)
    assert "Skipped 1 of 4 runs without eval/win_rate_vs_chosen: ppo" in note


def test_win_rate_bars_one_group_without_vs_ref_and_missing_ci_is_said():
    runs = [RunData("r1", "dpo", "dpo", {"eval/win_rate_vs_chosen": 0.4}),
            RunData("r2", "custom", "custom", win_metrics(0.55))]
    figure = F.win_rate_bars(runs)
    axis = figure.axes[0]
    assert not containers(axis, "vs reference")
    (chosen,) = containers(axis, "vs chosen")
    assert len(chosen) == 2
    assert chosen[1].get_facecolor() == to_rgba(F.FALLBACK_COLOUR)
    (errors,) = containers(axis, "_ci:eval/win_rate_vs_chosen")
    assert len(errors.lines[2][0].get_segments()) == 1  # only the run with a CI gets an error bar
    assert "No CI logged for dpo (vs chosen)" in footnote(figure)


def test_win_rate_bars_mark_mixed_prompt_sets_and_survive_no_data():
    runs = [RunData("r1", "dpo", "dpo", win_metrics(0.4), kind="stage", split="test"),
            RunData("r2", "dpo trial 3", "dpo", win_metrics(0.6), kind="trial", split="validation")]
    axis = F.win_rate_bars(runs).axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["dpo\n(test)", "dpo trial 3\n(validation)"]
    empty = F.win_rate_bars([RunData("r1", "dpo", "dpo", {})])
    assert any(t.get_gid() == "no-data" for t in empty.axes[0].texts)
    assert "Skipped 1 of 1" in footnote(empty)


def scatter_runs():
    def run(run_id, algorithm, kl, proxy, kind="stage", judge=0.0):
        metrics = {"eval/judge_score": judge}
        if kl is not None:
            metrics["eval/kl"] = kl
        if proxy is not None:
            metrics["eval/proxy_score"] = proxy
        return RunData(run_id, f"{algorithm}-{run_id}", algorithm, metrics, kind=kind)

    return [run("1", "dpo", 0.8, 0.048), run("2", "ipo", 0.4, 0.047), run("3", "kto", 4.7, 0.050),
            run("4", "rrhf", 4.2, 0.054), run("5", "ppo", -0.06, 0.0473),
            run("6", "dpo", 2.0, 0.049, kind="trial"), run("7", "dpo", 1.0, 0.045, kind="trial"),
            run("8", "ppo", None, 0.05),  # no KL
            run("9", "sft", 0.0, None),  # no proxy score (a judge score only)
            run("10", "kto", float("nan"), 0.05)]  # a NaN counts as missing


def test_reward_kl_scatter_points_colours_frontier_and_skipped():
    runs = scatter_runs()
    figure = F.reward_kl_scatter(runs)
    axis = figure.axes[0]
    points = [c for c in axis.collections if (c.get_gid() or "").startswith("points:")]
    assert sum(len(c.get_offsets()) for c in points) == 7
    for collection in points:
        algorithm = collection.get_gid().split(":")[1]
        assert tuple(collection.get_facecolor()[0][:3]) == to_rgba(F.colour_of(algorithm))[:3]
    markers = {c.get_label(): len(c.get_offsets()) for c in points}
    assert markers == {"dpo:stage": 1, "dpo:trial": 2, "ipo:stage": 1, "kto:stage": 1, "rrhf:stage": 1,
                       "ppo:stage": 1}
    (line,) = [ln for ln in axis.lines if ln.get_gid() == "pareto-frontier"]
    # ppo (-0.06, 0.0473) -> dpo (0.8, 0.048) -> dpo trial (2.0, 0.049) -> rrhf (4.2, 0.054); ipo, kto, the
    # other trial are dominated.
    assert list(line.get_xdata()) == pytest.approx([-0.06, 0.8, 2.0, 4.2])
    assert list(line.get_ydata()) == pytest.approx([0.0473, 0.048, 0.049, 0.054])
    assert line.get_drawstyle() == "steps-post"
    assert "7 runs plotted, 3 skipped" in axis.get_title()
    note = footnote(figure)
    assert "Skipped 3 of 10 runs" in note
    assert "ppo-8 (no eval/kl)" in note and "sft-9 (no eval/proxy_score)" in note and "kto-10 (no eval/kl)" in note
    assert "eval/proxy_score" in axis.get_ylabel() and "eval/kl" in axis.get_xlabel()
    legend = [t.get_text() for t in axis.get_legend().get_texts()]
    assert legend[:5] == ["dpo", "ipo", "kto", "rrhf", "ppo"]
    assert "sweep trial" in legend and "Pareto frontier (4)" in legend


def test_reward_kl_scatter_reward_metric_choice():
    runs = [RunData("1", "dpo", "dpo", {"eval/kl": 1.0, "eval/judge_score": 0.3}),
            RunData("2", "ipo", "ipo", {"eval/kl": 0.5, "eval/judge_score": 0.1})]
    assert F.default_reward_metric(runs) == "eval/judge_score"
    axis = F.reward_kl_scatter(runs).axes[0]
    assert "eval/judge_score" in axis.get_ylabel()
    assert "2 runs plotted" in axis.get_title() and "skipped" not in axis.get_title()
    # An explicit metric that no run has: every run is skipped and said to be, nothing crashes.
    figure = F.reward_kl_scatter(runs, reward_metric="eval/proxy_score")
    assert "0 runs plotted, 2 skipped" in figure.axes[0].get_title()
    assert any(t.get_gid() == "no-data" for t in figure.axes[0].texts)
    assert F.default_reward_metric(scatter_runs()) == "eval/proxy_score"


def curve_runs():
    return [
        RunData("a", "dpo", "dpo", histories={"train/rewards/margins": [(2, 0.3), (0, 0.0), (1, 0.1)]}),
        RunData("b", "kto", "kto", histories={"train/rewards/margins": [(0, 0.0), (1, 0.2)],
                                               "train/kl": [(0, 0.0), (1, 0.5)]}),
        RunData("c", "ppo", "ppo", histories={"train/objective/kl": [(0, 0.0), (1, 1.5), (2, 2.5)]}),
        RunData("d", "rrhf", "rrhf", histories={"train/rank_accuracy": [(0, 0.5)]}),
        RunData("e", "ipo", "ipo", histories={"train/rewards/margins": []}),  # an empty history is no data
    ]


def test_training_curves_lines_per_panel_and_missing_runs():
    figure = F.training_curves(curve_runs())
    margins, kl = figure.axes
    assert [ln.get_label() for ln in margins.lines] == ["dpo", "kto"]
    assert list(margins.lines[0].get_xdata()) == [0, 1, 2]  # sorted by step
    assert list(margins.lines[0].get_ydata()) == [0.0, 0.1, 0.3]
    assert [ln.get_color() for ln in margins.lines] == [F.colour_of("dpo"), F.colour_of("kto")]
    assert "not logged by 3 runs: ppo, rrhf, ipo" in margins.get_title()
    # PPO's train/objective/kl is the panel's key; KTO's own KL estimate is drawn and named.
    assert [ln.get_label() for ln in kl.lines] == ["kto (train/kl)", "ppo"]
    assert list(kl.lines[1].get_ydata()) == [0.0, 1.5, 2.5]
    assert "not logged by 3 runs: dpo, rrhf, ipo" in kl.get_title()
    assert [t.get_text() for t in margins.get_legend().get_texts()] == ["dpo", "kto"]


def test_training_curves_without_any_history():
    figure = F.training_curves([RunData("a", "dpo", "dpo")])
    for axis in figure.axes:
        assert not axis.lines
        assert any(t.get_gid() == "no-data" for t in axis.texts)
        assert "not logged by 1 run: dpo" in axis.get_title()
    assert len(F.training_curves([]).axes) == 2
    two = F.training_curves([RunData("a", "dpo", "dpo"), RunData("b", "ipo", "ipo")])
    assert "not logged by any of the 2 runs" in two.axes[0].get_title()


def test_many_sweep_trials_get_one_legend_entry_per_algorithm_and_no_point_labels():
    runs = [RunData(str(i), f"dpo trial {i}", "dpo", {"eval/kl": 0.1 * i, "eval/proxy_score": (i % 5) / 10},
                    histories={"train/rewards/margins": [(0, 0.0), (1, 0.01 * i)]}, kind="trial") for i in range(14)]
    axis = F.training_curves(runs).axes[0]
    assert len(axis.lines) == 14
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["dpo (14 runs)"]
    scatter = F.reward_kl_scatter(runs).axes[0]
    assert not [t for t in scatter.texts if t.get_text().startswith("dpo trial")]  # > 12 points: no labels
    (line,) = [ln for ln in scatter.lines if ln.get_gid() == "pareto-frontier"]
    assert list(line.get_xdata()) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_colours_are_fixed_per_algorithm():
    colours = F.algorithm_colours()
    assert len(set(colours.values())) == len(colours)
    assert {"sft", "dpo", "ipo", "kto", "rrhf", "ppo"} <= set(colours)
    assert F.colour_of("eval") == F.colour_of("?") == F.FALLBACK_COLOUR
    assert F.FALLBACK_COLOUR not in colours.values()


# --- outputs ---------------------------------------------------------------------------------------------
def test_save_pngs_writes_readable_pngs_atomically(tmp_path):
    import matplotlib.image

    runs = scatter_runs()
    figures = F.make_figures(runs)
    out = tmp_path / "results"
    (out).mkdir()
    (out / "smol-hh-win_rates.png").write_bytes(b"old")
    umask = os.umask(0)
    os.umask(umask)
    paths = F.save_pngs(figures, out, "smol-hh")
    assert set(paths) == set(F.FIGURE_NAMES)
    for name, path in paths.items():
        assert path == out / f"smol-hh-{name}.png"
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as any file written here, not 0600
        _, width = matplotlib.image.imread(path).shape[:2]
        assert width == pytest.approx(figures[name].get_size_inches()[0] * F.DPI, abs=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"smol-hh-{n}.png" for n in F.FIGURE_NAMES)
    markdown = F.markdown_images(paths)
    assert "![Win rates with 95% CIs](smol-hh-win_rates.png)" in markdown
    assert "(smol-hh-reward_vs_kl.png)" in markdown and "(smol-hh-training_curves.png)" in markdown
    F.close_figures(figures)
    assert not plt.get_fignums()


def test_save_pngs_leaves_the_old_file_when_saving_fails(tmp_path):
    class Broken:
        def savefig(self, file, **kwargs):
            file.write(b"half a png")
            raise RuntimeError("disk full")

    (tmp_path / "x-win_rates.png").write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"):
        F.save_pngs({"win_rates": Broken()}, tmp_path, "x")
    assert (tmp_path / "x-win_rates.png").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x-win_rates.png"]  # no partial file left


# --- MLflow ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store holding one comparison (parent + stages, one reused) and one sweep study."""
    import mlflow

    from bench import tracking

    root = tmp_path_factory.mktemp("figures_store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        client = mlflow.MlflowClient(tracking.tracking_uri())
        experiment = tracking.experiment_id(client, "figs")
        ids = {}

        clock = itertools.count(1_700_000_000_000)  # distinct, increasing timestamps (ms)

        def run(name, tags, metrics=(), params=None):
            created = client.create_run(experiment, run_name=name, tags=tags)
            run_id = created.info.run_id
            for key, value, step in metrics:
                client.log_metric(run_id, key, value, timestamp=next(clock), step=step)
            for key, value in (params or {}).items():
                client.log_param(run_id, key, value)
            client.set_terminated(run_id)
            ids[name] = run_id
            return run_id

        def evaluated(win, kl, proxy):
            return [("eval/win_rate_vs_chosen", win, 0), ("eval/win_rate_vs_chosen_ci_low", win - 0.1, 0),
                    ("eval/win_rate_vs_chosen_ci_high", win + 0.1, 0), ("eval/kl", kl, 0),
                    ("eval/proxy_score", proxy, 0), ("eval/judge_score", proxy / 2, 0)]

        old_parent = run("compare-old", {"compare_role": "parent"})
        parent = run("compare-new", {"compare_role": "parent"})
        run("rm-proxy", {"algorithm": "rm", "compare_stage": "rm-proxy", "mlflow.parentRunId": parent})
        run("sft-1", {"algorithm": "sft", "compare_stage": "sft", "mlflow.parentRunId": parent},
            evaluated(0.5, 0.0, 0.04), {"eval.split": "test"})
        # Margins logged out of step order, and twice at the last step: latest value and sorted history.
        run("dpo-1", {"algorithm": "dpo", "compare_stage": "dpo", "mlflow.parentRunId": parent},
            evaluated(0.45, 0.8, 0.048) + [("train/rewards/margins", 0.2, 1), ("train/rewards/margins", 0.0, 0),
                                          ("train/rewards/margins", 0.4, 2), ("train/rewards/margins", 0.5, 2),
                                          ("train/loss", 0.69, 0)],
            {"eval.split": "test"})
        # Reused from an older comparison: its parentRunId is the old parent.
        run("ppo-1", {"algorithm": "ppo", "compare_stage": "ppo", "mlflow.parentRunId": old_parent},
            evaluated(0.39, -0.06, 0.047) + [("train/objective/kl", k, s) for s, k in enumerate((0.0, 0.4, 0.9))],
            {"eval.split": "test"})
        for stage, name in (("rm-proxy", "rm-proxy"), ("sft", "sft-1"), ("ppo", "ppo-1"), ("dpo", "dpo-1")):
            client.set_tag(parent, f"stage.{stage}", ids[name] + (" (reused)" if stage == "ppo" else ""))

        study = run("sweep-s", {"sweep_role": "study", "optuna.study": "s", "algorithm": "dpo"})
        other = run("sweep-t", {"sweep_role": "study", "optuna.study": "t", "algorithm": "dpo"})
        for number in (10, 2, 0):
            run(f"s-trial-{number}", {"sweep_role": "trial", "optuna.study": "s", "optuna.trial": str(number),
                                      "optuna.state": "COMPLETE", "algorithm": "dpo", "mlflow.parentRunId": study},
                evaluated(0.4 + number / 100, 0.5 + number / 10, 0.05 + number / 1000)
                + [("train/rewards/margins", 0.1 * number, 0), ("train/rewards/margins", 0.2 * number, 1)],
                {"eval.split": "validation"})
        run("s-trial-1", {"sweep_role": "trial", "optuna.study": "s", "optuna.trial": "1", "optuna.state": "PRUNED",
                          "algorithm": "dpo", "mlflow.parentRunId": study},
            [("train/rewards/margins", -0.1, 0)])
        run("t-trial-0", {"sweep_role": "trial", "optuna.study": "t", "optuna.trial": "0", "algorithm": "dpo",
                          "mlflow.parentRunId": other}, evaluated(0.5, 1.0, 0.05))
        run("s-stray-child", {"algorithm": "dpo", "mlflow.parentRunId": study})
        yield client, ids, root


def test_comparison_run_ids_in_stage_order_without_reward_models(store):
    client, ids, _ = store
    assert F.comparison_run_ids(client, ids["compare-new"]) == [ids["sft-1"], ids["dpo-1"], ids["ppo-1"]]
    assert F.comparison_run_ids(client, ids["compare-old"]) == []


def test_collect_runs_reads_metrics_tags_and_histories(store):
    client, ids, _ = store
    runs = F.collect_runs(client, [ids["dpo-1"], ids["ppo-1"], ids["dpo-1"], ids["s-trial-1"]])
    assert [r.run_id for r in runs] == [ids["dpo-1"], ids["ppo-1"], ids["s-trial-1"]]
    dpo, ppo, pruned = runs
    assert (dpo.label, dpo.algorithm, dpo.kind, dpo.split) == ("dpo", "dpo", "stage", "test")
    assert dpo.value("eval/win_rate_vs_chosen") == pytest.approx(0.45)
    assert dpo.value("eval/win_rate_vs_chosen_ci_high") == pytest.approx(0.55)
    assert dpo.value("train/rewards/margins") == pytest.approx(0.5)  # the latest step's
    assert dpo.histories == {"train/rewards/margins": [(0, 0.0), (1, 0.2), (2, 0.5)]}  # step 2 relogged: the latest
    assert ppo.histories == {"train/objective/kl": [(0, 0.0), (1, 0.4), (2, 0.9)]}
    assert ppo.value("eval/kl") == pytest.approx(-0.06)
    assert (pruned.label, pruned.kind, pruned.split) == ("dpo trial 1 (pruned)", "trial", None)
    assert F.collect_runs(client, [ids["dpo-1"]], histories=False)[0].histories == {}


def test_sweep_run_ids_are_the_studys_trials_in_trial_order(store):
    client, ids, _ = store
    expected = [ids[f"s-trial-{n}"] for n in (0, 1, 2, 10)]
    assert F.sweep_run_ids(client, ids["sweep-s"]) == expected
    labels = [r.label for r in F.collect_runs(client, expected)]
    assert labels == ["dpo trial 0", "dpo trial 1 (pruned)", "dpo trial 2", "dpo trial 10"]


def test_collect_runs_makes_labels_unique(store):
    client, ids, _ = store
    runs = F.collect_runs(client, [ids["s-trial-0"], ids["t-trial-0"]])  # two studies' trial 0
    assert [r.label for r in runs] == [f"dpo trial 0 ({ids['s-trial-0'][:6]})", f"dpo trial 0 ({ids['t-trial-0'][:6]})"]


@pytest.mark.parametrize("parent, runs", [("compare-new", "comparison"), ("sweep-s", "sweep")])
def test_log_figures_puts_three_pngs_on_the_parent(store, tmp_path, parent, runs):
    client, ids, _ = store
    parent_id = ids[parent]
    run_ids = (F.comparison_run_ids(client, parent_id) if runs == "comparison"
               else F.sweep_run_ids(client, parent_id))
    paths = F.log_figures(client, parent_id, run_ids)
    assert paths == [f"figures/{name}.png" for name in F.FIGURE_NAMES]
    listed = sorted(a.path for a in client.list_artifacts(parent_id, "figures"))
    assert listed == sorted(paths)
    for path in paths:
        local = client.download_artifacts(parent_id, path, str(tmp_path))
        with open(local, "rb") as file:
            data = file.read()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not plt.get_fignums()  # every figure closed
