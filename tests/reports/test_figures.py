"""bench/reports/figures.py: the Pareto frontier, the three cross-run figures on hand-made runs, and the MLflow
collectors and outputs against a temporary sqlite store. No models: the whole file takes seconds."""

import itertools
import os
import random

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer

from bench.reports import figures as F
from bench.reports.figures import RunData

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


# --- a gold world: arms, the gold on every reward axis, each method's frontier, Gao's fits -----------------
GOLD_TAGS = {"eval.judge.kind": "reward", "eval.judge.path": "reward:vader"}


def gold_run(arm, algorithm, seed, kl, gold, proxy, histories=None, **tags):
    """A comparison stage judged by the computable gold (`reward:vader`), its proxy trained per seed."""
    return RunData(f"{arm}-{seed}", f"{arm} (seed {seed})", algorithm,
                   {"eval/kl": kl, "eval/judge_score": gold, "eval/proxy_score": proxy}, histories or {},
                   kind="stage", split="test", seed=str(seed), proxy=f"rm-proxy-{seed}", judge="reward:vader",
                   tags={**GOLD_TAGS, "compare_stage": arm, "algorithm": algorithm, "seed": str(seed), **tags})


def best_of(n, seed, gold, proxy, pick="proxy"):
    kl = np.log(n) - (n - 1) / n
    arm = f"best-of-{n}" + ("-gold" if pick == "gold" else "")
    return gold_run(arm, "best-of-n", seed, kl, gold, proxy, best_of_n=str(n), best_of_n_pick=pick,
                    **{"eval.kl_kind": "bound"})


def plotted(axis, prefix="points:"):
    """(x, y) of every point in the collections whose gid starts with `prefix`."""
    found = [c.get_offsets() for c in axis.collections if (c.get_gid() or "").startswith(prefix)]
    return [tuple(map(float, xy)) for offsets in found for xy in offsets]


def assert_points(actual, expected):
    assert np.array(actual, dtype=float).shape == np.array(expected, dtype=float).shape
    assert np.allclose(np.array(actual, dtype=float), np.array(expected, dtype=float)), (actual, expected)


def gold_world_runs(seeds):
    """Arms of DPO and RLOO and best-of-N by proxy: the proxy scores best-of-N highest (it picked by it), the
    gold does not. One proxy for all runs when there is one seed: the old rule would have plotted it."""
    runs = []
    for seed in seeds:
        runs += [gold_run("dpo-beta0.1", "dpo", seed, 4.0 + seed, 0.30 + 0.01 * seed, 0.50),
                 gold_run("dpo-beta0.5", "dpo", seed, 1.5 + seed, 0.25 + 0.01 * seed, 0.45),
                 gold_run("rloo-kl0.1", "rloo", seed, 3.0 + seed, 0.35 + 0.01 * seed, 0.60),
                 best_of(1, seed, 0.10, 0.10), best_of(4, seed, 0.20 + 0.01 * seed, 0.90)]
    if len(seeds) == 1:
        for run in runs:
            run.proxy = "rm-proxy"
    return runs


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_gold_world_reward_axis_is_the_gold_never_the_proxy(seeds):
    runs = gold_world_runs(seeds)
    assert F.gold_world(runs)
    assert F.default_reward_metric(runs) == "eval/judge_score"
    figure = F.reward_kl_scatter(runs)
    axis = figure.axes[0]
    assert axis.get_ylabel().startswith("gold reward (reward:vader)") and "proxy" not in axis.get_ylabel()
    assert "Gold reward" in axis.get_title() and f"{len(runs)} runs plotted" in axis.get_title()
    expected = sorted((r.value("eval/kl"), r.value("eval/judge_score")) for r in runs)
    assert_points(sorted(plotted(axis)), expected)
    assert not {round(y, 6) for _, y in plotted(axis)} & {0.5, 0.45, 0.6, 0.9}  # no proxy score drawn
    # Asked for explicitly, the proxy is drawn on an axis that says so.
    proxy_axis = F.reward_kl_scatter(runs, reward_metric="eval/proxy_score").axes[0]
    assert "proxy" in proxy_axis.get_ylabel() and "not the gold" in proxy_axis.get_ylabel()


