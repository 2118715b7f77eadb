"""Cross-run figures for comparisons and sweeps: win rates, reward vs KL with its Pareto frontier, and
training curves.

Three layers:

* pure figure functions on plain data (`RunData`), which return matplotlib Figures: `win_rate_bars`,
  `reward_kl_scatter`, `training_curves`, and `pareto_frontier` on points;
* MLflow collectors: `comparison_run_ids` (a `bench compare` parent's stage runs), `sweep_run_ids` (a study's
  trial runs) and `collect_runs` (latest metrics, tags and metric histories of given runs);
* outputs: `log_figures` puts the three figures on an MLflow run as `figures/<name>.png`; `save_pngs`
  writes them atomically beside a results Markdown file and `markdown_images` embeds them.

Nothing here drops a run silently: a run without the metrics a figure needs is left out of that figure and
named in it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import modules  # noqa: E402
from bench.atomic import write_atomically  # noqa: E402

log = logging.getLogger(__name__)

# --- conventions ------------------------------------------------------------------------------------------
FALLBACK_COLOUR = "#7f7f7f"
FIGSIZE = (6.4, 4.2)
DPI = 120

WIN_RATE_METRICS = ("eval/win_rate_vs_chosen", "eval/win_rate_vs_ref")
WIN_RATE_LABELS = {"eval/win_rate_vs_chosen": "vs chosen", "eval/win_rate_vs_ref": "vs reference"}
KL_METRIC = "eval/kl"
REWARD_METRICS = ("eval/proxy_score", "eval/judge_score")  # the first that any run has is the default
METRIC_LABELS = {
    "eval/kl": "KL(policy ‖ reference), nats per response (eval/kl)",
    "eval/proxy_score": "proxy RM score, RM units (eval/proxy_score)",
    "eval/judge_score": "judge RM score, RM units (eval/judge_score)",
}


@dataclass(frozen=True)
class CurvePanel:
    """One panel of `training_curves`: the first of `keys` that a run logged is drawn for it."""

    title: str
    ylabel: str
    keys: tuple[str, ...]


# DPO, IPO and KTO log the implicit-reward margin (modules/paired.py `preference_metrics`, modules/kto.py);
# RRHF, PPO and SFT do not. PPO logs the sequence KL of its rollouts to the reference
# (`train/objective/kl`); KTO logs its KL reference point `train/kl` (the policy/reference log-ratio of
# mismatched completions, clamped at 0); DPO, IPO, RRHF and SFT log no KL during training.
CURVE_PANELS = (
    CurvePanel("Implicit reward margin, chosen − rejected", "β·Δ log-ratio (IPO: τ·Δ per-token)",
               ("train/rewards/margins",)),
    CurvePanel("KL to the reference", "KL estimate (nats per sequence)", ("train/objective/kl", "train/kl")),
)
CURVE_KEYS = tuple(key for panel in CURVE_PANELS for key in panel.keys)

FIGURE_NAMES = ("win_rates", "reward_vs_kl", "training_curves")


def algorithm_colours() -> dict[str, str]:
    """Each algorithm's colour (its module's `colour`), fixed across every figure and results file."""
    return {name: cls.colour for name, cls in modules.registry().items() if name in modules.algorithms()}


def colour_of(algorithm: str) -> str:
    return algorithm_colours().get(algorithm, FALLBACK_COLOUR)


def _algorithm_rank(algorithm: str) -> int:
    order = modules.algorithms()
    return order.index(algorithm) if algorithm in order else len(order)


@dataclass
class RunData:
    """What the figures need of one run. `metrics` holds latest values (MLflow's `run.data.metrics`);
    `histories` maps a metric key to its (step, value) series, sorted by step."""

    run_id: str
    label: str
    algorithm: str
    metrics: dict[str, float] = field(default_factory=dict)
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    kind: str = "run"  # "stage" (a `bench compare` stage), "trial" (a sweep trial) or "run"
    split: str | None = None  # the eval split (`eval.split` param): test for comparisons, validation for sweeps
    seed: str | None = None  # the `seed` tag of a comparison's stage run
    proxy: str | None = None  # the proxy that scored its `eval/proxy_score` (`eval.proxy` tag)
    judge: str | None = None  # the judge that scored its `eval/judge_score` (`eval.judge.path` tag)

    def value(self, key: str) -> float | None:
        """The metric's latest value, or None when it is missing or not finite."""
        value = self.metrics.get(key)
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None


# --- the Pareto frontier --------------------------------------------------------------------------------
def pareto_frontier(points: Iterable, kl: Callable = lambda p: p[0], reward: Callable = lambda p: p[1]) -> list:
    """The points that no other point dominates, sorted by KL (then by reward, higher first).

    Lower KL and higher reward are better: q dominates p when kl(q) <= kl(p) and reward(q) >= reward(p) with
    one of them strict. Identical points do not dominate each other, so all copies of a frontier point stay.
    Points are (kl, reward, ...) tuples by default; `kl` and `reward` read other shapes."""
    ordered = sorted(points, key=lambda p: (kl(p), -reward(p)))
    for p in ordered:
        if not (math.isfinite(kl(p)) and math.isfinite(reward(p))):
            raise ValueError(f"pareto_frontier needs finite KL and reward, got {p!r}")
    frontier = []
    best_reward, kl_of_best = -math.inf, math.inf  # among the points seen, which all have kl <= this one's
    for p in ordered:
        k, r = kl(p), reward(p)
        # Dominated iff an earlier point has a higher reward, or the same reward at a strictly lower KL.
        if best_reward > r or (best_reward == r and kl_of_best < k):
            continue
        frontier.append(p)
        if r > best_reward:
            best_reward, kl_of_best = r, k
    return frontier


# --- figure helpers ---------------------------------------------------------------------------------------
def _names(runs: Sequence[RunData], limit: int = 6) -> str:
    labels = [r.label for r in runs]
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def _footnote(figure: Figure, lines: list[str]) -> None:
    """Notes under the axes (skipped runs): the figure grows to hold them rather than overlapping."""
    if not lines:
        figure.tight_layout()
        return
    lines = [wrapped for line in lines for wrapped in textwrap.wrap(line, width=int(figure.get_size_inches()[0] * 17))]
    height = 0.15 * len(lines) + 0.05
    width, old_height = figure.get_size_inches()
    figure.set_size_inches(width, old_height + height)
    figure.tight_layout(rect=(0, height / (old_height + height), 1, 1))
    figure.text(0.01, 0.01, "\n".join(lines), fontsize=7.5, color="#444444", ha="left", va="bottom",
                gid="footnote")


def _empty(axis, message: str) -> None:
    axis.text(0.5, 0.5, message, transform=axis.transAxes, ha="center", va="center", fontsize=10, color="#666666",
              gid="no-data")


# --- 1. win rates ------------------------------------------------------------------------------------------
def win_rate_bars(runs: Sequence[RunData], metrics: Sequence[str] = WIN_RATE_METRICS,
                  title: str = "Win rate by run, judged by the judge reward model") -> Figure:
    """One bar per run and win-rate metric, coloured by algorithm, with the metric's 95 % CI
    (`<metric>_ci_low`, `<metric>_ci_high`) as error bars. The first metric is always a bar group; a later one
    (vs reference) only when some run has it. Runs without the first metric are left out and named."""
    groups = [m for i, m in enumerate(metrics) if i == 0 or any(r.value(m) is not None for r in runs)]
    shown = [r for r in runs if r.value(groups[0]) is not None]
    skipped = [r for r in runs if r.value(groups[0]) is None]
    figure, axis = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    notes = []
    if skipped:
        notes.append(f"Skipped {len(skipped)} of {len(runs)} runs without {groups[0]}: {_names(skipped)}.")
    splits = sorted({r.split for r in shown if r.split})
    if not shown:
        _empty(axis, f"no run has {groups[0]}")
    width = 0.8 / len(groups)
    no_ci = []
    for g, metric in enumerate(groups):
        xs, heights, colours, err_x, err_y, err_low, err_high = [], [], [], [], [], [], []
        for i, run in enumerate(shown):
            value = run.value(metric)
            if value is None:
                continue
            x = i + (g - (len(groups) - 1) / 2) * width
            xs.append(x)
            heights.append(value)
            colours.append(colour_of(run.algorithm))
            low, high = run.value(f"{metric}_ci_low"), run.value(f"{metric}_ci_high")
            if low is None or high is None:
                no_ci.append(f"{run.label} ({WIN_RATE_LABELS.get(metric, metric)})")
                continue
            err_x.append(x)
            err_y.append(value)
            err_low.append(value - low)
            err_high.append(high - value)
        if not xs:
            continue
        axis.bar(xs, heights, width=width * 0.95, color=colours, edgecolor="black", linewidth=0.6,
                 hatch="//" if g else None, alpha=1.0 if g == 0 else 0.6, label=WIN_RATE_LABELS.get(metric, metric),
                 gid=f"bars:{metric}")
        if err_x:
            axis.errorbar(err_x, err_y, yerr=[err_low, err_high], fmt="none", ecolor="black", elinewidth=1,
                          capsize=4, label=f"_ci:{metric}", gid=f"ci:{metric}")
    if no_ci:
        notes.append(f"No CI logged for {', '.join(no_ci)}.")
    if len(splits) > 1:
        labels = [f"{r.label}\n({r.split or '?'})" for r in shown]
    else:
        labels = [r.label for r in shown]
    axis.set_xticks(range(len(shown)), labels, rotation=30 if len(shown) > 6 else 0,
                    ha="right" if len(shown) > 6 else "center", fontsize=8 if len(shown) > 6 else 9)
    axis.axhline(0.5, color="grey", linestyle="--", linewidth=1, zorder=0)
    axis.set_ylim(0, 1)
    axis.set_xlim(-0.6, max(len(shown), 1) - 0.4)
    axis.set_ylabel("win rate (share of prompts, 95% CI)")
    axis.set_title(title + (f" ({splits[0]} prompts)" if len(splits) == 1 else ""), fontsize=10)
    if len(groups) > 1:
        axis.legend(handles=[plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black",
                                           hatch="//" if g else None) for g in range(len(groups))],
                    labels=[WIN_RATE_LABELS.get(m, m) for m in groups], fontsize=8, loc="upper right")
    _footnote(figure, notes)
    return figure


