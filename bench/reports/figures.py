"""Cross-run figures for comparisons and sweeps: win rates, reward vs KL with its frontiers, training curves, and
Gao et al.'s over-optimisation view.

Four layers:

* pure figure functions on plain data (`RunData`), which return matplotlib Figures: `win_rate_bars`,
  `reward_kl_scatter`, `training_curves`, `overoptimisation`; and the pure computations they draw, which tests
  check on their own: `pareto_frontier`, `method_frontiers`, `fit_gao` (with `gao_bon`, `gao_rl`) and
  `dwarfing_runs`;
* which reward an axis shows: in a gold world (the runs' judge is the gold: a computable reward such as
  `reward:vader`, or a reward model trained as the gold) every reward axis is the gold's `eval/judge_score`,
  and the proxy's score only ever sits on an axis that says "proxy" (`default_reward_metric`);
* MLflow collectors: `comparison_run_ids` (a `bench compare` parent's stage runs), `sweep_run_ids` (a study's
  trial runs) and `collect_runs` (latest metrics, tags and metric histories of given runs);
* outputs: `log_figures` puts the figures on an MLflow run as `figures/<name>.png`; `save_pngs` writes them
  atomically beside a results Markdown file and `markdown_images` embeds them.

A comparison's stages may be arms: settings of one algorithm (`dpo-beta0.1`, `dpo-beta0.5`) or best-of-N for
several N. An arm is coloured by its algorithm, in a shade and with a marker of its own.

Nothing here drops a run silently: a run without the metrics a figure needs is left out of that figure and
named in it. Legends sit outside the axes when they could hide points.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402

import modules  # noqa: E402
from bench.core.atomic import write_atomically  # noqa: E402

log = logging.getLogger(__name__)

# --- conventions ------------------------------------------------------------------------------------------
FALLBACK_COLOUR = "#7f7f7f"
FIGSIZE = (6.4, 4.2)
DPI = 120

WIN_RATE_METRICS = ("eval/win_rate_vs_chosen", "eval/win_rate_vs_ref")
WIN_RATE_LABELS = {"eval/win_rate_vs_chosen": "vs chosen", "eval/win_rate_vs_ref": "vs reference"}
KL_METRIC = "eval/kl"
PROXY_METRIC, JUDGE_METRIC = "eval/proxy_score", "eval/judge_score"
REWARD_METRICS = (PROXY_METRIC, JUDGE_METRIC)  # outside a gold world, the first that one scorer gave every run
METRIC_LABELS = {
    "eval/kl": "KL(policy ‖ reference), nats per response (eval/kl)",
    "eval/proxy_score": "proxy RM score, RM units (eval/proxy_score)",
    "eval/judge_score": "judge RM score, RM units (eval/judge_score)",
}

BEST_OF_N = "best-of-n"  # best-of-N's `algorithm` tag (bench/evaluation/best_of_n.py)
BON_PROXY, BON_GOLD = "best-of-N by proxy", "best-of-N by gold (ceiling)"  # its two arms, by what picks
BEST_OF_N_COLOUR, GOLD_CEILING_COLOUR = "#7b4173", "#b8860b"  # apart from every algorithm's (tab10, tab20b)
BOUND_NOTE = "KL: upper bound"  # best-of-N's KL is log N - (N-1)/N, an upper bound on the true KL

# An arm's shade of its algorithm's colour (>0 towards white, <0 towards black) and its marker, by its index
# among the algorithm's arms: the first arm keeps the algorithm's own colour and a circle.
ARM_SHADES = (0.0, 0.45, -0.4, 0.7, -0.6)
ARM_MARKERS = ("o", "s", "D", "v", "P", "X", "h", "*")
TRIAL_MARKER = "^"  # sweep trials: many points of one algorithm, one marker


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

OVEROPT_KL, OVEROPT_GOLD, OVEROPT_PROXY = "val/overopt/kl", "val/overopt/gold_score", "val/overopt/proxy_score"
OVEROPT_KEYS = (OVEROPT_KL, OVEROPT_GOLD, OVEROPT_PROXY)
# The history along training that scores like each final metric: the judge's (the gold) or the proxy's.
CHECKPOINT_KEYS = {JUDGE_METRIC: OVEROPT_GOLD, PROXY_METRIC: OVEROPT_PROXY}

FIGURE_NAMES = ("win_rates", "reward_vs_kl", "training_curves")


def algorithm_colours() -> dict[str, str]:
    """Each algorithm's colour (its module's `colour`), fixed across every figure and results file."""
    return {name: cls.colour for name, cls in modules.registry().items() if name in modules.algorithms()}


def colour_of(algorithm: str) -> str:
    if algorithm == BEST_OF_N:  # not a training module, so not in the registry
        return BEST_OF_N_COLOUR
    return algorithm_colours().get(algorithm, FALLBACK_COLOUR)


def _algorithm_rank(algorithm: str) -> int:
    order = modules.algorithms()
    return order.index(algorithm) if algorithm in order else len(order)


def _display_name(spec: str | None) -> str:
    """A scorer as a reader knows it: `reward:vader` as is, a reward-model folder by its last component."""
    if not spec:
        return "?"
    return spec if spec.startswith("reward:") else (Path(spec).name or spec)


@dataclass
class RunData:
    """What the figures need of one run. `metrics` holds latest values (MLflow's `run.data.metrics`);
    `histories` maps a metric key to its (step, value) series, sorted by step; `tags` the run's MLflow tags,
    which say its arm, its judge's kind and whether its KL is exact or a bound."""

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
    tags: dict[str, str] = field(default_factory=dict)

    def value(self, key: str) -> float | None:
        """The metric's latest value, or None when it is missing or not finite."""
        value = self.metrics.get(key)
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    @property
    def arm(self) -> str:
        """What the run is one seed of: its comparison stage (`dpo-beta0.1`), best-of-N by what picks (all N
        together: N is annotated, not an arm), or its algorithm (sweep trials, lone runs)."""
        if self.algorithm == BEST_OF_N:
            return BON_GOLD if self.best_of_n_pick == "gold" else BON_PROXY
        if self.kind == "trial":
            return self.algorithm
        return self.tags.get("compare_stage") or self.algorithm

    @property
    def best_of_n(self) -> int | None:
        n = self.tags.get("best_of_n", "")
        return int(n) if n.isdigit() else None

    @property
    def best_of_n_pick(self) -> str | None:
        """`proxy` or `gold`: which reward picked the best of N (best-of-N runs only)."""
        if self.algorithm != BEST_OF_N:
            return None
        pick = self.tags.get("best_of_n_pick")
        if pick:
            return pick
        return "gold" if self.tags.get("compare_stage", "").endswith("-gold") else "proxy"

    @property
    def kl_is_bound(self) -> bool:
        kind = self.tags.get("eval.kl_kind")
        # Best-of-N runs logged before `eval.kl_kind` existed carry the same analytic value: a bound too.
        return kind == "bound" if kind else self.algorithm == BEST_OF_N

    @property
    def judge_is_gold(self) -> bool:
        """Whether the judge that scored `eval/judge_score` is the gold: a computable reward (judge kind
        `reward`, spec `reward:NAME`), a reward model trained as the gold, or a tag that says so."""
        tags = self.tags
        return (tags.get("eval.judge.kind") == "reward" or tags.get("eval.judge.trained_role") == "gold"
                or tags.get("eval.judge.gold", "").lower() in ("1", "true", "yes")
                or (self.judge or "").startswith("reward:"))


# --- arms: colour by algorithm, a shade and a marker per arm -----------------------------------------------
@dataclass(frozen=True)
class ArmStyle:
    colour: str
    marker: str


def _shade(colour: str, amount: float) -> str:
    if amount == 0:  # the algorithm's own colour, exactly as its module spells it
        return colour
    rgb = np.array(to_rgb(colour))
    return to_hex(rgb + (1 - rgb) * amount if amount >= 0 else rgb * (1 + amount))


def _arm_order(run: RunData) -> tuple:
    return (_algorithm_rank(run.algorithm), run.algorithm, _natural_key(run.arm))


def arm_styles(runs: Sequence[RunData]) -> dict[str, ArmStyle]:
    """{arm: style}: the arms of one algorithm share its colour, each in a shade and with a marker of its own
    (in natural order of their names, so `dpo-beta0.1` keeps the algorithm's own colour and a circle)."""
    styles: dict[str, ArmStyle] = {}
    count: dict[str, int] = {}
    for run in sorted(runs, key=_arm_order):
        if run.arm in styles:
            continue
        if run.arm == BON_GOLD:
            styles[run.arm] = ArmStyle(GOLD_CEILING_COLOUR, "o")
            continue
        i = count.get(run.algorithm, 0)
        count[run.algorithm] = i + 1
        styles[run.arm] = ArmStyle(_shade(colour_of(run.algorithm), ARM_SHADES[i % len(ARM_SHADES)]),
                                   ARM_MARKERS[i % len(ARM_MARKERS)])
    return styles


def _natural_key(name: str) -> list:
    """`best-of-4` before `best-of-16`, `dpo-beta0.1` before `dpo-beta0.5`: numbers compare as numbers."""
    return [float(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", name))]


# --- frontiers --------------------------------------------------------------------------------------------
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


def method_frontiers(points: Iterable[tuple[str, float, float]]) -> dict[str, list[tuple[float, float]]]:
    """Each method's frontier from (method, kl, reward) points: the upper-left envelope of its own points, as
    (kl, reward) vertices in KL order, each once. Read as a staircase it is the best reward the method reached
    at or below each KL: methods are compared envelope to envelope, not against one global staircase."""
    by_method: dict[str, list[tuple[float, float]]] = {}
    for method, kl, reward in points:
        by_method.setdefault(method, []).append((float(kl), float(reward)))
    return {method: sorted(set(pareto_frontier(found))) for method, found in by_method.items()}


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


def _legend_outside(axis, handles: Sequence, fontsize: float = 8, **kwargs):
    """The legend right of the axes, where it cannot hide a point; `_make_room` widens the figure for it."""
    return axis.legend(handles=handles, fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0, **kwargs)


def _make_room(figure: Figure, legends: Sequence) -> None:
    """Widen the figure by its widest outside legend, so the axes keep their width (tight_layout then fits)."""
    renderer = figure.canvas.get_renderer()
    widths = [legend.get_window_extent(renderer).width / figure.dpi for legend in legends if legend is not None]
    if widths:
        width, height = figure.get_size_inches()
        figure.set_size_inches(width + max(widths) + 0.2, height)


def _overlapping(texts: Sequence, renderer) -> bool:
    boxes = sorted((t.get_window_extent(renderer) for t in texts if t.get_text()), key=lambda b: b.x0)
    return any(a.x1 > b.x0 + 0.5 for a, b in zip(boxes, boxes[1:]))


# Tick-label layouts tried in turn until no two labels overlap: (rotation, font size, wrap width or None).
TICK_LAYOUTS = ((0, 9, 12), (0, 8, 9), (90, 8, None), (90, 7, None), (90, 6, None))


def _fit_x_tick_labels(figure: Figure, axis, labels: Sequence[str]) -> None:
    """Set the x tick labels flat and wrapped when they fit side by side, else rotated upright and smaller:
    measured after layout, since whether they overlap depends on the text and the axes' final width."""
    for rotation, size, wrap in TICK_LAYOUTS:
        texts = ["\n".join(textwrap.fill(line, wrap) for line in label.split("\n")) if wrap else label
                 for label in labels]
        axis.set_xticks(range(len(labels)), texts, rotation=rotation, fontsize=size, ha="center")
        figure.tight_layout()
        figure.canvas.draw()
        if not _overlapping(axis.get_xticklabels(), figure.canvas.get_renderer()):
            return


# --- 1. win rates ------------------------------------------------------------------------------------------
def _bar_values(runs: Sequence[RunData], metric: str, offset: float, styles: Mapping[str, ArmStyle],
                no_ci: list[str]) -> dict[str, list]:
    """Positions, heights, colours and CI error bars of one metric's bars (runs without it get none)."""
    bars = {key: [] for key in ("xs", "heights", "colours", "err_x", "err_y", "err_low", "err_high")}
    for i, run in enumerate(runs):
        value = run.value(metric)
        if value is None:
            continue
        bars["xs"].append(i + offset)
        bars["heights"].append(value)
        bars["colours"].append(styles[run.arm].colour)
        low, high = run.value(f"{metric}_ci_low"), run.value(f"{metric}_ci_high")
        if low is None or high is None:
            no_ci.append(f"{run.label} ({WIN_RATE_LABELS.get(metric, metric)})")
            continue
        bars["err_x"].append(i + offset)
        bars["err_y"].append(value)
        bars["err_low"].append(value - low)
        bars["err_high"].append(high - value)
    return bars


def win_rate_bars(runs: Sequence[RunData], metrics: Sequence[str] = WIN_RATE_METRICS,
                  title: str | None = None) -> Figure:
    """One bar per run and win-rate metric, coloured by algorithm (a shade per arm), with the metric's 95 % CI
    (`<metric>_ci_low`, `<metric>_ci_high`) as error bars. The first metric is always a bar group; a later one
    (vs reference) only when some run has it. Runs without the first metric are left out and named. The x
    labels are wrapped or turned upright, whichever keeps them apart. The title names the judge: the gold in a
    gold world."""
    if title is None:
        judge = f"the gold ({_display_name(axis_scorer(runs, JUDGE_METRIC))})" if gold_world(runs) else "the judge"
        title = f"Win rate by run, judged by {judge}"
    groups = [m for i, m in enumerate(metrics) if i == 0 or any(r.value(m) is not None for r in runs)]
    shown = [r for r in runs if r.value(groups[0]) is not None]
    skipped = [r for r in runs if r.value(groups[0]) is None]
    # Many bars (arms x seeds) get room of their own rather than ever-smaller labels.
    figure, axis = plt.subplots(figsize=(max(FIGSIZE[0], 0.34 * len(shown) + 2.4), FIGSIZE[1]), dpi=DPI)
    notes = []
    if skipped:
        notes.append(f"Skipped {len(skipped)} of {len(runs)} runs without {groups[0]}: {_names(skipped)}.")
    splits = sorted({r.split for r in shown if r.split})
    if not shown:
        _empty(axis, f"no run has {groups[0]}")
    styles = arm_styles(shown)
    width = 0.8 / len(groups)
    no_ci: list[str] = []
    for g, metric in enumerate(groups):
        bars = _bar_values(shown, metric, (g - (len(groups) - 1) / 2) * width, styles, no_ci)
        if not bars["xs"]:
            continue
        axis.bar(bars["xs"], bars["heights"], width=width * 0.95, color=bars["colours"], edgecolor="black",
                 linewidth=0.6, hatch="//" if g else None, alpha=1.0 if g == 0 else 0.6,
                 label=WIN_RATE_LABELS.get(metric, metric), gid=f"bars:{metric}")
        if bars["err_x"]:
            axis.errorbar(bars["err_x"], bars["err_y"], yerr=[bars["err_low"], bars["err_high"]], fmt="none",
                          ecolor="black", elinewidth=1, capsize=4, label=f"_ci:{metric}", gid=f"ci:{metric}")
    if no_ci:
        notes.append(f"No CI logged for {', '.join(no_ci)}.")
    axis.axhline(0.5, color="grey", linestyle="--", linewidth=1, zorder=0)
    axis.set_ylim(0, 1)
    axis.set_xlim(-0.6, max(len(shown), 1) - 0.4)
    axis.set_ylabel("win rate (share of prompts, 95% CI)")
    axis.set_title(title + (f" ({splits[0]} prompts)" if len(splits) == 1 else ""), fontsize=10)
    if len(groups) > 1:  # outside: a bar near 1 would hide under it
        legend = _legend_outside(axis, [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black",
                                                      hatch="//" if g else None) for g in range(len(groups))],
                                 labels=[WIN_RATE_LABELS.get(m, m) for m in groups])
        _make_room(figure, [legend])
    labels = [f"{r.label}\n({r.split or '?'})" for r in shown] if len(splits) > 1 else [r.label for r in shown]
    _fit_x_tick_labels(figure, axis, labels)
    _footnote(figure, notes)
    return figure


# --- 2. which reward an axis shows ------------------------------------------------------------------------
def scorer_of(run: RunData, metric: str) -> str | None:
    """Which reward model gave the run's `metric`: its proxy or its judge."""
    return run.proxy if metric == PROXY_METRIC else run.judge


def gold_world(runs: Sequence[RunData]) -> bool:
    """Whether the runs were judged by the gold: then every reward axis is the gold's unless it says proxy."""
    return any(r.judge_is_gold and r.value(JUDGE_METRIC) is not None for r in runs)


def default_reward_metric(runs: Sequence[RunData]) -> str:
    """The reward on a reward axis. In a gold world, `eval/judge_score`: the gold is the outcome, and a proxy's
    score would put best-of-N (picked by that proxy) on the frontier by construction. Otherwise
    `eval/proxy_score` when runs have it and one proxy scored them all, else `eval/judge_score` (one metric,
    from one reward model, for every point: reward models' scales differ; a comparison over several seeds
    trains a proxy per seed, and shares one judge)."""
    if gold_world(runs):
        return JUDGE_METRIC
    for metric in REWARD_METRICS:
        scored = [r for r in runs if r.value(metric) is not None]
        if scored and len({scorer_of(r, metric) for r in scored}) == 1:
            return metric
    return next((m for m in REWARD_METRICS if any(r.value(m) is not None for r in runs)), REWARD_METRICS[0])


def axis_scorer(runs: Sequence[RunData], metric: str) -> str | None:
    """The one scorer of a reward axis: the gold when it judged any run, else the scorer of most runs (ties:
    the first by name). Runs scored by another are named under the plot, not drawn on it."""
    scored = [r for r in runs if r.value(metric) is not None]
    if metric == JUDGE_METRIC and any(r.judge_is_gold for r in scored):
        scored = [r for r in scored if r.judge_is_gold]
    scorers = [scorer_of(r, metric) for r in scored]
    return max(sorted(set(scorers), key=str), key=scorers.count) if scorers else None


def reward_label(metric: str, scorer: str | None, gold: bool) -> str:
    """A reward axis's label: it says gold or proxy in a gold world, and names the scorer."""
    if gold and metric == JUDGE_METRIC:
        return f"gold reward ({_display_name(scorer)}), {metric}"
    if gold and metric == PROXY_METRIC:
        return f"proxy RM score, not the gold, {metric}"
    if metric == JUDGE_METRIC and scorer:
        return f"judge RM score ({_display_name(scorer)}), {metric}"
    return METRIC_LABELS.get(metric, metric)


# --- 3. reward vs KL --------------------------------------------------------------------------------------
def _split_runs(runs: Sequence[RunData], reward_metric: str, kl_metric: str, scorer: str | None):
    """(shown, skipped: missing a metric, other: scored by another reward model than the axis's)."""
    def has_both(run: RunData) -> bool:
        return run.value(kl_metric) is not None and run.value(reward_metric) is not None

    shown = [r for r in runs if has_both(r) and scorer_of(r, reward_metric) == scorer]
    other = [r for r in runs if has_both(r) and scorer_of(r, reward_metric) != scorer]
    return shown, [r for r in runs if not has_both(r)], other


def _method_of(run: RunData) -> str:
    """What gets a frontier of its own: the algorithm, with best-of-N split by what picks."""
    return run.arm if run.algorithm == BEST_OF_N else run.algorithm


def _draw_final_points(axis, shown: Sequence[RunData], styles: Mapping[str, ArmStyle], kl_metric: str,
                       reward_metric: str) -> None:
    """Each run's final evaluation, in its arm's colour and marker; hollow where its KL is an upper bound."""
    groups: dict[tuple, list[RunData]] = {}
    for run in sorted(shown, key=_arm_order):
        groups.setdefault((run.algorithm, run.arm, run.kind, run.kl_is_bound), []).append(run)
    for (algorithm, arm, kind, bound), group in groups.items():
        colour = styles[arm].colour
        axis.scatter([r.value(kl_metric) for r in group], [r.value(reward_metric) for r in group],
                     marker=TRIAL_MARKER if kind == "trial" else styles[arm].marker, s=44,
                     facecolors="none" if bound else colour, edgecolors=colour if bound else "black",
                     linewidths=1.5 if bound else 0.5, alpha=0.9, zorder=3, label=f"{arm}:{kind}",
                     gid=f"points:{algorithm}")


def _arm_handles(shown: Sequence[RunData], styles: Mapping[str, ArmStyle]) -> list[Line2D]:
    """One legend entry per arm (hollow and saying so where its KL is an upper bound), then the kinds of run
    when sweep trials sit beside other runs."""
    handles = []
    for arm in dict.fromkeys(r.arm for r in sorted(shown, key=_arm_order)):
        members = [r for r in shown if r.arm == arm]
        bound = all(r.kl_is_bound for r in members)
        colour = styles[arm].colour
        marker = TRIAL_MARKER if {r.kind for r in members} == {"trial"} else styles[arm].marker
        label = arm.replace(" (ceiling)", ": ceiling") + (f" ({BOUND_NOTE})" if bound else "")
        handles.append(Line2D([], [], marker=marker, linestyle="--" if arm == BON_GOLD else "", color=colour,
                              markerfacecolor="none" if bound else colour,
                              markeredgecolor=colour if bound else "black", label=label))
    if any(r.kl_is_bound for r in shown) and not all(r.kl_is_bound for r in shown if r.arm in
                                                     {b.arm for b in shown if b.kl_is_bound}):
        handles.append(Line2D([], [], marker="o", linestyle="", color="black", markerfacecolor="none",
                              label=f"hollow: {BOUND_NOTE}"))
    kinds = {r.kind for r in shown}
    if "trial" in kinds and kinds - {"trial"}:
        handles += [Line2D([], [], marker="o", linestyle="", color="white", markeredgecolor="black", label="run"),
                    Line2D([], [], marker=TRIAL_MARKER, linestyle="", color="white", markeredgecolor="black",
                           label="sweep trial")]
    return handles


def _draw_global_frontier(axis, shown: Sequence[RunData], kl_metric: str, reward_metric: str) -> list[Line2D]:
    """One Pareto staircase over every run (outside a gold world: all scored by one reward model)."""
    frontier = pareto_frontier(shown, kl=lambda r: r.value(kl_metric), reward=lambda r: r.value(reward_metric))
    if not frontier:
        return []
    xs, ys = [r.value(kl_metric) for r in frontier], [r.value(reward_metric) for r in frontier]
    axis.step(xs, ys, where="post", color="black", linewidth=1.2, linestyle="-", zorder=2, gid="pareto-frontier")
    axis.scatter(xs, ys, s=110, facecolors="none", edgecolors="black", linewidth=1.0, zorder=4, gid="pareto-points")
    return [Line2D([], [], color="black", label=f"Pareto frontier ({len(frontier)})")]


def checkpoint_points(run: RunData, reward_metric: str) -> list[tuple[int, float, float]]:
    """(step, KL, reward) of a run's checkpoints along training (`val/overopt/*`: validation prompts, exact
    KL), at the steps that logged both; none when no history scores like `reward_metric`."""
    key = CHECKPOINT_KEYS.get(reward_metric)
    if key is None or not run.histories.get(OVEROPT_KL) or not run.histories.get(key):
        return []
    kl, reward = dict(run.histories[OVEROPT_KL]), dict(run.histories[key])
    return [(step, kl[step], reward[step]) for step in sorted(kl.keys() & reward.keys())
            if math.isfinite(kl[step]) and math.isfinite(reward[step])]


def _draw_checkpoints(axis, shown: Sequence[RunData], styles: Mapping[str, ArmStyle],
                      reward_metric: str) -> list[tuple[str, float, float]]:
    """Each run's checkpoints, small and faded (other prompts than the final points), joined in step order;
    returns them as (method, KL, reward) for the frontiers."""
    points = []
    for run in sorted(shown, key=_arm_order):
        found = checkpoint_points(run, reward_metric)
        if not found:
            continue
        style = styles[run.arm]
        kls, rewards = [k for _, k, _ in found], [r for _, _, r in found]
        axis.plot(kls, rewards, color=style.colour, linewidth=0.7, alpha=0.35, zorder=1, gid=f"trajectory:{run.run_id}")
        axis.scatter(kls, rewards, marker=style.marker, s=14, color=style.colour, edgecolors="none", alpha=0.5,
                     zorder=2, label=f"{run.arm}:checkpoints", gid=f"checkpoints:{run.algorithm}")
        points += [(_method_of(run), k, r) for k, r in zip(kls, rewards)]
    return points


def _draw_method_frontiers(axis, points: Iterable[tuple[str, float, float]]) -> int:
    """Each method's frontier as a staircase in its colour (the gold-picked best-of-N is a ceiling, drawn
    apart); returns how many were drawn."""
    frontiers = method_frontiers(p for p in points if p[0] != BON_GOLD)
    for method, vertices in frontiers.items():
        xs, ys = zip(*vertices)
        axis.step(xs, ys, where="post", color=colour_of(BEST_OF_N if method == BON_PROXY else method),
                  linewidth=1.5, alpha=0.85, zorder=2, gid=f"frontier:{method}")
    return len(frontiers)


def _label_points(axis, labels: Iterable[tuple[str, float, float]], dx: float = 4, dy: float = 4,
                  gid: str = "point-label") -> None:
    """Each (text, x, y) beside its point, on the side that faces the middle of the axes: to the right of a point
    near the right edge, a label runs out of the axes and under the legend beside them. Reads the x limits, so
    every point and line must be drawn (and the margins set) first."""
    low, high = axis.get_xlim()
    for text, x, y in labels:
        left = high > low and (x - low) / (high - low) > 0.5
        axis.annotate(text, (x, y), xytext=(-dx if left else dx, dy), textcoords="offset points",
                      ha="right" if left else "left", fontsize=7, color="#333333", gid=gid)


def _draw_best_of_n(axis, shown: Sequence[RunData], kl_metric: str, reward_metric: str) -> None:
    """The gold-picked best-of-N as a dashed ceiling through its mean per N, and each N named once by its
    points (the proxy-picked ones where there are)."""
    def by_n(pick: str) -> dict[int, list[RunData]]:
        found: dict[int, list[RunData]] = {}
        for run in shown:
            if run.best_of_n_pick == pick and run.best_of_n is not None:
                found.setdefault(run.best_of_n, []).append(run)
        return dict(sorted(found.items()))

    def mean(runs: list[RunData], key: str) -> float:
        return sum(r.value(key) for r in runs) / len(runs)

    ceiling = by_n("gold")
    if len(ceiling) > 1:
        axis.plot([mean(g, kl_metric) for g in ceiling.values()], [mean(g, reward_metric) for g in ceiling.values()],
                  color=GOLD_CEILING_COLOUR, linestyle="--", linewidth=1.3, zorder=2, gid="ceiling:best-of-n-gold")
    _label_points(axis, [(f"N={n}", mean(group, kl_metric), mean(group, reward_metric))
                         for n, group in (by_n("proxy") or ceiling).items()], dx=6, dy=-10, gid="n-label")


def _method_view(axis, shown: Sequence[RunData], styles: Mapping[str, ArmStyle], kl_metric: str,
                 reward_metric: str, notes: list[str]) -> list[Line2D]:
    """The DPO paper's Fig. 2 on top of the final points: checkpoints along training, each method's frontier
    and best-of-N's ceiling; returns their legend entries and adds their footnotes."""
    points = [(_method_of(r), r.value(kl_metric), r.value(reward_metric)) for r in shown]
    checkpoints = _draw_checkpoints(axis, shown, styles, reward_metric)
    drawn = _draw_method_frontiers(axis, points + checkpoints)
    _draw_best_of_n(axis, shown, kl_metric, reward_metric)
    handles = []
    if checkpoints:
        handles.append(Line2D([], [], marker="o", markersize=4, linestyle="-", linewidth=0.7, color="#888888",
                              alpha=0.6, label="checkpoints along training\n(validation prompts)"))
        notes.append("Large markers: each arm's and seed's final evaluation on the test prompts. Small faded "
                     "markers: checkpoints along training, scored on validation prompts (compare their course, "
                     "not their level, with the large ones).")
    if drawn:
        handles.append(Line2D([], [], color="#444444", linewidth=1.5, label="each method's frontier\n(its colour)"))
        notes.append("A method's frontier: the best reward among its points at or below each KL"
                     + (", checkpoints included." if checkpoints else "."))
    if any(r.kl_is_bound for r in shown):
        notes.append(f"Best-of-N ({BOUND_NOTE}): KL is log N − (N−1)/N, an upper bound; hollow markers.")
    return handles


def reward_kl_scatter(runs: Sequence[RunData], reward_metric: str | None = None, kl_metric: str = KL_METRIC,
                      annotate: bool | None = None, frontiers: str | None = None) -> Figure:
    """Each run at (KL to the reference, reward), coloured by algorithm with a shade and marker per arm
    (triangles for sweep trials, hollow where the KL is an upper bound). `frontiers`:

    * "method" (the default in a gold world, `gold_world`): the DPO paper's Fig. 2 — also each run's
      checkpoints along training, and each method's frontier (`method_frontiers`); best-of-N picked by the
      gold is a dashed ceiling;
    * "global" (the default otherwise): one Pareto frontier over all runs as a staircase through its points.

    Runs without either metric are counted in the title and named under the axes. `annotate` labels points
    with run labels; by default in the global view when there are at most 12."""
    reward_metric = reward_metric or default_reward_metric(runs)
    gold = gold_world(runs)
    frontiers = frontiers or ("method" if gold else "global")
    scorer = axis_scorer(runs, reward_metric)
    shown, skipped, other_scorer = _split_runs(runs, reward_metric, kl_metric, scorer)
    figure, axis = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    axis.margins(0.08)  # before any label is placed: `_label_points` reads the final x limits
    styles = arm_styles(shown)
    _draw_final_points(axis, shown, styles, kl_metric, reward_metric)
    handles, notes = _arm_handles(shown, styles), []
    if frontiers == "method":
        handles += _method_view(axis, shown, styles, kl_metric, reward_metric, notes)
    else:
        handles += _draw_global_frontier(axis, shown, kl_metric, reward_metric)
    if annotate if annotate is not None else (frontiers == "global" and len(shown) <= 12):
        _label_points(axis, [(run.label, run.value(kl_metric), run.value(reward_metric)) for run in shown])
    if not shown:
        _empty(axis, f"no run has both {kl_metric} and {reward_metric}")
    if handles:
        _make_room(figure, [_legend_outside(axis, handles)])
    axis.set_xlabel(METRIC_LABELS.get(kl_metric, kl_metric), fontsize=9)
    axis.set_ylabel(reward_label(reward_metric, scorer, gold), fontsize=9)
    what = {JUDGE_METRIC: "Gold reward" if gold else "Judge reward", PROXY_METRIC: "Proxy reward"}.get(reward_metric,
                                                                                                     "Reward")
    view = "each method's frontier" if frontiers == "method" else "the Pareto frontier"
    title = f"{what} vs KL to the reference, {view} (up and left is better)\n{len(shown)} runs plotted"
    if skipped:
        title += f", {len(skipped)} skipped (missing a metric, see below)"
    axis.set_title(title, fontsize=10)
    axis.grid(True, linewidth=0.4, alpha=0.5)
    if reward_metric == PROXY_METRIC and any(r.arm == BON_PROXY for r in shown):
        notes.append("Best-of-N picked by this proxy sits high on the proxy's own axis by construction: the judge's "
                     "score (eval/judge_score) says whether it is better.")
    notes += _skip_notes(runs, skipped, other_scorer, scorer, kl_metric, reward_metric)
    _footnote(figure, notes)
    return figure


def _skip_notes(runs, skipped, other_scorer, scorer, kl_metric: str, reward_metric: str) -> list[str]:
    notes = []
    if skipped:
        details = [f"{r.label} (no {' or '.join(m for m in (kl_metric, reward_metric) if r.value(m) is None)})"
                   for r in skipped[:6]]
        more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        notes.append(f"Skipped {len(skipped)} of {len(runs)} runs: {', '.join(details)}{more}.")
    if other_scorer:
        notes.append(f"Not drawn, scored by another reward model than this axis's ({scorer}): "
                     f"{_names(other_scorer)}.")
    return notes


# --- 4. training curves ------------------------------------------------------------------------------------
DWARF_RATIO = 20.0


def dwarfing_runs(reach: Mapping[str, float], ratio: float = DWARF_RATIO) -> tuple[list[str], float] | None:
    """The runs whose reach (largest |value|) is more than `ratio` times every other run's, and the largest
    reach among the others; None when no such gap (or the others all sit at zero, which nothing flattens).
    Reach, not range: the axis must span from one curve to the others, so a curve far from zero (SLiC's summed
    margin around -200) flattens them even when its own range is narrow."""
    ordered = sorted(reach.items(), key=lambda item: -item[1])
    for i in range(len(ordered) - 1):
        big, small = ordered[i][1], ordered[i + 1][1]
        if small > 0 and big > ratio * small:
            return [name for name, _ in ordered[:i + 1]], small
    return None


def _draw_curve_panel(axis, runs: Sequence[RunData], panel: CurvePanel, styles: Mapping[str, ArmStyle]):
    """One panel's lines; returns (runs drawn, runs missing, their values by label)."""
    drawn, missing, values_of = [], [], {}
    for run in runs:
        key = next((k for k in panel.keys if run.histories.get(k)), None)
        if key is None:
            missing.append(run)
            continue
        steps, values = zip(*sorted(run.histories[key]))
        style, trial = styles[run.arm], run.kind == "trial"
        axis.plot(steps, values, color=style.colour, linewidth=1.0 if trial else 1.4, alpha=0.75 if trial else 1.0,
                  marker=("." if trial else style.marker) if len(steps) <= 30 else None, markersize=3.5,
                  label=run.label if key == panel.keys[0] else f"{run.label} ({key})", gid=f"curve:{run.run_id}")
        drawn.append(run)
        values_of[run.label] = values
    return drawn, missing, values_of


def _curve_title(panel: CurvePanel, runs: Sequence[RunData], missing: Sequence[RunData], scale_note: str) -> str:
    title = f"{panel.title} ({panel.keys[0]})"
    if missing and len(missing) == len(runs) > 1:
        title += f"\nnot logged by any of the {len(runs)} runs"
    elif missing:
        title += "\n" + textwrap.fill(f"not logged by {len(missing)} run{'s' if len(missing) > 1 else ''}: "
                                      f"{_names(missing, limit=5)}", width=100, break_on_hyphens=False)
    return title + (f"\n{scale_note}" if scale_note else "")


def symlog_ticks(linthresh: float, low: float, high: float) -> list[float]:
    """Candidate ticks for a symlog axis over [low, high]: a few linear steps inside ±linthresh, then the powers
    of ten beyond it (matplotlib's own also put 10^k inside the band, beside 0, where the labels collide)."""
    linear = [float(t) for t in MaxNLocator(nbins=4, symmetric=True).tick_values(-linthresh, linthresh)
              if -linthresh <= t <= linthresh and low - 1e-12 <= t <= high + 1e-12]
    reach = max(abs(low), abs(high))
    powers = [10.0 ** k for k in range(math.floor(math.log10(linthresh)) + 1, math.floor(math.log10(reach)) + 1)]
    beyond = [sign * p for p in powers for sign in (-1, 1) if low <= sign * p <= high]
    return sorted(set(linear) | set(beyond))


def spaced_ticks(ticks: Iterable[float], position: Callable[[float], float], min_gap: float) -> list[float]:
    """The ticks no two of which are closer than `min_gap` in `position`, nearest zero kept first (the small
    runs' values are read there), in order."""
    kept: list[float] = []
    for tick in sorted(ticks, key=abs):
        if all(abs(position(tick) - position(k)) >= min_gap for k in kept):
            kept.append(tick)
    return sorted(kept)


def _set_symlog_ticks(axis, linthresh: float, values: Sequence[float]) -> None:
    """Plain-number ticks (`symlog_ticks`) at least 1.6 label heights apart on the axes as they are drawn now
    (the margin: the layout still shrinks the axes a little)."""
    low, high = axis.get_ylim()
    scale = axis.yaxis.get_transform()
    span = abs(scale.transform([high])[0] - scale.transform([low])[0])
    label_px = FontProperties(size=plt.rcParams["ytick.labelsize"]).get_size_in_points() * axis.figure.dpi / 72
    min_gap = 1.6 * label_px / max(axis.get_window_extent().height, 1.0) * span
    ticks = spaced_ticks(symlog_ticks(linthresh, min(values), max(values)), lambda v: scale.transform([v])[0],
                         min_gap)
    axis.yaxis.set_major_locator(FixedLocator(ticks))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_locator(NullLocator())


def _symlog_if_dwarfed(axis, values_of: Mapping[str, Sequence[float]]) -> str:
    """A symlog y scale, linear within the other runs' reach, when some runs dwarf them (`dwarfing_runs`);
    returns the note that says so, or ""."""
    found = dwarfing_runs({label: max(abs(v) for v in values) for label, values in values_of.items()})
    if found is None:
        return ""
    big, linear = found
    # The linear band gets as many decades as the log part spans, so the small curves keep about half the height.
    decades = math.log10(max(abs(v) for label in big for v in values_of[label]) / linear)
    axis.set_yscale("symlog", linthresh=linear, linscale=max(1.0, decades))
    _set_symlog_ticks(axis, linear, [v for series in values_of.values() for v in series])
    names = ", ".join(big[:3]) + (f" and {len(big) - 3} more" if len(big) > 3 else "")
    return f"symlog y (linear within ±{linear:.2g}): {names} reach >{DWARF_RATIO:.0f}× the others"


def _curve_legend(axis, drawn: Sequence[RunData], styles: Mapping[str, ArmStyle]):
    """Every line in the legend, or one entry per arm where that is shorter and loses nothing: many lines (a
    sweep's trials), or an arm's seeds, which share its style anyway. Outside the axes when more than a few
    entries, where it cannot cover a line. Returns (legend, whether it is outside)."""
    members: dict[str, list[RunData]] = {}
    for run in drawn:
        members.setdefault(run.arm, []).append(run)
    if len(drawn) > 12 or (len(drawn) > 6 and len(members) < len(drawn)):
        handles = []
        for arm, runs in members.items():
            seeds = {r.seed for r in runs}
            what = "seeds" if len(seeds) == len(runs) > 1 and None not in seeds else "runs"
            marker = None if all(r.kind == "trial" for r in runs) else styles[arm].marker
            handles.append(Line2D([], [], color=styles[arm].colour, marker=marker, markersize=3.5,
                                  label=f"{arm} ({len(runs)} {what})" if len(runs) > 1 else runs[0].label))
    else:
        handles = axis.get_legend_handles_labels()[0]
    if len(handles) > 3:
        return _legend_outside(axis, handles, fontsize=7), True
    return axis.legend(handles=handles, fontsize=7, loc="best"), False


def training_curves(runs: Sequence[RunData], panels: Sequence[CurvePanel] = CURVE_PANELS) -> Figure:
    """One panel per `CurvePanel`, one line per run (x = MLflow step: the count of batches trained), coloured by
    algorithm with a shade and marker per arm. A run draws the first of the panel's keys it has a history for;
    a key other than the panel's first is named in its legend entry. Runs with no history for a panel are named
    in that panel's title. A panel where some runs' values dwarf the others' (`dwarfing_runs`) is drawn on a
    symlog scale and its title says so. Best-of-N runs, which train nothing, are left out."""
    runs = [r for r in runs if r.algorithm != BEST_OF_N]  # it samples the reference: no training to draw
    figure, axes = plt.subplots(len(panels), 1, figsize=(FIGSIZE[0], 3.0 * len(panels) + 0.4), dpi=DPI,
                                squeeze=False)
    styles = arm_styles(runs)
    outside = []
    for axis, panel in zip(axes[:, 0], panels):
        drawn, missing, values_of = _draw_curve_panel(axis, runs, panel, styles)
        scale_note = _symlog_if_dwarfed(axis, values_of)
        axis.set_title(_curve_title(panel, runs, missing, scale_note), fontsize=9)
        axis.set_ylabel(panel.ylabel, fontsize=9)
        axis.set_xlabel("training step", fontsize=9)
        axis.grid(True, linewidth=0.4, alpha=0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            legend, is_outside = _curve_legend(axis, drawn, styles)
            outside += [legend] if is_outside else []
        else:
            _empty(axis, f"no run logged {' or '.join(panel.keys)}")
    _make_room(figure, outside)
    figure.tight_layout()
    return figure


# --- 5. over-optimisation: Gao, Schulman & Hilton (2023) -------------------------------------------------
def gao_bon(d, alpha: float, beta: float):
    """Gao, Schulman & Hilton 2023 ("Scaling Laws for Reward Model Overoptimization"), eq. (1): the gold reward
    gained by best-of-N, R_bon(d) = d (alpha - beta d), with d = sqrt(KL(best-of-N || reference))."""
    d = np.asarray(d, dtype=float)
    return d * (alpha - beta * d)


def gao_rl(d, alpha: float, beta: float):
    """Gao, Schulman & Hilton 2023, eq. (2): the gold reward gained by RL, R_RL(d) = d (alpha - beta log d),
    d = sqrt(KL(policy || reference)); 0 at d = 0 (d log d -> 0)."""
    d = np.asarray(d, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


GAO_FORMS = {"bon": gao_bon, "rl": gao_rl}
GAO_FORM_NAMES = {"bon": "d(α−βd)", "rl": "d(α−β log d)"}
MIN_FIT_DISTANCES = 3  # distinct d > 0: with two, any two-parameter curve through 0 fits their means exactly


@dataclass(frozen=True)
class GaoFit:
    form: str  # "bon" (eq. 1) or "rl" (eq. 2)
    alpha: float
    beta: float
    n_points: int  # the points with d > 0 it was fitted to

    def __call__(self, d):
        return GAO_FORMS[self.form](d, self.alpha, self.beta)


def fit_gao(points: Iterable[tuple[float, float]], form: str) -> GaoFit | None:
    """Least-squares alpha and beta of Gao et al.'s form (`form`: "bon", eq. (1), or "rl", eq. (2)) through
    (d, gold reward gained since the curve's start) points, d = sqrt(KL). Both forms are linear in alpha and
    beta: R = alpha * d - beta * g(d), g(d) = d^2 (bon) or d log d (rl). Points at d <= 0 carry no information
    (every such curve passes through 0) and are left out. None unless at least `MIN_FIT_DISTANCES` distinct
    d > 0 and a well-conditioned system."""
    if form not in GAO_FORMS:
        raise ValueError(f"fit_gao: form must be one of {sorted(GAO_FORMS)}, got {form!r}")
    used = [(float(d), float(r)) for d, r in points if d > 0 and math.isfinite(d) and math.isfinite(r)]
    if len({round(d, 9) for d, _ in used}) < MIN_FIT_DISTANCES:
        return None
    d = np.array([p[0] for p in used])
    rewards = np.array([p[1] for p in used])
    design = np.column_stack([d, -(d * d if form == "bon" else d * np.log(d))])
    scale = np.linalg.norm(design, axis=0)
    if np.any(scale == 0) or np.linalg.cond(design / scale) > 1e6:  # near-collinear columns: alpha, beta unidentified
        return None
    (alpha, beta), *_ = np.linalg.lstsq(design, rewards, rcond=None)
    return GaoFit(form, float(alpha), float(beta), len(used))


@dataclass
class OveroptCurve:
    """One curve of the over-optimisation view: one best-of-N pick and seed over N, or one run over its steps.
    `points` are (N or step, d = sqrt(KL), gold score, proxy score), in order; the first is its start."""

    group: str  # the arm; a group's curves (its seeds) are averaged and fitted together
    label: str
    algorithm: str
    form: str | None  # Gao et al.'s form for the group: "bon", "rl", or None (the gold-picked ceiling: no fit)
    points: list[tuple[int, float, float | None, float | None]]
    seed: str | None = None


def overoptimisation_curves(runs: Sequence[RunData]) -> list[OveroptCurve]:
    """Every curve: best-of-N over N (its analytic KL bound; one curve per pick and seed) and each run scored
    along training (`bench.evaluation.overoptimisation`: exact KL on validation prompts), over steps."""
    curves = []
    best_of_n = [r for r in runs if r.algorithm == BEST_OF_N and r.value(KL_METRIC) is not None]
    for arm, seed in sorted({(r.arm, r.seed) for r in best_of_n}, key=lambda k: (k[0] == BON_GOLD, str(k[1]))):
        # N = 1 is the reference's first draw whichever scorer picks: the gold's curve starts there too.
        members = sorted((r for r in best_of_n if r.seed == seed and (r.arm == arm or (arm == BON_GOLD and
                                                                                     r.best_of_n == 1))),
                         key=lambda r: (r.value(KL_METRIC), r.best_of_n or 0))
        if len(members) > 1:
            points = [(r.best_of_n or i, math.sqrt(max(r.value(KL_METRIC), 0.0)), r.value(JUDGE_METRIC),
                       r.value(PROXY_METRIC)) for i, r in enumerate(members)]
            label = f"{arm} (seed {seed})" if seed is not None else arm
            curves.append(OveroptCurve(arm, label, BEST_OF_N, None if arm == BON_GOLD else "bon", points, seed))
    for run in runs:
        if all(run.histories.get(key) for key in OVEROPT_KEYS):
            by_step = {key: dict(run.histories[key]) for key in OVEROPT_KEYS}
            steps = sorted(set.intersection(*(set(values) for values in by_step.values())))
            points = [(s, math.sqrt(max(by_step[OVEROPT_KL][s], 0.0)), by_step[OVEROPT_GOLD][s],
                       by_step[OVEROPT_PROXY][s]) for s in steps]
            curves.append(OveroptCurve(run.arm, run.label, run.algorithm, "rl", points, run.seed))
    return curves


def _gains(curve: OveroptCurve, index: int) -> list[tuple[float, float]] | None:
    """(d, score - the start's score) of one score (2: gold, 3: proxy); None when any point lacks it."""
    scores = [p[index] for p in curve.points]
    if any(s is None for s in scores):
        return None
    return [(p[1], s - scores[0]) for p, s in zip(curve.points, scores)]


def _mean_gains(curves: Sequence[OveroptCurve], index: int) -> list[tuple[float, float]]:
    """The curves' mean (d, gain) at each N or step that every one of them has."""
    keyed = []
    for curve in curves:
        gains = _gains(curve, index)
        if gains is None:
            return []
        keyed.append({p[0]: g for p, g in zip(curve.points, gains)})
    shared = sorted(set.intersection(*(set(k) for k in keyed)))
    return [(float(np.mean([k[s][0] for k in keyed])), float(np.mean([k[s][1] for k in keyed]))) for s in shared]


def group_fit(curves: Sequence[OveroptCurve]) -> GaoFit | None:
    """Gao et al.'s fit to a group's gold gains, its seeds' points pooled (each relative to its own start)."""
    form = curves[0].form
    if form is None:
        return None
    return fit_gao([point for curve in curves for point in (_gains(curve, 2) or [])], form)


def _draw_overopt_group(gold_axis, proxy_axis, curves: Sequence[OveroptCurve], style: ArmStyle,
                        notes: list[str]) -> list[Line2D]:
    """One group's curves (thin per seed and a thick mean when it has several seeds) on both panels, and its
    Gao fit on the gold panel; returns its legend entries and adds a note when it gets no fit."""
    group, several = curves[0].group, len(curves) > 1
    ceiling = group == BON_GOLD
    line = {"color": style.colour, "linestyle": "--" if ceiling else "-"}
    for axis, index, name in ((gold_axis, 2, "gold"), (proxy_axis, 3, "proxy")):
        if ceiling and name == "proxy":  # picked by the gold: its proxy score says nothing about over-optimising
            continue
        for curve in curves:
            gains = _gains(curve, index)
            if gains:
                axis.plot(*zip(*gains), linewidth=0.7 if several else 1.4, alpha=0.4 if several else 1.0,
                          marker=None if several else style.marker, markersize=3.5, gid=f"overopt:{name}:{curve.label}",
                          **line)
        mean = _mean_gains(curves, index) if several else []
        if mean:
            axis.plot(*zip(*mean), linewidth=1.8, marker=style.marker, markersize=4, gid=f"overopt-mean:{name}:{group}",
                      **line)
    label = f"{group}, mean of {len(curves)} seeds (thin: each)" if several else curves[0].label
    handles = [Line2D([], [], marker=style.marker, markersize=4, label=label, **line)]
    fit = group_fit(curves)
    if fit is not None:
        d = np.linspace(0.0, max(p[1] for c in curves for p in c.points), 80)
        gold_axis.plot(d, fit(d), color=style.colour, linestyle=":", linewidth=1.8, gid=f"gao-fit:{group}")
        handles.append(Line2D([], [], color=style.colour, linestyle=":", linewidth=1.8,
                              label=f"fit {GAO_FORM_NAMES[fit.form]}: α={fit.alpha:.3g}, β={fit.beta:.3g}"))
    elif curves[0].form is not None:
        distances = len({round(p[1], 9) for c in curves for p in c.points if p[1] > 0})
        why = (f"{distances} distinct d > 0 ({MIN_FIT_DISTANCES} needed)" if distances < MIN_FIT_DISTANCES
               else "its points do not pin α and β down")
        notes.append(f"No Gao fit for {group}: {why}.")
    return handles


def overoptimisation(runs: Sequence[RunData]) -> Figure:
    """Gao et al.'s (2023) view: the gold reward's (the judge's) score and the proxy's against sqrt(KL to the
    reference), for best-of-N (over N; picked by the proxy, and by the gold as a dashed ceiling) and for the
    runs scored along training (over steps). Each curve is drawn as the change from its own start (N = 1, or the
    step before training): best-of-N is judged on the test prompts, training runs on validation prompts, and the
    change is what compares across them. A group of seeds is drawn thin per seed with a thick mean. On the gold
    panel, dotted: Gao et al.'s form fitted to the group's gold gains (`fit_gao`; "bon" for best-of-N, "rl" for
    training runs), its alpha and beta in the legend. A proxy curve that climbs while the gold one flattens or
    falls is over-optimisation."""
    figure, (gold_axis, proxy_axis) = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.8, FIGSIZE[1]), dpi=DPI)
    curves = overoptimisation_curves(runs)
    styles = arm_styles(runs)
    groups: dict[str, list[OveroptCurve]] = {}
    for curve in curves:
        groups.setdefault(curve.group, []).append(curve)
    handles, notes = [], []
    for group, members in groups.items():
        handles += _draw_overopt_group(gold_axis, proxy_axis, members, styles[group], notes)
    judge = _display_name(axis_scorer(runs, JUDGE_METRIC))
    gold_name = f"gold reward ({judge})" if gold_world(runs) else f"judge RM score ({judge}; stands in for the gold)"
    for axis, name in ((gold_axis, gold_name), (proxy_axis, "proxy RM score")):
        axis.set_xlabel("sqrt(KL to the reference), nats^½", fontsize=9)
        axis.set_ylabel(textwrap.fill(f"{name}, change since its start", 60), fontsize=9)
        axis.axhline(0, color="grey", linewidth=0.6)
        axis.grid(True, linewidth=0.4, alpha=0.5)
        if not curves:
            _empty(axis, "no best-of-N runs and no run scored along training")
    gold_axis.set_title(f"{'Gold' if gold_world(runs) else 'Judge'} score vs sqrt(KL)", fontsize=10)
    proxy_axis.set_title("Proxy score vs sqrt(KL)", fontsize=10)
    if handles:
        _make_room(figure, [_legend_outside(proxy_axis, handles, fontsize=7.5)])
    fitted = any((line.get_gid() or "").startswith("gao-fit:") for line in gold_axis.lines)
    _footnote(figure, _overopt_notes(curves, fitted) + notes)
    return figure


def _overopt_notes(curves: Sequence[OveroptCurve], fitted: bool) -> list[str]:
    if not curves:
        return []
    notes = ["Each curve: the change from its own start (N = 1, or the step before training). Best-of-N: test "
             f"prompts, {BOUND_NOTE} (log N − (N−1)/N). Runs along training: validation prompts, exact KL."]
    if fitted:
        notes.append("Dotted: Gao, Schulman & Hilton (2023) fitted to the gold points by least squares, eq. (1) "
                     "d(α−βd) for best-of-N, eq. (2) d(α−β log d) for training runs, d = sqrt(KL).")
    if any(c.group == BON_GOLD for c in curves):
        notes.append(f"{BON_GOLD}: gold panel only (the gold picks it, so its proxy score is beside the point).")
    return notes


# --- all of them --------------------------------------------------------------------------------------------
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
    """`RunData` of each run, in the given order (repeated ids once): latest metrics, its tags (arm, judge, KL
    kind, best-of-N), the `algorithm` tag, a label (the comparison stage, `<algorithm> trial <n>` for a sweep
    trial, else the algorithm or run name; made unique with the seed or the run id's start), and, when
    `histories`, the step series of `history_keys` that the run logged (`client.get_metric_history`; one value
    per step, the latest logged)."""
    runs, seen = [], set()
    for run_id in run_ids:
        if run_id in seen:
            continue
        seen.add(run_id)
        run = client.get_run(run_id)
        label, kind = _label(run)
        data = RunData(run_id, label, run.data.tags.get("algorithm", "?"), dict(run.data.metrics), kind=kind,
                       split=run.data.params.get("eval.split"), seed=run.data.tags.get("seed"),
                       proxy=run.data.tags.get("eval.proxy"), judge=run.data.tags.get("eval.judge.path"),
                       tags=dict(run.data.tags))
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
              if name.startswith("stage.") and not name.startswith(f"stage.{modules.reward_model_name()}")
              and value.split()]
    return [run_id for _, run_id in sorted(stages, key=lambda s: _stage_order(s[0]))]


def _stage_order(stage_key: str) -> tuple:
    """Stages in algorithm order, an algorithm's arms (`dpo-beta0.1`, `dpo-beta0.5`) together after it, numbers
    compared as numbers (`best-of-4` before `best-of-16`); best-of-N and unknown stages last."""
    stage = stage_key.split(".seed")[0]
    algorithms = [a for a in modules.algorithms() if stage == a or stage.startswith(a + "-")]
    algorithm = max(algorithms, key=len) if algorithms else stage  # the longest, should one name extend another
    return _algorithm_rank(algorithm), _natural_key(stage_key)


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


def log_win_rates(client, run_id: str) -> None:
    """An evaluated run's own win-rate figure, `eval/win_rates.png`: `win_rate_bars` of that run alone (the figure
    a comparison draws for all its rows). A figure that fails is a warning: the evaluation is logged already."""
    try:
        figure = win_rate_bars(collect_runs(client, [run_id], histories=False))
    except Exception as err:
        log.warning("the win-rate figure of run %s was not logged: %s: %s", run_id, type(err).__name__, err)
        return
    try:
        client.log_figure(run_id, figure, "eval/win_rates.png", save_kwargs={"dpi": DPI})
    finally:
        plt.close(figure)


def log_figures_of_finished_run(client, parent_run_id: str, run_ids: Sequence[str]) -> None:
    """`log_figures` on a comparison's or a study's parent run, once its runs are recorded: a figure that
    fails is a warning, never a reason to lose the comparison or the study."""
    try:
        log_figures(client, parent_run_id, run_ids)
    except Exception as err:
        log.warning("the figures of run %s were not logged: %s: %s", parent_run_id, type(err).__name__, err)


def save_pngs(figures: Mapping[str, Figure], directory: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write each figure to `<directory>/<stem>-<name>.png` atomically (`bench.core.atomic.write_atomically`);
    returns {name: path}. The figures stay open: close them with `close_figures`."""
    paths = {}
    for name, figure in figures.items():
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=DPI)
        paths[name] = Path(directory) / f"{stem}-{name}.png"
        write_atomically(paths[name], png.getvalue())
    return paths


CAPTIONS = {"win_rates": "Win rates with 95% CIs",
            "reward_vs_kl": "Reward vs KL: each method's frontier (gold world) or the Pareto frontier",
            "training_curves": "Training curves: reward margin and KL",
            "overoptimisation": "Over-optimisation: gold and proxy scores against sqrt(KL), with Gao et al.'s fits"}


def markdown_images(paths: Mapping[str, Path]) -> str:
    """Markdown that embeds the PNGs of `save_pngs`, by file name (the Markdown sits in the same directory)."""
    return "\n\n".join(f"![{CAPTIONS.get(name, name)}]({Path(path).name})" for name, path in paths.items()) + "\n"