def test_a_reward_model_trained_as_the_gold_is_a_gold_judge_and_other_judges_are_not():
    gold_rm = RunData("1", "dpo", "dpo", {"eval/judge_score": 1.0, "eval/kl": 1.0}, judge="/cache/gold-rm",
                      tags={"eval.judge.kind": "reward_model", "eval.judge.trained_role": "gold"})
    judge_rm = RunData("2", "dpo", "dpo", {"eval/judge_score": 1.0, "eval/proxy_score": 2.0, "eval/kl": 1.0},
                       judge="/cache/rm-judge", proxy="p",
                       tags={"eval.judge.kind": "reward_model", "eval.judge.trained_role": "judge"})
    assert gold_rm.judge_is_gold and not judge_rm.judge_is_gold
    assert F.default_reward_metric([gold_rm]) == "eval/judge_score"
    assert F.reward_kl_scatter([gold_rm]).axes[0].get_ylabel().startswith("gold reward (gold-rm)")
    assert F.default_reward_metric([judge_rm]) == "eval/proxy_score"  # no gold: the old rule
    assert "gold" not in F.reward_kl_scatter([judge_rm]).axes[0].get_ylabel()


def test_arms_of_one_algorithm_get_its_colour_in_their_own_shade_and_marker():
    runs = gold_world_runs((0, 1))
    assert [r.arm for r in runs[:5]] == ["dpo-beta0.1", "dpo-beta0.5", "rloo-kl0.1", F.BON_PROXY, F.BON_PROXY]
    styles = F.arm_styles(runs)
    first, second = styles["dpo-beta0.1"], styles["dpo-beta0.5"]
    assert first.colour == F.colour_of("dpo") and second.colour != first.colour and second.marker != first.marker
    assert styles["rloo-kl0.1"].colour == F.colour_of("rloo")
    axis = F.reward_kl_scatter(runs).axes[0]
    markers = {c.get_label(): c.get_paths()[0].vertices.tobytes() for c in axis.collections
               if (c.get_gid() or "") == "points:dpo"}
    assert set(markers) == {"dpo-beta0.1:stage", "dpo-beta0.5:stage"}
    assert markers["dpo-beta0.1:stage"] != markers["dpo-beta0.5:stage"]
    legend = [t.get_text() for t in axis.get_legend().get_texts()]
    assert legend[:3] == ["dpo-beta0.1", "dpo-beta0.5", "rloo-kl0.1"]


def test_method_frontiers_are_each_methods_upper_left_envelope():
    points = [("dpo", 1, 0.2), ("dpo", 2, 0.5), ("dpo", 3, 0.4), ("dpo", 4, 0.6), ("dpo", 2.5, 0.5), ("dpo", 4, 0.6),
              ("rloo", 0.5, 0.1), ("rloo", 5, 0.3), ("rloo", 6, 0.8), ("rloo", 7, 0.7), ("rloo", 6, 0.75)]
    random.Random(2).shuffle(points)
    frontiers = F.method_frontiers(points)
    assert frontiers == {"dpo": [(1, 0.2), (2, 0.5), (4, 0.6)], "rloo": [(0.5, 0.1), (5, 0.3), (6, 0.8)]}
    # rloo's (5, 0.3) is on its own envelope though dpo's (2, 0.5) dominates it: no global staircase.
    assert (5, 0.3) not in [p[1:] for p in F.pareto_frontier([(k, r, m) for m, k, r in points])]