# --- 2. reward vs KL --------------------------------------------------------------------------------------
def scorer_of(run: RunData, metric: str) -> str | None:
    """Which reward model gave the run's `metric`: its proxy or its judge."""
    return run.proxy if metric == "eval/proxy_score" else run.judge


def default_reward_metric(runs: Sequence[RunData]) -> str:
    """`eval/proxy_score` when runs have it and one proxy scored them all, else `eval/judge_score` (one metric,
    from one reward model, for every point: reward models' scales differ). A comparison over several seeds
    trains a proxy per seed, and shares one judge."""
    for metric in REWARD_METRICS:
        scored = [r for r in runs if r.value(metric) is not None]
        if scored and len({scorer_of(r, metric) for r in scored}) == 1:
            return metric
    return next((m for m in REWARD_METRICS if any(r.value(m) is not None for r in runs)), REWARD_METRICS[0])


def reward_kl_scatter(runs: Sequence[RunData], reward_metric: str | None = None, kl_metric: str = KL_METRIC,
                      annotate: bool | None = None) -> Figure:
    """Each run at (KL to the reference, reward), coloured by algorithm (circles for comparison stages,
    triangles for sweep trials), with the Pareto frontier (lower KL and higher reward are better) as a
    staircase through its points in KL order. Runs without either metric are counted in the title and
    named under the axes. `annotate` labels points with run labels; by default when there are at most 12."""
    reward_metric = reward_metric or default_reward_metric(runs)
    # One reward model per axis: runs scored by another are named under the plot, not drawn on it.
    scorers = [scorer_of(r, reward_metric) for r in runs if r.value(reward_metric) is not None]
    axis_scorer = max(set(scorers), key=scorers.count) if scorers else None

    def complete(run: RunData) -> bool:
        return (run.value(kl_metric) is not None and run.value(reward_metric) is not None
                and scorer_of(run, reward_metric) == axis_scorer)

    shown = [r for r in runs if complete(r)]
    skipped = [r for r in runs if not complete(r) and not (r.value(kl_metric) is not None
                                                           and r.value(reward_metric) is not None)]
    other_scorer = [r for r in runs if not complete(r) and r not in skipped]
    figure, axis = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    markers = {"trial": "^", "stage": "o", "run": "o"}
    algorithms = sorted({r.algorithm for r in shown}, key=lambda a: (_algorithm_rank(a), a))
    for algorithm in algorithms:
        for kind in ("stage", "run", "trial"):
            group = [r for r in shown if r.algorithm == algorithm and r.kind == kind]
            if group:
                axis.scatter([r.value(kl_metric) for r in group], [r.value(reward_metric) for r in group],
                             color=colour_of(algorithm), marker=markers[kind], s=40, edgecolor="black",
                             linewidth=0.5, alpha=0.9, zorder=3, label=f"{algorithm}:{kind}", gid=f"points:{algorithm}")
    frontier = pareto_frontier(shown, kl=lambda r: r.value(kl_metric), reward=lambda r: r.value(reward_metric))
    if frontier:
        xs, ys = [r.value(kl_metric) for r in frontier], [r.value(reward_metric) for r in frontier]
        axis.step(xs, ys, where="post", color="black", linewidth=1.2, linestyle="-", zorder=2, gid="pareto-frontier")
        axis.scatter(xs, ys, s=110, facecolors="none", edgecolors="black", linewidth=1.0, zorder=4,
                     gid="pareto-points")
    if annotate if annotate is not None else len(shown) <= 12:
        for run in shown:
            axis.annotate(run.label, (run.value(kl_metric), run.value(reward_metric)), xytext=(4, 4),
                          textcoords="offset points", fontsize=7, color="#333333")
    if not shown:
        _empty(axis, f"no run has both {kl_metric} and {reward_metric}")
    kinds = {r.kind for r in shown}
    marker = markers[next(iter(kinds))] if len(kinds) == 1 else "o"
    handles = [Line2D([], [], marker=marker, linestyle="", color=colour_of(a), markeredgecolor="black", label=a)
               for a in algorithms]
    if "trial" in kinds and kinds - {"trial"}:
        handles += [Line2D([], [], marker="o", linestyle="", color="white", markeredgecolor="black", label="run"),
                    Line2D([], [], marker="^", linestyle="", color="white", markeredgecolor="black",
                           label="sweep trial")]
    if frontier:
        handles.append(Line2D([], [], color="black", label=f"Pareto frontier ({len(frontier)})"))
    if handles:
        axis.legend(handles=handles, fontsize=8, loc="best")
    axis.set_xlabel(METRIC_LABELS.get(kl_metric, kl_metric), fontsize=9)
    axis.set_ylabel(METRIC_LABELS.get(reward_metric, reward_metric), fontsize=9)
    axis.margins(0.08)
    title = f"Reward vs KL to the reference (up and left is better)\n{len(shown)} runs plotted"
    if skipped:
        title += f", {len(skipped)} skipped (missing a metric, see below)"
    axis.set_title(title, fontsize=10)
    axis.grid(True, linewidth=0.4, alpha=0.5)
    notes = []
    if skipped:
        details = [f"{r.label} (no {' or '.join(m for m in (kl_metric, reward_metric) if r.value(m) is None)})"
                   for r in skipped[:6]]
        more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        notes.append(f"Skipped {len(skipped)} of {len(runs)} runs: {', '.join(details)}{more}.")
    if other_scorer:
        notes.append(f"Not drawn, scored by another reward model than this axis's ({axis_scorer}): "
                     f"{_names(other_scorer)}.")
    _footnote(figure, notes)
    return figure


