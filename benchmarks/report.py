"""
Report: turns the result files of the speed and returns benchmarks into figures and into the README's tables.

The README is only ever rewritten between its marker comments (``<!-- BENCHMARK:SPEED:START -->`` ...
``<!-- BENCHMARK:SPEED:END -->`` and ``<!-- BENCHMARK:RETURNS:START -->`` ... ``<!-- BENCHMARK:RETURNS:END -->``), so
the tables always match the committed data. Cells without results are listed as missing.

Usage::

    python -m benchmarks.report
    python -m benchmarks.report --results /tmp/smoke --figures /tmp/smoke/figures --readme /tmp/smoke/README.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.beyond_speed import BASELINE as BEYOND_BASELINE
from benchmarks.common import FIGURES_DIR, IMPLS, MATCHED, REPO_ROOT, RESULTS_DIR, read_json
from benchmarks.returns import ENVS, SEEDS, budget
from benchmarks.speed import SECTIONS, floor_summary, learn_summary

COLORS = {"sb3_trpo_ext": "tab:blue", "sb3_contrib": "tab:orange", MATCHED: "tab:green"}
SPEED_MARKERS = ("<!-- BENCHMARK:SPEED:START -->", "<!-- BENCHMARK:SPEED:END -->")
RETURNS_MARKERS = ("<!-- BENCHMARK:RETURNS:START -->", "<!-- BENCHMARK:RETURNS:END -->")
BEYOND_MARKERS = ("<!-- BENCHMARK:BEYOND:START -->", "<!-- BENCHMARK:BEYOND:END -->")
N_BOOTSTRAP = 2000

#: Published TRPO returns, each with its source. MuJoCo entries are for v3 (sb3-contrib, RL Zoo) or v4 (Tianshou).
PUBLISHED_SOURCES = {
    "sb3-contrib docs": (
        "[sb3-contrib documentation](https://sb3-contrib.readthedocs.io/en/master/modules/trpo.html#results), "
        "MuJoCo v3, 1M steps, 3 seeds"
    ),
    "Tianshou": (
        "[Tianshou MuJoCo benchmark](https://github.com/thu-ml/tianshou/tree/master/examples/mujoco), "
        "1M steps, 10 seeds, best return within 1M steps"
    ),
    "RL Zoo": (
        "[RL Zoo benchmark.md](https://github.com/DLR-RM/rl-baselines3-zoo/blob/master/benchmark.md), "
        "1 run, MuJoCo v3 and LunarLander v2, at the budget in parentheses"
    ),
}
PUBLISHED: dict[str, dict[str, str]] = {
    "sb3-contrib docs": {
        "HalfCheetah-v5": "1803",
        "Hopper-v5": "3372",
        "Walker2d-v5": "4502",
        "Ant-v5": "3554",
        "Swimmer-v5": "359",
    },
    "Tianshou": {
        "HalfCheetah-v5": "4471",
        "Hopper-v5": "2046",
        "Walker2d-v5": "3827",
        "Ant-v5": "2867",
        "Swimmer-v5": "41",
        "Humanoid-v5": "810",
    },
    "RL Zoo": {
        "CartPole-v1": "500.0 (100k)",
        "Pendulum-v1": "-174.6 (100k)",
        "Acrobot-v1": "-83.1 (100k)",
        "MountainCarContinuous-v0": "92.5 (50k)",
        "LunarLander-v3": "133.2 (200k)",
        "LunarLanderContinuous-v3": "262.4 (200k)",
        "HalfCheetah-v5": "1785 (1M)",
        "Hopper-v5": "3618 (1M)",
        "Walker2d-v5": "4933 (1M)",
        "Ant-v5": "4982 (1M)",
        "Swimmer-v5": "365.7 (1M)",
        "BipedalWalker-v3": "182.3 (1M)",
        "Humanoid-v5": "not found",
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------------


def iqm(values: np.ndarray) -> float:
    """
    Interquartile mean: the mean of the values between the 25th and 75th percentile, the middle ones weighted by
    the fraction of them that lies inside (as in ``rliable``), so that it is defined for any number of runs.

    :param values: one value per run.
    :return: the interquartile mean.
    """
    values = np.sort(np.asarray(values, dtype=float))
    n = len(values)
    # Weight of each sorted value: the length of its share [i/n, (i+1)/n] that lies inside [0.25, 0.75].
    edges = np.arange(n + 1) / n
    weights = np.clip(np.minimum(edges[1:], 0.75) - np.maximum(edges[:-1], 0.25), 0.0, None)
    return float(np.sum(weights * values) / np.sum(weights))


def bootstrap_ci(
    values: np.ndarray, statistic: Callable[[np.ndarray], float], n_resamples: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """
    95% percentile bootstrap confidence interval of a statistic over runs.

    :param values: one value per run.
    :param statistic: the statistic of a sample.
    :param n_resamples: bootstrap resamples.
    :param seed: seed of the resampling.
    :return: the 2.5th and 97.5th percentiles.
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    samples = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(n_resamples)]
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def curve_band(curves: np.ndarray, n_resamples: int = N_BOOTSTRAP, seed: int = 0) -> tuple[np.ndarray, ...]:
    """
    Mean learning curve over runs and its 95% bootstrap confidence band (runs resampled with replacement).

    :param curves: returns, shape ``(runs, evaluations)``.
    :param n_resamples: bootstrap resamples.
    :param seed: seed of the resampling.
    :return: mean, lower and upper band, each of shape ``(evaluations,)``.
    """
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(curves), size=(n_resamples, len(curves)))
    means = curves[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    return curves.mean(axis=0), low, high


# ---------------------------------------------------------------------------------------------------------------------
# Returns
# ---------------------------------------------------------------------------------------------------------------------


def load_returns(results_dir: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """
    :param results_dir: the returns results folder (``<impl>/<env>/seed<k>.json``).
    :return: the finished results per (implementation, environment), sorted by seed.
    """
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(results_dir.glob("*/*/seed*.json")):
        result = read_json(path)
        if result is not None and result.get("final_return") is not None:
            results.setdefault((result["impl"], result["env_id"]), []).append(result)
    for runs in results.values():
        runs.sort(key=lambda result: result["seed"])
    return results


def stacked_curves(runs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """
    :param runs: results of one implementation and environment.
    :return: the evaluation timesteps, and the returns of every run, shape ``(runs, evaluations)``, cut to the
        shortest curve.
    """
    length = min(len(run["curve"]["timesteps"]) for run in runs)
    timesteps = np.asarray(runs[0]["curve"]["timesteps"][:length])
    return timesteps, np.asarray([run["curve"]["mean"][:length] for run in runs])


def plot_curves(ax: plt.Axes, env_id: str, results: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """
    Both implementations' mean learning curves with their 95% bootstrap bands on one axis (and the translated
    arm's, dashed, where it has results).

    :param ax: the axis.
    :param env_id: the environment.
    :param results: the loaded results.
    """
    for impl in (*IMPLS, MATCHED):
        runs = results.get((impl, env_id), [])
        if not runs:
            continue
        timesteps, curves = stacked_curves(runs)
        mean, low, high = curve_band(curves)
        style = "--" if impl == MATCHED else "-"
        ax.plot(timesteps, mean, style, color=COLORS[impl], label=f"{impl} ({len(runs)} seeds)")
        ax.fill_between(timesteps, low, high, color=COLORS[impl], alpha=0.25, linewidth=0)
    ax.set_title(env_id)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return")
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)


def returns_figures(
    results: dict[tuple[str, str], list[dict[str, Any]]], envs: tuple[str, ...], figures_dir: Path
) -> list[Path]:
    """
    One learning-curve figure per environment with results, and one figure with every environment.

    :param results: the loaded results.
    :param envs: the campaign's environments.
    :param figures_dir: where the PNG files go.
    :return: the files written.
    """
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for env_id in envs:
        if not any((impl, env_id) in results for impl in (*IMPLS, MATCHED)):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_curves(ax, env_id, results)
        fig.tight_layout()
        path = figures_dir / f"returns_{env_id}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    n_cols = 4
    n_rows = -(-len(envs) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.5 * n_cols, 3.4 * n_rows), squeeze=False)
    for ax, env_id in zip(axes.flat, envs):
        plot_curves(ax, env_id, results)
    for ax in list(axes.flat)[len(envs) :]:
        ax.axis("off")
    fig.suptitle("TRPO learning curves: mean over seeds, 95% bootstrap confidence band")
    fig.tight_layout()
    path = figures_dir / "returns_all.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


def format_steps(steps: int) -> str:
    """
    :param steps: a number of environment steps.
    :return: it in the zoo's notation (``1M``, ``100k``, or the number itself below 1000).
    """
    if steps >= 1_000_000 and steps % 100_000 < 5_000:
        return f"{steps / 1e6:g}M"
    if steps >= 1000:
        return f"{steps / 1e3:.0f}k"
    return str(steps)


def returns_table(
    results: dict[tuple[str, str], list[dict[str, Any]]], envs: tuple[str, ...], n_seeds: int, figures_link: str
) -> str:
    """
    The README's returns section: final return per environment and implementation (mean ± std over seeds, and the
    interquartile mean with a 95% bootstrap CI), beside the published numbers and their sources.

    :param results: the loaded results.
    :param envs: the campaign's environments (all listed, missing ones marked).
    :param n_seeds: seeds per cell in the full campaign.
    :param figures_link: path of the figures folder relative to the README.
    :return: Markdown.
    """
    header = (
        "| environment | steps | sb3_trpo_ext mean ± std | sb3_trpo_ext IQM [95% CI] | sb3_contrib mean ± std "
        "| sb3_contrib IQM [95% CI] | sb3-contrib docs | Tianshou | RL Zoo |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for env_id in envs:
        cells = []
        steps = format_steps(budget(env_id).n_timesteps)
        for impl in IMPLS:
            runs = results.get((impl, env_id), [])
            if not runs:
                cells += [f"missing (0/{n_seeds} seeds)", "missing"]
                continue
            steps = format_steps(runs[0]["n_timesteps"])
            finals = np.asarray([run["final_return"] for run in runs])
            low, high = bootstrap_ci(finals, iqm)
            seeds = "" if len(runs) == n_seeds else f" ({len(runs)}/{n_seeds} seeds)"
            if len(runs) > n_seeds:
                seeds = f" ({len(runs)} seeds)"
            cells += [f"{finals.mean():.1f} ± {finals.std():.1f}{seeds}", f"{iqm(finals):.1f} [{low:.1f}, {high:.1f}]"]
        published = [PUBLISHED[source].get(env_id, "") for source in PUBLISHED_SOURCES]
        lines.append(f"| {env_id} | {steps} | " + " | ".join(cells + published) + " |")
    sources = "\n".join(f"- {name}: {text}." for name, text in PUBLISHED_SOURCES.items())
    matched = matched_table(results, envs)
    return (
        "Final return: mean of the last evaluation of each run (deterministic episodes on a separate environment, "
        "VecNormalize statistics frozen; 5 episodes every 10k steps for 1M-step runs, 10 episodes every 5% of the "
        "budget for shorter ones). Mean ± std over seeds; interquartile mean (IQM) with a 95% percentile bootstrap "
        "confidence interval over seeds. Hyperparameters: the RL Zoo's `trpo.yml`, identical for both "
        "implementations (MuJoCo -v5 with the -v4 entries). The same numbers are not the same trust region for "
        "Box actions: sb3-contrib averages its KL over the action dimensions, so its steps are larger (see "
        "[Coming from sb3-contrib](#coming-from-sb3-contrib-the-same-target_kl-is-a-smaller-trust-region)); "
        "`--algo trpo_ext` therefore ships the translated numbers"
        + (", whose results are in the second table" if matched else "")
        + ".\n\n"
        + "\n".join(lines)
        + matched
        + "\n\nPublished TRPO numbers (other versions of the environments, other protocols; for orientation only):\n"
        + sources
        + f"\n\nLearning curves: `{figures_link}/returns_<env>.png`; all environments:\n\n"
        + f"![learning curves]({figures_link}/returns_all.png)\n"
    )


def action_dimension_factor(env_id: str) -> int:
    """
    :param env_id: a Gymnasium environment id.
    :return: how many values sb3-contrib's TRPO averages its KL over (``d`` for a Box action, 1 for Discrete).
    """
    import gymnasium as gym

    from sb3_trpo_ext.common.contrib_compat import kl_dimension_factor

    env = gym.make(env_id)
    try:
        return kl_dimension_factor(env.action_space)
    finally:
        env.close()


def mann_whitney_p(first: list[float], second: list[float]) -> float | None:
    """
    :param first: one sample (final returns of one arm).
    :param second: the other.
    :return: the two-sided p-value of the Mann-Whitney U test (exact for small samples without ties), or ``None``
        when either sample has fewer than 2 values.
    """
    if len(first) < 2 or len(second) < 2:
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(first, second, alternative="two-sided").pvalue)


def holm_adjusted(p_values: list[float]) -> list[float]:
    """
    Holm's step-down adjustment for testing several hypotheses at once (here: one per environment), which bounds
    the chance of any false "the two differ" by the level, whatever the dependence between the tests.

    :param p_values: the unadjusted p-values.
    :return: the adjusted p-values, in the same order: the k-th smallest of m becomes the largest of
        ``min(1, (m - j) * p_(j))`` over the j-th smallest, j <= k (0-based), which keeps their order.
    """
    order = np.argsort(p_values, kind="stable")
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def matched_table(results: dict[tuple[str, str], list[dict[str, Any]]], envs: tuple[str, ...]) -> str:
    """
    The settings ``--algo trpo_ext`` ships (sb3-contrib's trust region): the extra arm
    (:data:`~benchmarks.common.MATCHED`) beside both packages, each on the seeds that arm ran. Where ``d = 1``
    the shipped settings are the zoo's numbers, so the sb3_trpo_ext cells are those runs.

    :param results: the loaded results.
    :param envs: the campaign's environments.
    :return: Markdown (empty when the extra arm has no results).
    """
    if not any(results.get((MATCHED, env_id)) for env_id in envs):
        return ""
    lines = []
    below: list[str] = []  # environments where the packaged settings' mean is below sb3_contrib's
    p_values: list[float] = []
    for env_id in envs:
        factor = action_dimension_factor(env_id)
        arm = "sb3_trpo_ext" if factor == 1 else MATCHED
        runs = results.get((arm, env_id), [])
        if not runs:
            lines.append(f"| {env_id} | {factor} | | | missing | | | |")
            continue
        seeds = sorted(run["seed"] for run in runs)
        if factor == 1:
            trust = "the zoo's (d = 1)"
        else:
            region = runs[0].get("trust_region", {})
            trust = f"{region.get('target_kl', float('nan')):g} / {region.get('cg_damping', float('nan')):g}"
        cells = []
        finals_of = {}
        for impl in (arm, "sb3_contrib", "sb3_trpo_ext"):
            finals = [run["final_return"] for run in results.get((impl, env_id), []) if run["seed"] in seeds]
            finals_of[impl] = finals
            cells.append(f"{np.mean(finals):.1f} ± {np.std(finals):.1f} ({len(finals)})" if finals else "missing")
        if factor == 1:
            cells[2] = "same runs"
        p_value = mann_whitney_p(finals_of[arm], finals_of["sb3_contrib"])
        cells.insert(2, "" if p_value is None else f"{p_value:.2f}")
        if p_value is not None:
            p_values.append(p_value)
        if finals_of[arm] and finals_of["sb3_contrib"] and np.mean(finals_of[arm]) < np.mean(finals_of["sb3_contrib"]):
            below.append(env_id if p_value is None else f"{env_id} (p {p_value:.2f})")
        lines.append(f"| {env_id} | {factor} | {' '.join(map(str, seeds))} | {trust} | " + " | ".join(cells) + " |")
    return (
        "\n\n`--algo trpo_ext`'s settings (the packaged `trpo_ext.yml`): the zoo's numbers with `target_kl` and "
        "`cg_damping` multiplied by the number `d` of Box action dimensions (`from_sb3_contrib`), which is "
        "sb3-contrib's trust region, all else equal. These are the cells of the arm `sb3_trpo_ext_contrib_kl` where "
        "`d > 1`, and the sb3_trpo_ext cells where `d = 1` (the same settings). Final return, mean ± std (runs) on "
        "the seeds this arm ran, beside both implementations with the zoo's numbers on the same seeds. p: two-sided "
        "Mann-Whitney U test of the packaged settings against sb3_contrib on those seeds (a small p: the two differ; "
        "a large p is not evidence that they are equal, only that these seeds cannot tell them apart):\n\n"
        "| environment | d (1: Discrete) | seeds | target_kl / cg_damping | sb3_trpo_ext, packaged settings | sb3_contrib | "
        "p | sb3_trpo_ext, zoo's numbers |\n"
        "|---|---:|---|---|---:|---:|---:|---:|\n"
        + "\n".join(lines)
        + f"\n\nBelow sb3_contrib's mean with the packaged settings: {', '.join(below) or 'none'}; the smallest p: "
        + (f"{min(p_values):.2f}" if p_values else "none")
        + (
            f", {min(holm_adjusted(p_values)):.2f} once adjusted for testing {len(p_values)} environments at once "
            "(Holm's method; below 0.05, some environment differs at the 5% level)."
            if len(p_values) > 1
            else "."
        )
    )


def line_search_table(diagnostics_dir: Path) -> str:
    """
    The line-search probes (``python -m benchmarks.line_search_probe``): whether the direction of the KL that the
    line search checks changed any decision, in full training runs with the packaged settings.

    :param diagnostics_dir: the probes' results folder (``<env>-seed<k>.json``).
    :return: Markdown (empty when there is no probe result).
    """
    rows = []
    for path in sorted(diagnostics_dir.glob("*.json")):
        data = read_json(path)
        if data is None:
            continue
        s = data["summary"]
        rows.append(
            f"| {data['env_id']} | {data['seed']} | {data['timesteps']:,} | {s['updates']} | {s['target_kl']:g} | "
            f"{s['median_first_kl_old_new']:.3f} / {s['median_first_kl_new_old']:.3f} | "
            f"{s['max_first_kl_old_new']:.3f} / {s['max_first_kl_new_old']:.3f} | {s['updates_with_backtracks']} | "
            f"{s['updates_rejected']} | {s['decisions_differ']} |"
        )
    if not rows:
        return ""
    return (
        "\n\nDoes the direction of the line search's KL matter? sb3_trpo_ext checks the paper's KL(old || new), "
        "sb3-contrib KL(new || old). `python -m benchmarks.line_search_probe` trains with the packaged settings and "
        "evaluates every update's first candidate (the full step) in both directions: where one direction accepts it "
        "and the other does not, the two line searches would take different steps.\n\n"
        "| environment | seed | steps | updates | target_kl | first candidate's KL, median (old‖new / new‖old) | "
        "max | updates with backtracks | rejected updates | decisions that differ |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )


def update_map_table(diagnostics_dir: Path) -> str:
    """
    The update-map probes (``python -m benchmarks.update_map_probe``): along real training runs with the packaged
    settings, how far sb3-contrib's update from the same state (weights, Adam, rollout) is from this package's.

    :param diagnostics_dir: the probes' results folder (``<env>-seed<k>.json``).
    :return: Markdown (empty when there is no probe result).
    """
    rows = []
    probes = [data for data in map(read_json, diagnostics_dir.glob("*.json")) if data is not None]
    for data in sorted(probes, key=lambda data: (data["env_id"], data["seed"])):
        s = data["summary"]
        rows.append(
            f"| {data['env_id']} | {data['seed']} | {data['timesteps']:,} | {data['final_return']:.0f} | "
            f"{s['updates_compared']} (one in {data['every']}) | {s['median_actor_difference']:.1e} / "
            f"{s['max_actor_difference']:.1e} | {s['median_contrib_cg_start_difference']:.1e} / "
            f"{s['max_contrib_cg_start_difference']:.1e} | "
            f"{s['median_critic_difference']:.1e} / {s['max_critic_difference']:.1e} | "
            f"{s['min_actor_length_ratio']:.6f} - {s['max_actor_length_ratio']:.6f} | {s['acceptance_differs']} |"
        )
    if not rows:
        return ""
    return (
        "\n\nWould sb3-contrib have taken the same updates? MuJoCo amplifies float32 rounding, so two runs from one seed "
        "part within a rollout and cannot be compared update by update. `python -m benchmarks.update_map_probe` "
        "trains with the packaged settings and, before every k-th update, hands the exact state (weights, Adam's "
        "state, the rollout buffer) to sb3-contrib's TRPO with the zoo's numbers; both update from it, with the "
        "random numbers drawn inside `train()` made the same (sb3-contrib's conjugate gradient started from zero, "
        "the critic's minibatches in sb3-contrib's order); the run itself is left as it would be without the probe. "
        "Differences are relative to sb3-contrib's change of the actor's and of the critic's parameters. For scale: "
        "how far sb3-contrib's own actor update moves when its conjugate gradient starts from `1e-4 * randn`, as in "
        "its runs, instead of zero:\n\n"
        "| environment | seed | steps | final return (5 episodes) | updates compared | actor, median / max | "
        "sb3-contrib's own actor spread, median / max | critic, median / max "
        "| actor step length ratio | line-search outcomes that differ |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )


def cg_start_table(diagnostics_dir: Path) -> str:
    """
    The conjugate-gradient start campaign (``python -m benchmarks.cg_start``): early learning of both packages, each
    with its conjugate gradient started from zero and from sb3-contrib's ``1e-4 * randn``.

    :param diagnostics_dir: the campaign's folder (``runs.jsonl``).
    :return: Markdown (empty when there is no run).
    """
    from benchmarks.cg_start import VARIANTS, load_runs

    runs = load_runs(diagnostics_dir / "runs.jsonl")
    if not runs:
        return ""

    def later_evaluations(run: dict[str, Any]) -> float:
        return float(np.mean(run["evaluations"][2:]))  # from the third evaluation on

    by_variant = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]) for v in VARIANTS}
    reference = [later_evaluations(r) for r in by_variant["sb3_contrib"]]
    rows = []
    for variant, group in by_variant.items():
        if not group:
            continue
        later = [later_evaluations(r) for r in group]
        final = [r["evaluations"][-1] for r in group]
        training = [r["training_episodes_mean"] for r in group]
        p = mann_whitney_p(later, reference) if variant != "sb3_contrib" else None
        rows.append(
            f"| {variant} | {len(group)} | {group[0]['timesteps'][-1]:,} | {np.mean(later):.0f} / {np.median(later):.0f} | "
            f"{np.mean(final):.0f} | {np.mean(training):.0f} | {'' if p is None else f'{p:.2f}'} |"
        )
    seeds = sorted({r["seed"] for r in runs})
    return (
        "\n\nDoes the start of conjugate gradient matter? It is what remains different between the two packages' runs "
        "once their updates agree: sb3-contrib starts from `1e-4 * randn`, this package from zero. "
        "`python -m benchmarks.cg_start` trains each package both ways on HalfCheetah-v5 (packaged settings for this "
        f"package, the zoo's for sb3-contrib; seeds {seeds[0]}-{seeds[-1]}), evaluating every 10,240 steps (3 "
        "deterministic episodes). Returns: mean / median over seeds of each run's mean evaluation from the third on; the "
        "last evaluation; the mean of the training episodes in the episode buffer; p: Mann-Whitney U test of the first "
        "column against sb3_contrib:\n\n"
        "| variant | runs | steps | evaluations from 30k, mean / median | last evaluation | training episodes | p |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )


def recheck_table(results: dict[tuple[str, str], list[dict[str, Any]]], results_root: Path) -> str:
    """
    Cells re-run with later code (the folders ``returns?*`` beside ``returns/``, e.g. after a change of rounding),
    beside the campaign's cells on the same seeds.

    :param results: the campaign's loaded results.
    :param results_root: the folder holding ``returns/`` and the re-run folders.
    :return: Markdown (empty when there is no re-run).
    """
    lines = []
    for folder in sorted(path for path in results_root.glob("returns?*") if path.is_dir()):
        for (impl, env_id), runs in sorted(load_returns(folder).items()):
            seeds = [run["seed"] for run in runs]
            versions = [run.get("versions", {}) for run in runs]
            commits = sorted(
                {f"{v.get('git_commit') or '?'} (sources {v.get('sb3_trpo_ext_sources_sha256', '?')[:8]})" for v in versions}
            )
            rerun = [run["final_return"] for run in runs]
            cells = [f"{np.mean(rerun):.1f} ± {np.std(rerun):.1f}"]
            for reference in (impl, "sb3_contrib"):
                finals = [run["final_return"] for run in results.get((reference, env_id), []) if run["seed"] in seeds]
                cells.append(f"{np.mean(finals):.1f} ± {np.std(finals):.1f}" if finals else "missing")
            lines.append(
                f"| `{folder.name}/` | {env_id} | {impl} | {', '.join(commits)} | {' '.join(map(str, seeds))} | "
                + " | ".join(cells)
                + " |"
            )
    if not lines:
        return ""
    return (
        "\n\nRe-runs with later code (final return, mean ± std over the same seeds), beside the campaign's cells of the "
        "same implementation and sb3-contrib's:\n\n"
        "| folder | environment | implementation | commit (sources) | seeds | re-run | campaign | sb3_contrib |\n"
        "|---|---|---|---|---|---:|---:|---:|\n" + "\n".join(lines)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------------------


def latest_speed_run(speed_dir: Path) -> Path | None:
    """
    :param speed_dir: the speed results folder (one subfolder per run).
    :return: the run whose ``learn.json`` was created last, or ``None``.
    """
    created = {path.parent: (read_json(path) or {}).get("created", "") for path in speed_dir.glob("*/learn.json")}
    return max(created, key=lambda run: (created[run], run.name)) if created else None


def load_speed(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """
    :param run_dir: a speed run's folder.
    :return: its sections by name (missing sections left out).
    """
    if run_dir is None:
        return {}
    sections = {name: read_json(run_dir / f"{name}.json") for name in SECTIONS}
    return {name: data for name, data in sections.items() if data is not None}


def speed_figures(speed: dict[str, dict[str, Any]], figures_dir: Path) -> list[Path]:
    """
    Update-step time against samples per update and against width (log-log), time per environment step against
    the number of environments.

    :param speed: the speed run's sections.
    :param figures_dir: where the PNG files go.
    :return: the files written.
    """
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for section, key, xlabel in (
        ("batch", "batch_size", "samples per update"),
        ("width", "width", "hidden units per layer (2 layers, actor and critic)"),
    ):
        if section not in speed:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for impl in IMPLS:
            rows = sorted((row for row in speed[section]["rows"] if row["impl"] == impl), key=lambda row: row[key])
            ax.loglog(
                [row[key] for row in rows],
                [statistics.median(row["train_s"]) for row in rows],
                "o-",
                color=COLORS[impl],
                label=impl,
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("update step (train) time [s]")
        ax.set_title(f"Update-step cost, HalfCheetah-v5 settings ({section})")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path = figures_dir / f"speed_{section}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if "n_envs" in speed:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        rows = speed["n_envs"]["rows"]
        for impl in IMPLS:
            for vec_env, style in (("DummyVecEnv", "o-"), ("SubprocVecEnv", "s--")):
                points = sorted(
                    (r["n_envs"], 1e6 * r["learn_s"] / r["timesteps"])
                    for r in rows
                    if (r["impl"], r["vec_env"]) == (impl, vec_env)
                )
                if points:
                    ax.plot(*zip(*points), style, color=COLORS[impl], label=f"{impl}, {vec_env}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of environments")
        ax.set_ylabel("end-to-end time per env step [µs]")
        ax.set_title("learn() time per environment step, HalfCheetah-v5")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path = figures_dir / "speed_n_envs.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def speed_table(speed: dict[str, dict[str, Any]], run_name: str | None, figures_link: str) -> str:
    """
    The README's speed section: speed-ups with min/median/max over the measured pairs, median times, the floor
    ratio, and the cost-growth figures.

    :param speed: the speed run's sections.
    :param run_name: the run's folder name.
    :param figures_link: path of the figures folder relative to the README.
    :return: Markdown.
    """
    if "learn" not in speed:
        return "Speed results: missing (run `python -m benchmarks.speed`).\n"
    learn = speed["learn"]
    summary = learn_summary(learn["rows"])
    v = learn["versions"]
    load = ", ".join(f"{x:.1f}" for x in learn["load_average"]) if "load_average" in learn else "not recorded"
    lines = [
        f"Run `{run_name}` ({learn['created']}): sb3_trpo_ext {v['sb3_trpo_ext']} (commit {v['git_commit']}, sources "
        f"{v.get('sb3_trpo_ext_sources_sha256')}), sb3-contrib {v['sb3_contrib']}, torch {v['torch']} on "
        f"{learn['torch_threads']} thread, CPU, {v['cpu_count']} cores, load average (1, 5, 15 min) at the end of "
        f"the section: {load}. Speed-up = sb3_contrib time / sb3_trpo_ext "
        "time of the same pair (above 1: sb3_trpo_ext is faster), min / median / max over the measured pairs, "
        "runs alternated A/B after a warm-up pair.",
        "",
        "| environment | steps per run | pairs | learn() speed-up | train() speed-up | µs per env step "
        "(ext / contrib) | s per update (ext / contrib) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for env_id, entry in summary.items():
        steps = next(row["timesteps"] for row in learn["rows"] if row["env_id"] == env_id)
        ratios = ["{:.2f} / {:.2f} / {:.2f}".format(*entry[key]) for key in ("learn_ratio", "train_ratio")]
        ext, contrib = entry["sb3_trpo_ext"], entry["sb3_contrib"]
        lines.append(
            f"| {env_id} | {steps:,} | {entry['pairs']} | {ratios[0]} | {ratios[1]} "
            f"| {ext['us_per_step']:.0f} / {contrib['us_per_step']:.0f} "
            f"| {ext['train_s_per_update']:.3f} / {contrib['train_s_per_update']:.3f} |"
        )
    breakdown = {env_id: entry for env_id, entry in summary.items() if all("env_us" in entry[impl] for impl in IMPLS)}
    if breakdown:
        if all(entry.get("env_timed") == "environments" for entry in breakdown.values()):
            env_part = (
                "inside the environments' own `step` (the Gymnasium environment and its `Monitor`: the same code "
                "for both), inside `train()`, and the rest (the vectorised wrappers `DummyVecEnv` and "
                "`VecNormalize`, which sb3_trpo_ext steps without their deep copies and NumPy wrappers, the policy "
                "forward pass, rollout buffer, callbacks, GAE)"
            )
        else:
            env_part = (
                "inside the training `VecEnv.step` (the environments, `Monitor`, `VecNormalize`: the same code for "
                "both), inside `train()`, and the rest (policy forward pass, rollout buffer, callbacks, GAE)"
            )
        lines += [
            "",
            f"Where the time of one environment step goes (medians, µs): {env_part}. The ceiling is the learn() speed-up "
            "sb3_trpo_ext would reach if its rest cost nothing: sb3_contrib's total / (sb3_trpo_ext's env step "
            "+ train()). The rest a 2.5x learn() speed-up would leave: sb3_contrib's total / 2.5 - (sb3_trpo_ext's "
            "env step + train()), negative where 2.5x is out of reach.",
            "",
            "| environment | env step (ext / contrib) | train() (ext / contrib) | rest (ext / contrib) | ceiling "
            "| rest left at 2.5x |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for env_id, entry in breakdown.items():
            ext, contrib = entry["sb3_trpo_ext"], entry["sb3_contrib"]
            cells = [f"{ext[key]:.0f} / {contrib[key]:.0f}" for key in ("env_us", "train_us", "other_us")]
            ceiling = contrib["us_per_step"] / (ext["env_us"] + ext["train_us"])
            left = contrib["us_per_step"] / 2.5 - (ext["env_us"] + ext["train_us"])
            lines.append(f"| {env_id} | {cells[0]} | {cells[1]} | {cells[2]} | {ceiling:.2f}x | {left:.0f} |")
    floor = floor_summary(learn["rows"], speed["floor"]["rows"]) if "floor" in speed else None
    if floor is None:
        lines += ["", "Floor ratio: missing."]
    else:
        lines += [
            "",
            f"Floor ratio, {floor['env_id']} (end-to-end time per env step / bare `DummyVecEnv` step time per env "
            f"step, 2 envs, random actions: {floor['bare_us_per_step']:.1f} µs): "
            f"sb3_trpo_ext **{floor['sb3_trpo_ext']['floor_ratio']:.2f}x**, "
            f"sb3_contrib **{floor['sb3_contrib']['floor_ratio']:.2f}x**.",
        ]
    figures = [f"![{name}]({figures_link}/speed_{name}.png)" for name in ("batch", "width", "n_envs") if name in speed]
    if figures:
        lines += ["", " ".join(figures)]
    return "\n".join(lines) + "\n"


def latest_beyond_run(beyond_dir: Path) -> Path | None:
    """
    :param beyond_dir: the ``beyond_speed`` results folder (one subfolder per run).
    :return: the folder of the most recent run, or ``None``.
    """
    created = {path.parent: (read_json(path) or {}).get("created", "") for path in beyond_dir.glob("*/beyond.json")}
    return max(created, key=lambda path: created[path]) if created else None


#: MaskableTRPO's and RecurrentTRPO's speed target: at most this many times TRPO's time per step (issue 6)
BEYOND_TARGET = 1.5


def beyond_table(run_dir: Path | None) -> str:
    """
    The README's table of MaskableTRPO and RecurrentTRPO time per step against TRPO.

    :param run_dir: a ``beyond_speed`` run's folder.
    :return: Markdown.
    """
    data = read_json(run_dir / "beyond.json") if run_dir is not None else None
    if data is None or run_dir is None:
        return "Results: missing (run `python -m benchmarks.beyond_speed`).\n"
    v = data["versions"]
    load = ", ".join(f"{x:.1f}" for x in data["load_average"])
    lines = [
        f"Run `{run_dir.name}` ({data['created']}): sb3_trpo_ext {v['sb3_trpo_ext']} (commit {v['git_commit']}), "
        f"torch {v['torch']} on {data['torch_threads']} thread, CPU, load average at the end: {load}. Time per "
        "environment step of `learn()` (rollouts and updates), median; ratio to TRPO within each round, "
        "min / median / max; the same time split into the updates (`train()`) and the rest (rollouts, logging), "
        "median and median ratio to TRPO. Last column: the `train()` time per environment step that a total of "
        f"{BEYOND_TARGET}x TRPO's would leave after the algorithm's own rest (negative: its rest alone exceeds it).",
        "",
        "| task | algorithm | ms per env step | x TRPO (min / median / max) | train() ms per env step (x TRPO) "
        f"| rest ms per env step (x TRPO) | train() ms per env step at {BEYOND_TARGET}x |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, variants in data["summary"].items():
        baseline = variants.get(BEYOND_BASELINE)
        for variant, entry in variants.items():
            ratio = "{:.2f} / {:.2f} / {:.2f}".format(*entry["ratio"])
            parts = [
                f"{entry[f'{part}_ms']:.3f} ({entry[f'{part}_ratio'][1]:.2f})" if f"{part}_ms" in entry else ""
                for part in ("train", "rest")
            ]
            allowed = ""
            if baseline is not None and variant != BEYOND_BASELINE and "rest_ms" in entry:
                allowed = f"{BEYOND_TARGET * baseline['ms'] - entry['rest_ms']:.3f}"
            lines.append(f"| {task} | {variant} | {entry['ms']:.3f} | {ratio} | {parts[0]} | {parts[1]} | {allowed} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------------------------------


def replace_between_markers(text: str, markers: tuple[str, str], body: str) -> str:
    """
    :param text: the README.
    :param markers: the start and end marker comments.
    :param body: the new content between them.
    :return: the README with only that section replaced.
    """
    start, end = markers
    head, found, rest = text.partition(start)
    if not found or end not in rest:
        raise ValueError(f"README lacks the markers {start} ... {end}")
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="results folder (returns/ and speed/)")
    parser.add_argument("--figures", type=Path, default=FIGURES_DIR, help="where the figures go")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md", help="the README to update")
    parser.add_argument("--speed-run", default=None, help="speed run folder name (default: the latest)")
    parser.add_argument("--envs", nargs="+", default=list(ENVS), help="environments of the returns table")
    parser.add_argument("--n-seeds", type=int, default=len(SEEDS), help="seeds per cell of the full campaign")
    args = parser.parse_args(argv)

    # a mistyped folder would otherwise replace the README's tables with "missing"
    if not (args.results / "returns").is_dir():
        parser.error(f"--results {args.results}: no returns/ folder there (results folder of the benchmarks)")
    results = load_returns(args.results / "returns")
    speed_dir = args.results / "speed"
    run_dir = speed_dir / args.speed_run if args.speed_run else latest_speed_run(speed_dir)
    if args.speed_run and not (speed_dir / args.speed_run).is_dir():
        runs = sorted(p.name for p in speed_dir.iterdir() if p.is_dir()) if speed_dir.is_dir() else []
        parser.error(f"--speed-run {args.speed_run}: no such run in {speed_dir} (runs: {', '.join(runs) or 'none'})")
    speed = load_speed(run_dir)
    figures_link = os.path.relpath(args.figures.resolve(), args.readme.resolve().parent)

    written = returns_figures(results, tuple(args.envs), args.figures) + speed_figures(speed, args.figures)
    readme = args.readme.read_text()
    speed_md = speed_table(speed, run_dir.name if run_dir else None, figures_link)
    readme = replace_between_markers(readme, SPEED_MARKERS, speed_md)
    if BEYOND_MARKERS[0] in readme:
        readme = replace_between_markers(readme, BEYOND_MARKERS, beyond_table(latest_beyond_run(args.results / "beyond")))
    returns_md = returns_table(results, tuple(args.envs), args.n_seeds, figures_link)
    probes = line_search_table(args.results / "diagnostics" / "line_search")
    probes += update_map_table(args.results / "diagnostics" / "update_map")
    probes += cg_start_table(args.results / "diagnostics" / "cg_start")
    readme = replace_between_markers(readme, RETURNS_MARKERS, returns_md + probes + recheck_table(results, args.results))
    args.readme.write_text(readme)
    n_runs = sum(len(runs) for runs in results.values())
    print(f"{n_runs} returns results, speed run {run_dir}; wrote {len(written)} figures and {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