def test_gold_frontier_figure_draws_each_methods_envelope_with_checkpoints_and_the_ceiling():
    # RLOO's final point (6, 0.8) on the test prompts; its checkpoints (validation prompts) at other KLs.
    history = {"val/overopt/kl": [(0, 0.0), (4, 0.5), (8, 5.0), (12, 7.0)],
               "val/overopt/gold_score": [(0, 0.05), (4, 0.1), (8, 0.3), (12, 0.7)],
               "val/overopt/proxy_score": [(0, 0.0), (4, 0.2), (8, 0.5), (12, 0.9)]}
    runs = [gold_run("dpo-beta0.1", "dpo", 0, 1, 0.2, 0.0), gold_run("dpo-beta0.5", "dpo", 0, 2, 0.5, 0.0),
            gold_run("dpo-beta1.0", "dpo", 0, 3, 0.4, 0.0), gold_run("dpo-beta0.05", "dpo", 0, 4, 0.6, 0.0),
            gold_run("rloo-kl0.1", "rloo", 0, 6, 0.8, 0.0, histories=history),
            best_of(1, 0, 0.10, 0.1), best_of(4, 0, 0.15, 0.9), best_of(16, 0, 0.12, 1.2),
            best_of(1, 0, 0.10, 0.1, pick="gold"), best_of(4, 0, 0.30, 0.2, pick="gold"),
            best_of(16, 0, 0.45, 0.3, pick="gold")]
    axis = F.reward_kl_scatter(runs).axes[0]
    lines = {ln.get_gid(): ln for ln in axis.lines if ln.get_gid()}

    def vertices(gid):
        assert lines[gid].get_drawstyle() == "steps-post"
        return list(zip(lines[gid].get_xdata(), lines[gid].get_ydata()))

    assert_points(vertices("frontier:dpo"), [(1, 0.2), (2, 0.5), (4, 0.6)])
    assert_points(vertices("frontier:rloo"), [(0, 0.05), (0.5, 0.1), (5, 0.3), (6, 0.8)])
    kl4 = np.log(4) - 3 / 4
    assert_points(vertices(f"frontier:{F.BON_PROXY}"), [(0, 0.10), (kl4, 0.15)])
    assert "frontier:" + F.BON_GOLD not in lines and "pareto-frontier" not in lines
    ceiling = lines["ceiling:best-of-n-gold"]
    assert ceiling.get_linestyle() == "--" and list(ceiling.get_ydata()) == pytest.approx([0.10, 0.30, 0.45])
    assert sorted(plotted(axis, "checkpoints:rloo")) == [(0.0, 0.05), (0.5, 0.1), (5.0, 0.3), (7.0, 0.7)]
    legend = [t.get_text() for t in axis.get_legend().get_texts()]
    assert any("validation prompts" in text for text in legend)
    assert any("frontier" in text for text in legend)
    assert "validation prompts" in footnote(axis.figure)


def test_bound_kl_points_are_hollow_and_the_legend_says_upper_bound():
    runs = gold_world_runs((0,))
    axis = F.reward_kl_scatter(runs).axes[0]
    bound = [c for c in axis.collections if c.get_gid() == "points:best-of-n"]
    exact = [c for c in axis.collections if (c.get_gid() or "").startswith("points:") and c not in bound]
    assert bound and exact
    for collection in bound:
        assert len(collection.get_facecolor()) == 0  # hollow: facecolor "none"
        assert tuple(collection.get_edgecolor()[0][:3]) == to_rgba(F.colour_of("best-of-n"))[:3]
    for collection in exact:
        assert len(collection.get_facecolor()) == 1 and collection.get_facecolor()[0][3] > 0
    legend = {t.get_text(): h for t, h in zip(axis.get_legend().get_texts(), axis.get_legend().legend_handles)}
    assert f"{F.BON_PROXY} (KL: upper bound)" in legend
    assert legend[f"{F.BON_PROXY} (KL: upper bound)"].get_markerfacecolor() == "none"
    assert not [text for text in legend if "upper bound" in text and "best-of-N" not in text]
    # A best-of-N run from before `eval.kl_kind` existed has the same analytic KL: a bound too.
    assert RunData("x", "best-of-4", "best-of-n").kl_is_bound
    assert not RunData("y", "dpo", "dpo", tags={"eval.kl_kind": "exact"}).kl_is_bound


@pytest.mark.parametrize("form, alpha, beta, truth", [
    ("bon", 1.2, 0.3, lambda d: d * (1.2 - 0.3 * d)),
    ("rl", 0.8, 0.2, lambda d: d * (0.8 - 0.2 * np.log(d))),
])
def test_gao_fit_recovers_alpha_and_beta(form, alpha, beta, truth):
    rng = np.random.default_rng(0)
    d = np.linspace(0.2, 3.0, 15)
    rewards = truth(d) + rng.normal(0, 0.01, size=d.size)
    fit = F.fit_gao(zip([0.0, *d], [0.0, *rewards]), form)  # the start (d = 0) is left out: it says nothing
    assert fit.form == form and fit.n_points == 15
    assert fit.alpha == pytest.approx(alpha, rel=0.05) and fit.beta == pytest.approx(beta, rel=0.05)
    assert fit(d) == pytest.approx(F.GAO_FORMS[form](d, fit.alpha, fit.beta))
    assert F.gao_rl(0.0, 1.0, 1.0) == 0.0 and F.gao_bon(0.0, 1.0, 1.0) == 0.0