# --- 3. training curves ------------------------------------------------------------------------------------
def training_curves(runs: Sequence[RunData], panels: Sequence[CurvePanel] = CURVE_PANELS) -> Figure:
    """One panel per `CurvePanel`, one line per run (x = MLflow step: the count of batches trained), coloured by
    algorithm. A run draws the first of the panel's keys it has a history for; a key other than the panel's
    first is named in its legend entry. Runs with no history for a panel are named in that panel's title."""
    figure, axes = plt.subplots(len(panels), 1, figsize=(FIGSIZE[0], 3.0 * len(panels) + 0.4), dpi=DPI,
                                squeeze=False)
    for axis, panel in zip(axes[:, 0], panels):
        missing = []
        drawn: dict[str, int] = {}  # lines per algorithm
        for run in runs:
            key = next((k for k in panel.keys if run.histories.get(k)), None)
            if key is None:
                missing.append(run)
                continue
            steps, values = zip(*sorted(run.histories[key]))
            label = run.label if key == panel.keys[0] else f"{run.label} ({key})"
            axis.plot(steps, values, color=colour_of(run.algorithm), linewidth=1.0 if run.kind == "trial" else 1.4,
                      alpha=0.75 if run.kind == "trial" else 1.0, marker="." if len(steps) <= 30 else None,
                      markersize=4, label=label, gid=f"curve:{run.run_id}")
            drawn[run.algorithm] = drawn.get(run.algorithm, 0) + 1
        title = f"{panel.title} ({panel.keys[0]})"
        if missing and len(missing) == len(runs) > 1:
            title += f"\nnot logged by any of the {len(runs)} runs"
        elif missing:
            title += "\n" + textwrap.fill(f"not logged by {len(missing)} run{'s' if len(missing) > 1 else ''}: "
                                          f"{_names(missing, limit=5)}", width=100)
        axis.set_title(title, fontsize=9)
        axis.set_ylabel(panel.ylabel, fontsize=9)
        axis.set_xlabel("training step", fontsize=9)
        axis.grid(True, linewidth=0.4, alpha=0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        lines = sum(drawn.values())
        if lines > 12:  # a sweep's many trials: one legend entry per algorithm
            axis.legend(handles=[Line2D([], [], color=colour_of(a), label=f"{a} ({n} runs)") for a, n in drawn.items()],
                        fontsize=7, loc="best")
        elif lines:
            axis.legend(fontsize=7, loc="best", ncol=2 if lines > 6 else 1)
        else:
            _empty(axis, f"no run logged {' or '.join(panel.keys)}")
    figure.tight_layout()
    return figure


# --- all three ---------------------------------------------------------------------------------------------
# --- 4. over-optimisation ----------------------------------------------------------------------------------
OVEROPT_KL, OVEROPT_GOLD, OVEROPT_PROXY = "val/overopt/kl", "val/overopt/gold_score", "val/overopt/proxy_score"
OVEROPT_KEYS = (OVEROPT_KL, OVEROPT_GOLD, OVEROPT_PROXY)
BEST_OF_N = "best-of-n"


def overoptimisation_curves(runs: Sequence[RunData]) -> list[tuple[RunData, list[tuple[float, float, float]]]]:
    """(run, [(sqrt KL, gold score, proxy score), ...]) for every curve: best-of-N over N (its analytic KL, one
    curve per seed) and each run scored along training (`bench.overoptimisation`), over steps."""
    curves = []
    best_of_n = [r for r in runs if r.algorithm == BEST_OF_N and r.value(KL_METRIC) is not None]
    for seed in sorted({r.seed for r in best_of_n}, key=str):
        points = sorted((r.value(KL_METRIC), r.value("eval/judge_score"), r.value("eval/proxy_score"), r)
                        for r in best_of_n if r.seed == seed)
        if len(points) > 1:
            curves.append((points[0][3], [(math.sqrt(max(kl, 0.0)), gold, proxy) for kl, gold, proxy, _ in points]))
    for run in runs:
        if all(key in run.histories for key in OVEROPT_KEYS):
            by_step = {key: dict(run.histories[key]) for key in OVEROPT_KEYS}
            steps = sorted(set.intersection(*(set(values) for values in by_step.values())))
            curves.append((run, [(math.sqrt(max(by_step[OVEROPT_KL][s], 0.0)), by_step[OVEROPT_GOLD][s],
                                  by_step[OVEROPT_PROXY][s]) for s in steps]))
    return curves


def overoptimisation(runs: Sequence[RunData]) -> Figure:
    """Gao et al.'s (2023) view: the gold reward model's score and the proxy's against sqrt(KL to the
    reference), for best-of-N (over N) and for the runs scored along training (over steps). Each curve is
    drawn as the change from its own start (N = 1, or the step before training): best-of-N is judged on the
    test prompts, training runs on validation prompts, and the change is what compares across them. A proxy
    curve that climbs while the gold one flattens or falls is over-optimisation."""
    figure, (gold_axis, proxy_axis) = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.8, FIGSIZE[1]), dpi=DPI)
    curves = overoptimisation_curves(runs)
    for run, points in curves:
        xs = [x for x, _, _ in points]
        label = f"best-of-N (seed {run.seed})" if run.algorithm == BEST_OF_N else run.label
        style = {"color": colour_of(run.algorithm), "marker": "o", "markersize": 3, "linewidth": 1.2,
                 "linestyle": "--" if run.algorithm == BEST_OF_N else "-"}
        for axis, index in ((gold_axis, 1), (proxy_axis, 2)):
            ys = [p[index] for p in points]
            if all(y is not None for y in ys):
                axis.plot(xs, [y - ys[0] for y in ys], label=label, **style)
    for axis, name in ((gold_axis, "gold (judge) RM score"), (proxy_axis, "proxy RM score")):
        axis.set_xlabel("sqrt(KL to the reference), nats^1/2", fontsize=9)
        axis.set_ylabel(f"{name}, change from its start", fontsize=9)
        axis.axhline(0, color="grey", linewidth=0.6)
        axis.grid(True, linewidth=0.4, alpha=0.5)
        if not curves:
            _empty(axis, "no best-of-N runs and no run scored along training")
    gold_axis.set_title("Gold score vs sqrt(KL)", fontsize=10)
    proxy_axis.set_title("Proxy score vs sqrt(KL)", fontsize=10)
    if curves:
        proxy_axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def make_figures(runs: Sequence[RunData], reward_metric: str | None = None) -> dict[str, Figure]:
    """{"win_rates", "reward_vs_kl", "training_curves"} -> Figure, and "overoptimisation" when any run has
    its curves. Close them with `close_figures`."""
    figures: dict[str, Figure] = {}
    try:
        figures["win_rates"] = win_rate_bars(runs)
        figures["reward_vs_kl"] = reward_kl_scatter(runs, reward_metric)
        figures["training_curves"] = training_curves(runs)
        if overoptimisation_curves(runs):
            figures["overoptimisation"] = overoptimisation(runs)
    except BaseException:
        close_figures(figures)
        raise
    return figures