def test_gao_fit_needs_three_positive_distances_and_a_known_form():
    assert F.fit_gao([(0.0, 0.0), (0.5, 0.4), (1.0, 0.7)], "bon") is None  # two d > 0
    assert F.fit_gao([(0.5, 0.4), (0.5, 0.41), (1.0, 0.7), (1.0, 0.69)], "rl") is None  # two distinct d
    assert F.fit_gao([(0.5, 0.4), (1.0, 0.7), (1.5, 0.9)], "rl") is not None
    with pytest.raises(ValueError, match="form"):
        F.fit_gao([(0.5, 0.4)], "linear")


def test_overoptimisation_fits_the_right_form_per_curve_and_says_alpha_beta():
    ns = (1, 2, 4, 8, 16, 32)
    runs = []
    for seed in (0, 1):  # gold = 0.1 + R_bon(d), identical per seed: the pooled fit recovers the truth
        runs += [best_of(n, seed, 0.1 + float(F.gao_bon(np.sqrt(np.log(n) - (n - 1) / n), 1.2, 0.3)), 0.1 * n)
                 for n in ns]
    runs += [best_of(n, 0, 0.2 * n, 0.0, pick="gold") for n in (1, 4)]  # the ceiling: never fitted
    steps = range(0, 40, 5)
    kls = [0.0, 0.3, 0.8, 1.5, 2.5, 4.0, 6.0, 9.0]
    history = {"val/overopt/kl": list(zip(steps, kls)),
               "val/overopt/gold_score": [(s, 0.5 + float(F.gao_rl(np.sqrt(k), 0.8, 0.2))) for s, k in zip(steps, kls)],
               "val/overopt/proxy_score": [(s, k) for s, k in zip(steps, kls)]}
    runs.append(gold_run("rloo-kl0.02", "rloo", 0, 9.0, 1.0, 1.0, histories=history))
    runs.append(gold_run("dpo-short", "dpo", 0, 1.0, 1.0, 1.0,
                         histories={k: v[:3] for k, v in history.items()}))  # two d > 0: no fit
    curves = F.overoptimisation_curves(runs)
    forms = {(c.group, c.seed): c.form for c in curves}
    assert forms == {(F.BON_PROXY, "0"): "bon", (F.BON_PROXY, "1"): "bon", (F.BON_GOLD, "0"): None,
                     ("rloo-kl0.02", "0"): "rl", ("dpo-short", "0"): "rl"}
    fits = {g: F.group_fit([c for c in curves if c.group == g]) for g in {c.group for c in curves}}
    assert (fits[F.BON_PROXY].alpha, fits[F.BON_PROXY].beta) == pytest.approx((1.2, 0.3), rel=1e-6)
    assert (fits["rloo-kl0.02"].alpha, fits["rloo-kl0.02"].beta) == pytest.approx((0.8, 0.2), rel=1e-6)
    assert fits[F.BON_GOLD] is None and fits["dpo-short"] is None
    figure = F.overoptimisation(runs)
    gold_axis, proxy_axis = figure.axes
    assert {ln.get_gid() for ln in gold_axis.lines if (ln.get_gid() or "").startswith("gao-fit:")} == {
        f"gao-fit:{F.BON_PROXY}", "gao-fit:rloo-kl0.02"}
    legend = [t.get_text() for t in proxy_axis.get_legend().get_texts()]
    assert "fit d(α−βd): α=1.2, β=0.3" in legend and "fit d(α−β log d): α=0.8, β=0.2" in legend
    assert gold_axis.get_ylabel().startswith("gold reward (reward:vader)")
    assert "No Gao fit for dpo-short: 2 distinct d > 0 (3 needed)" in footnote(figure)
    assert not [ln for ln in proxy_axis.lines if F.BON_GOLD in (ln.get_gid() or "")]  # the ceiling: gold only