def close_figures(figures: Mapping[str, Figure]) -> None:
    for figure in figures.values():
        plt.close(figure)


# --- MLflow collectors --------------------------------------------------------------------------------------
def _label(run) -> tuple[str, str]:
    """(label, kind) of an MLflow run, from the tags `bench compare` and `bench sweep` set."""
    tags = run.data.tags
    algorithm = tags.get("algorithm", "?")
    if "optuna.trial" in tags or tags.get("sweep_role") == "trial":
        state = tags.get("optuna.state", "")
        label = f"{algorithm} trial {tags.get('optuna.trial', '?')}"
        return label + (f" ({state.lower()})" if state and state != "COMPLETE" else ""), "trial"
    if "compare_stage" in tags:
        return tags["compare_stage"], "stage"  # made unique by its seed below, when a comparison has several
    return (algorithm if algorithm != "?" else run.info.run_name or run.info.run_id[:8]), "run"


def _one_value_per_step(history) -> list[tuple[int, float]]:
    """(step, value) sorted by step; a step logged twice (a resumed run relogs its last step) keeps its latest."""
    latest = {}
    for metric in sorted(history, key=lambda m: m.timestamp):
        latest[metric.step] = metric.value
    return sorted(latest.items())


def collect_runs(client, run_ids: Sequence[str], histories: bool = True,
                 history_keys: Sequence[str] = (*CURVE_KEYS, *OVEROPT_KEYS)) -> list[RunData]:
    """`RunData` of each run, in the given order (repeated ids once): latest metrics, the `algorithm` tag, a
    label (the comparison stage, `<algorithm> trial <n>` for a sweep trial, else the algorithm or run name;
    made unique with the run id's start), and, when `histories`, the step series of `history_keys` that the
    run logged (`client.get_metric_history`; one value per step, the latest logged)."""
    runs, seen = [], set()
    for run_id in run_ids:
        if run_id in seen:
            continue
        seen.add(run_id)
        run = client.get_run(run_id)
        label, kind = _label(run)
        data = RunData(run_id, label, run.data.tags.get("algorithm", "?"), dict(run.data.metrics), kind=kind,
                       split=run.data.params.get("eval.split"), seed=run.data.tags.get("seed"),
                       proxy=run.data.tags.get("eval.proxy"), judge=run.data.tags.get("eval.judge.path"))
        if histories:
            for key in history_keys:
                if key in run.data.metrics:
                    data.histories[key] = _one_value_per_step(client.get_metric_history(run_id, key))
        runs.append(data)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} (seed {run.seed})" if run.seed is not None else f"{run.label} ({run.run_id[:6]})"
    return runs