# --- layout: legends beside the points, tick labels apart, one scale per panel ---------------------------
def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def assert_legend_outside(figure, axis, legend_axis=None):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend = (legend_axis or axis).get_legend()
    box = legend.get_window_extent(renderer)
    for plot_axis in figure.axes:
        assert not overlaps(box, plot_axis.get_window_extent(renderer)), "legend over an axes"
    assert 0 <= box.x0 and box.x1 <= figure.bbox.width + 0.5, "legend cut off"
    for collection in axis.collections:  # and no point under it
        for x, y in collection.get_offset_transform().transform(collection.get_offsets()):
            assert not (box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1)


def test_legends_sit_outside_the_axes_and_cover_no_point():
    runs = gold_world_runs((0, 1, 2))
    scatter = F.reward_kl_scatter(runs)
    assert_legend_outside(scatter, scatter.axes[0])
    plain = F.reward_kl_scatter(scatter_runs())
    assert_legend_outside(plain, plain.axes[0])
    many = [RunData(str(i), f"{a}-{i}", a, histories={"train/rewards/margins": [(0, 0.0), (1, 0.1 * i)]})
            for i, a in enumerate(("dpo", "ipo", "kto", "orpo", "simpo"))]
    curves = F.training_curves(many)
    assert_legend_outside(curves, curves.axes[0])
    ns = (1, 2, 4, 8)
    overopt = F.overoptimisation([best_of(n, 0, 0.1 * n, 0.2 * n) for n in ns])
    assert_legend_outside(overopt, overopt.axes[0], overopt.axes[1])
    bars = F.win_rate_bars([RunData("1", "dpo", "dpo", win_metrics(0.95, 0.97))])
    assert_legend_outside(bars, bars.axes[0])


@pytest.mark.parametrize("count", [3, 9, 27])
def test_win_rate_tick_labels_do_not_overlap(count):
    arms = ("dpo-beta0.1", "dpo-beta0.5", "ipo", "rloo-kl0.02", "rloo-kl0.1", "best-of-1", "best-of-4", "best-of-16",
            "best-of-4-gold")
    runs = [RunData(str(i), f"{arms[i % len(arms)]} (seed {i // len(arms)})", "dpo", win_metrics(0.5, 0.6),
                    kind="stage", tags={"compare_stage": arms[i % len(arms)]}) for i in range(count)]
    figure = F.win_rate_bars(runs)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in figure.axes[0].get_xticklabels()]
    assert len(boxes) == count
    for a, b in itertools.combinations(boxes, 2):
        assert not overlaps(a, b)
    assert all(box.y0 >= 0 and box.x0 >= 0 and box.x1 <= figure.bbox.width for box in boxes)  # none cut off


def test_a_run_that_dwarfs_the_others_gets_a_symlog_panel_that_says_so():
    assert F.dwarfing_runs({"slic": 200.0, "dpo": 0.5, "ipo": 0.3}) == (["slic"], 0.5)
    assert F.dwarfing_runs({"a": 200.0, "b": 190.0, "c": 0.5}) == (["a", "b"], 0.5)
    assert F.dwarfing_runs({"dpo": 5.0, "ipo": 0.3}) is None  # 16.7x: not dwarfed
    assert F.dwarfing_runs({"slic": 200.0, "dpo": 0.0}) is None  # nothing to flatten
    margins = lambda end: [(s, end * s / 10) for s in range(11)]  # noqa: E731
    runs = [RunData("a", "dpo", "dpo", histories={"train/rewards/margins": margins(0.5)}),
            RunData("b", "slic", "slic", histories={"train/rewards/margins": margins(-200.0)})]
    axis = F.training_curves(runs).axes[0]
    assert axis.get_yscale() == "symlog" and "symlog" in axis.get_title() and "slic" in axis.get_title()
    assert list(axis.lines[1].get_ydata()) == pytest.approx([-20.0 * s for s in range(11)])  # values unchanged
    assert F.training_curves(runs[:1]).axes[0].get_yscale() == "linear"
    # matplotlib's own symlog ticks put 10^k beside 0, where their labels collide: the ticks are set apart.
    assert F.symlog_ticks(0.5, -200.0, 0.5) == [-100.0, -10.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5]
    assert F.symlog_ticks(3.1, 0.0, 300.0) == [0.0, 2.0, 10.0, 100.0]  # nothing below the lowest value
    assert F.spaced_ticks([-100.0, -10.0, -1.0, -0.5, 0.0, 0.5], lambda v: v, 0.6) == [-100.0, -10.0, -1.0, 0.0]
    figure = axis.figure
    figure.canvas.draw()
    boxes = sorted((t.get_window_extent(figure.canvas.get_renderer()) for t in axis.get_yticklabels() if t.get_text()),
                   key=lambda box: box.y0)
    assert len(boxes) >= 4 and all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:]))