def comparison_run_ids(client, parent_run_id: str) -> list[str]:
    """The run ids of a `bench compare` parent's policy stages (`stage.<name>` tags, reward models left out), in
    stage order. The tags, not `mlflow.parentRunId`, name them: a reused stage run belongs to an older parent."""
    tags = client.get_run(parent_run_id).data.tags
    stages = [(name.removeprefix("stage."), value.split()[0]) for name, value in tags.items()
              if name.startswith("stage.") and not name.startswith("stage.rm") and value.split()]
    return [run_id for _, run_id in sorted(stages, key=lambda s: (_algorithm_rank(s[0].split(".seed")[0]), s[0]))]


def sweep_run_ids(client, study_run_id: str) -> list[str]:
    """The run ids of a sweep study's trials (children tagged `sweep_role=trial`), pruned and failed ones
    included, in trial order."""
    experiment_id = client.get_run(study_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{study_run_id}' and tags.sweep_role = 'trial'"
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break

    def trial_number(run) -> tuple[int, str]:
        number = run.data.tags.get("optuna.trial", "")
        return (int(number) if number.isdigit() else 1 << 30, run.info.run_id)

    return [run.info.run_id for run in sorted(found, key=trial_number)]


# --- outputs ------------------------------------------------------------------------------------------------
def log_figures(client, parent_run_id: str, run_ids: Sequence[str], reward_metric: str | None = None,
                artifact_dir: str = "figures") -> list[str]:
    """Collect `run_ids` and log the three figures to `parent_run_id` as `<artifact_dir>/<name>.png`; returns
    the artifact paths. The figures are closed afterwards, also on error."""
    figures = make_figures(collect_runs(client, run_ids), reward_metric)
    try:
        paths = []
        for name, figure in figures.items():
            path = f"{artifact_dir}/{name}.png"
            client.log_figure(parent_run_id, figure, path, save_kwargs={"dpi": DPI})
            paths.append(path)
        return paths
    finally:
        close_figures(figures)


def log_figures_of_finished_run(client, parent_run_id: str, run_ids: Sequence[str]) -> None:
    """`log_figures` on a comparison's or a study's parent run, once its runs are recorded: a figure that
    fails is a warning, never a reason to lose the comparison or the study."""
    try:
        log_figures(client, parent_run_id, run_ids)
    except Exception as err:
        log.warning("the figures of run %s were not logged: %s: %s", parent_run_id, type(err).__name__, err)


def save_pngs(figures: Mapping[str, Figure], directory: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write each figure to `<directory>/<stem>-<name>.png` atomically (`bench.atomic.write_atomically`);
    returns {name: path}. The figures stay open: close them with `close_figures`."""
    paths = {}
    for name, figure in figures.items():
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=DPI)
        paths[name] = Path(directory) / f"{stem}-{name}.png"
        write_atomically(paths[name], png.getvalue())
    return paths


CAPTIONS = {"win_rates": "Win rates with 95% CIs", "reward_vs_kl": "Reward vs KL with the Pareto frontier",
            "training_curves": "Training curves: reward margin and KL",
            "overoptimisation": "Over-optimisation: gold and proxy scores against sqrt(KL)"}


def markdown_images(paths: Mapping[str, Path]) -> str:
    """Markdown that embeds the PNGs of `save_pngs`, by file name (the Markdown sits in the same directory)."""
    return "\n\n".join(f"![{CAPTIONS.get(name, name)}]({Path(path).name})" for name, path in paths.items()) + "\n"