# --- issue 26 item 15: a comparison with a sweep beside it, and SLiC's summed margin near -200 -----------
def comparison_and_sweep(trials):
    """A one-seed comparison (test prompts; win rates near 1, where a legend inside the axes would sit) and a
    sweep's trials beside it (validation prompts: every x label gets a second line), as `bench table` draws them."""
    stages = [("sft", "sft", 0.55), ("dpo-beta0.1", "dpo", 0.97), ("dpo-beta0.5", "dpo", 0.93), ("ipo", "ipo", 0.9),
              ("kto", "kto", 0.88), ("slic", "slic", 0.95), ("ppo", "ppo", 0.7), ("best-of-4", "best-of-n", 0.6)]
    runs = [RunData(stage, f"{stage} (seed 0)", algorithm, {**win_metrics(win, win - 0.02), "eval/kl": 0.5 * i,
                                                            "eval/proxy_score": 0.2 + 0.02 * i},
                    kind="stage", split="test", seed="0") for i, (stage, algorithm, win) in enumerate(stages)]
    runs += [RunData(f"t{i}", f"dpo trial {i}", "dpo", {**win_metrics(0.9 + 0.002 * i, 0.95), "eval/kl": 0.1 * i,
                                                        "eval/proxy_score": 0.2 + 0.01 * i},
                     kind="trial", split="validation") for i in range(trials)]
    return runs


@pytest.mark.parametrize("trials", [3, 30])
def test_win_rates_with_sweep_rows_keep_the_legend_off_the_bars_and_the_labels_apart(trials):
    figure = F.win_rate_bars(comparison_and_sweep(trials))
    axis = figure.axes[0]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend = axis.get_legend().get_window_extent(renderer)
    bars = [bar.get_window_extent(renderer) for container in axis.containers if isinstance(container, BarContainer)
            for bar in container]
    labels = [t.get_window_extent(renderer) for t in axis.get_xticklabels()]
    assert len(bars) == 2 * len(labels) == 2 * (8 + trials)
    assert [t.get_text().split("\n")[-1] for t in axis.get_xticklabels()] == ["(test)"] * 8 + ["(validation)"] * trials
    for box in [axis.get_window_extent(renderer), *bars, *labels]:
        assert not overlaps(legend, box)
    for a, b in itertools.combinations(labels, 2):
        assert not overlaps(a, b)
    assert all(0 <= box.x0 and box.x1 <= figure.bbox.width and 0 <= box.y0 for box in [legend, *labels])  # not cut


def test_reward_kl_point_labels_stay_in_the_axes_clear_of_the_legend():
    """At most 12 runs are labelled; a label to the right of the rightmost point ran out of the axes and under
    the legend beside them."""
    runs = comparison_and_sweep(3)
    figure = F.reward_kl_scatter(runs)
    axis = figure.axes[0]
    assert_legend_outside(figure, axis)  # and no point under it
    renderer = figure.canvas.get_renderer()
    legend, frame = axis.get_legend().get_window_extent(renderer), axis.get_window_extent(renderer)
    labels = {t.get_text(): t.get_window_extent(renderer) for t in axis.texts}
    assert set(labels) == {r.label for r in runs}
    for text, box in labels.items():
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text
        assert not overlaps(legend, box), text


def test_slics_summed_margin_leaves_every_other_curve_most_of_its_height():
    """SLiC's margin is summed log-probs (near -200 here) beside DPO, IPO and KTO's β-scaled margins (near ±1):
    on one linear axis theirs were flat lines at 0. Each keeps at least half the height (in display coordinates)
    it has in the same panel without SLiC, and SLiC's whole curve stays inside the axes."""
    ends = {"dpo": 1.2, "ipo": 0.6, "kto": -0.9, "slic": -200.0}
    runs = [RunData(a, a, a, histories={"train/rewards/margins": [(s, end * s / 40) for s in range(41)]},
                    kind="stage", split="test") for a, end in ends.items()]

    def heights(runs):
        axis = F.training_curves(runs).axes[0]
        axis.figure.canvas.draw()
        frame = axis.get_window_extent().height
        spans = {}
        for line in axis.lines:
            ys = axis.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))[:, 1]
            spans[line.get_label()] = (ys.max() - ys.min()) / frame
        return spans, axis.get_ylim()

    alone, _ = heights(runs[:3])
    together, (low, high) = heights(runs)
    assert set(together) == set(ends)
    for algorithm in ("dpo", "ipo", "kto"):
        assert alone[algorithm] >= 0.25 and together[algorithm] >= 0.5 * alone[algorithm], (algorithm, together)
    assert low <= -200.0 and high >= 1.2 and together["slic"] > 0.2


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

    from bench.runs import tracking

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

        # A gold-world comparison of arms over two seeds, its stage tags in no particular order.
        arms = run("compare-arms", {"compare_role": "parent"})
        gold_judge = {"eval.judge.kind": "reward", "eval.judge.path": "reward:vader"}
        for stage, algorithm, extra in (
                ("best-of-16", "best-of-n", {"best_of_n": "16", "best_of_n_pick": "proxy", "eval.kl_kind": "bound"}),
                ("dpo-beta0.5", "dpo", {"eval.kl_kind": "exact"}), ("sft", "sft", {"eval.kl_kind": "exact"}),
                ("best-of-4-gold", "best-of-n", {"best_of_n": "4", "best_of_n_pick": "gold", "eval.kl_kind": "bound"}),
                ("best-of-4", "best-of-n", {"best_of_n": "4", "best_of_n_pick": "proxy", "eval.kl_kind": "bound"}),
                ("dpo-beta0.1", "dpo", {"eval.kl_kind": "exact"})):
            for seed in (2, 1):
                name = f"{stage}-s{seed}"
                run(name, {"algorithm": algorithm, "compare_stage": stage, "seed": str(seed),
                           "mlflow.parentRunId": arms, **gold_judge, **extra},
                    [("eval/kl", 1.0 + seed, 0), ("eval/judge_score", 0.1 * seed, 0)])
                client.set_tag(arms, f"stage.{stage}.seed{seed}", ids[name])
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


def test_a_comparison_of_arms_is_collected_in_arm_order_with_its_tags(store):
    client, ids, _ = store
    run_ids = F.comparison_run_ids(client, ids["compare-arms"])
    names = ["sft", "dpo-beta0.1", "dpo-beta0.5", "best-of-4-gold", "best-of-4", "best-of-16"]
    assert run_ids == [ids[f"{name}-s{seed}"] for name in names for seed in (1, 2)]
    runs = F.collect_runs(client, run_ids, histories=False)
    assert [r.label for r in runs[:4]] == ["sft (seed 1)", "sft (seed 2)", "dpo-beta0.1 (seed 1)",
                                           "dpo-beta0.1 (seed 2)"]
    assert [r.arm for r in runs[::2]] == ["sft", "dpo-beta0.1", "dpo-beta0.5", F.BON_GOLD, F.BON_PROXY, F.BON_PROXY]
    assert [r.kl_is_bound for r in runs[::2]] == [False, False, False, True, True, True]
    assert [r.best_of_n for r in runs[6::2]] == [4, 4, 16]
    assert all(r.judge_is_gold for r in runs) and F.default_reward_metric(runs) == "eval/judge_score"
    axis = F.reward_kl_scatter(runs).axes[0]
    assert axis.get_ylabel().startswith("gold reward (reward:vader)")
    assert {ln.get_gid() for ln in axis.lines} >= {"frontier:sft", "frontier:dpo", f"frontier:{F.BON_PROXY}"}


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
