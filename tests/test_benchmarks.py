"""The benchmark pipeline end to end in smoke mode: returns, speed and report, into a temporary folder."""

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th

from benchmarks.common import MATCHED, make_model, make_train_env, zoo_config
from benchmarks.report import (
    BEYOND_MARKERS,
    RETURNS_MARKERS,
    SPEED_MARKERS,
    iqm,
    load_returns,
    recheck_table,
    replace_between_markers,
)
from sb3_trpo_ext import from_sb3_contrib

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("sb3_trpo_ext", "sb3_contrib")
ENVS = ("CartPole-v1", "Pendulum-v1")
SEEDS = ("0", "1")


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    assert iqm(np.array([0.0, 1.0, 2.0, 3.0])) == pytest.approx(1.5)
    assert iqm(np.array([-100.0, 1.0, 2.0, 3.0, 100.0])) == pytest.approx(2.0)
    assert iqm(np.array([7.0])) == pytest.approx(7.0)


def test_replace_between_markers_keeps_everything_else() -> None:
    text = f"intro\n{SPEED_MARKERS[0]}\nold\n{SPEED_MARKERS[1]}\noutro\n"
    assert (
        replace_between_markers(text, SPEED_MARKERS, "new") == f"intro\n{SPEED_MARKERS[0]}\nnew\n{SPEED_MARKERS[1]}\noutro\n"
    )
    with pytest.raises(ValueError):
        replace_between_markers("no markers", RETURNS_MARKERS, "new")


def test_recheck_table_sets_re_runs_beside_the_campaign_on_the_same_seeds(tmp_path: Path) -> None:
    def write(folder: str, impl: str, seed: int, final: float) -> None:
        path = tmp_path / folder / impl / "CartPole-v1" / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        versions = {"git_commit": "abc1234", "sb3_trpo_ext_sources_sha256": "0123456789abcdef"}
        result = {"impl": impl, "env_id": "CartPole-v1", "seed": seed, "final_return": final, "versions": versions}
        path.write_text(json.dumps(result))

    for seed, (ours, theirs) in enumerate([(500.0, 400.0), (300.0, 200.0), (100.0, 0.0)]):
        write("returns", "sb3_trpo_ext", seed, ours)
        write("returns", "sb3_contrib", seed, theirs)
    write("returns_check_x", "sb3_trpo_ext", 0, 450.0)
    write("returns_check_x", "sb3_trpo_ext", 1, 250.0)  # seed 2 not re-run: left out of both comparisons
    table = recheck_table(load_returns(tmp_path / "returns"), tmp_path)
    (row,) = [line for line in table.splitlines() if line.startswith("| `returns_check_x/`")]
    assert row == (
        "| `returns_check_x/` | CartPole-v1 | sb3_trpo_ext | abc1234 (sources 01234567) | 0 1 | 350.0 ± 100.0 "
        "| 400.0 ± 100.0 | 300.0 ± 100.0 |"
    )
    assert recheck_table(load_returns(tmp_path / "returns"), tmp_path / "returns") == ""


def test_translated_arm_gets_sb3_contrib_trust_region_and_the_others_the_zoo_numbers() -> None:
    config = zoo_config("HalfCheetah-v5")  # target_kl 0.04, cg_damping 0.1, 6 action dimensions
    env = make_train_env(config, seed=0)
    try:
        built = {impl: make_model(impl, config, env, seed=0) for impl in ("sb3_trpo_ext", "sb3_contrib", MATCHED)}
    finally:
        env.close()
    numbers = {impl: (vars(model)["target_kl"], vars(model)["cg_damping"]) for impl, model in built.items()}
    assert numbers == {"sb3_trpo_ext": (0.04, 0.1), "sb3_contrib": (0.04, 0.1), MATCHED: (0.24, 0.6)}
    assert vars(built[MATCHED])["n_critic_updates"] == vars(built["sb3_trpo_ext"])["n_critic_updates"] == 20


@pytest.mark.slow
def test_smoke_pipeline_writes_results_figures_and_readme_tables(tmp_path: Path) -> None:
    results, figures = tmp_path / "results", tmp_path / "figures"

    # Returns: every cell writes its own file; a second run finds them all finished.
    returns_args = ["benchmarks.returns", "--smoke", "--out", str(results / "returns"), "--jobs", "2"]
    run(*returns_args, "--envs", *ENVS, "--seeds", *SEEDS)
    for impl in IMPLS:
        for env_id in ENVS:
            for seed in SEEDS:
                result = json.loads((results / "returns" / impl / env_id / f"seed{seed}.json").read_text())
                assert result["impl"] == impl and result["smoke"]
                assert len(result["curve"]["timesteps"]) == len(result["curve"]["mean"]) >= 1
                assert result["final_return"] == result["curve"]["mean"][-1]
                assert result["versions"]["sb3_contrib"]
    assert "0 to run" in run(*returns_args, "--envs", *ENVS, "--seeds", *SEEDS)
    # The extra arm: sb3_trpo_ext with sb3-contrib's trust region (zoo numbers translated by from_sb3_contrib)
    run(*returns_args, "--envs", "Pendulum-v1", "--seeds", "0", "--impls", MATCHED)
    matched = json.loads((results / "returns" / MATCHED / "Pendulum-v1" / "seed0.json").read_text())
    zoo = json.loads((results / "returns" / "sb3_contrib" / "Pendulum-v1" / "seed0.json").read_text())
    assert matched["impl"] == MATCHED and matched["final_return"] is not None
    assert matched["trust_region"] == from_sb3_contrib(gym.make("Pendulum-v1").action_space, **zoo["trust_region"])

    # Speed: every section writes its file.
    run("benchmarks.speed", "--smoke", "--out", str(results / "speed"), "--name", "smoke", "--envs", "HalfCheetah-v5")
    for section in ("learn", "floor", "batch", "width", "n_envs"):
        data = json.loads((results / "speed" / "smoke" / f"{section}.json").read_text())
        assert data["rows"] and data["torch_threads"] == 1
    learn = json.loads((results / "speed" / "smoke" / "learn.json").read_text())
    assert set(learn["summary"]) == {"HalfCheetah-v5"}

    # MaskableTRPO / RecurrentTRPO against TRPO: one file with every variant of both tasks.
    run("benchmarks.beyond_speed", "--smoke", "--out", str(results / "beyond"), "--name", "smoke")
    beyond = json.loads((results / "beyond" / "smoke" / "beyond.json").read_text())
    variants = {variant for task in beyond["summary"].values() for variant in task}
    assert {"TRPO", "MaskableTRPO", "RecurrentTRPO"} <= variants and beyond["torch_threads"] == 1
    assert all(0 < row["train_ms"] < row["ms"] for row in beyond["rows"])  # updates are a part of learn()

    # Report: figures, and tables only between the markers of a copy of the README.
    readme = tmp_path / "README.md"
    outside = "# Title\n\nText others edit.\n\n"
    readme.write_text(
        f"{outside}{SPEED_MARKERS[0]}\n{SPEED_MARKERS[1]}\n\n{BEYOND_MARKERS[0]}\n{BEYOND_MARKERS[1]}\n\n"
        f"{RETURNS_MARKERS[0]}\nstale\n{RETURNS_MARKERS[1]}\nend\n"
    )
    run("benchmarks.report", "--results", str(results), "--figures", str(figures), "--readme", str(readme))
    text = readme.read_text()
    assert text.startswith(outside) and text.endswith(f"{RETURNS_MARKERS[1]}\nend\n")
    assert "stale" not in text
    assert "| CartPole-v1 |" in text and "| HalfCheetah-v5 | 1M | missing (0/5 seeds)" in text
    assert "Floor ratio, HalfCheetah-v5" in text
    assert "| MaskableTRPO |" in text and "| RecurrentTRPO |" in text
    assert "| Pendulum-v1 | 1 | 0 1 | the zoo's (d = 1) |" in text  # the packaged settings' table (d = 1: the same runs)
    for name in ("returns_CartPole-v1", "returns_Pendulum-v1", "returns_all", "speed_batch", "speed_width", "speed_n_envs"):
        assert (figures / f"{name}.png").stat().st_size > 0


def test_fingerprint_is_reproducible_and_tells_a_different_training_apart(tmp_path: Path) -> None:
    """Same code, same seed: identical weights (the comparison passes); another seed: the comparison fails."""
    run("benchmarks.fingerprint", "--envs", "CartPole-v1", "--timesteps", "512", "--out", str(tmp_path), "--name", "a")
    reference = tmp_path / "a.json"
    assert "identical" in run("benchmarks.fingerprint", "--compare", str(reference))
    data = json.loads(reference.read_text())
    data["seed"] += 1  # a file claiming this seed's weights: the same command now trains something else
    changed = tmp_path / "b.json"
    changed.write_text(json.dumps(data))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fingerprint", "--compare", str(changed)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and "DIFFERENT" in result.stdout


def test_packaged_settings_table_takes_the_translated_arm_where_d_exceeds_one() -> None:
    from benchmarks.report import matched_table

    def run(seed: int, final: float, **extra: object) -> dict:
        return {"seed": seed, "final_return": final, **extra}

    region = {"trust_region": {"target_kl": 0.02, "cg_damping": 0.2}}
    results = {
        (MATCHED, "LunarLanderContinuous-v3"): [run(0, 10.0, **region), run(1, 20.0, **region)],
        ("sb3_contrib", "LunarLanderContinuous-v3"): [run(0, 1.0), run(1, 3.0), run(2, 100.0)],
        ("sb3_trpo_ext", "LunarLanderContinuous-v3"): [run(0, 5.0), run(1, 7.0)],
        ("sb3_trpo_ext", "CartPole-v1"): [run(0, 500.0)],
        (MATCHED, "CartPole-v1"): [run(0, -1.0)],  # d = 1: the sb3_trpo_ext runs are the packaged settings' runs
        ("sb3_contrib", "CartPole-v1"): [run(0, 400.0)],
    }
    table = matched_table(results, ("CartPole-v1", "LunarLanderContinuous-v3", "Hopper-v5"))
    # the contrib seed the arm did not run (seed 2) is left out of the comparison
    # p: both arm runs above both contrib runs, the most extreme of the C(4, 2) = 6 orders, two-sided: 2 / 6
    assert (
        "| LunarLanderContinuous-v3 | 2 | 0 1 | 0.02 / 0.2 | 15.0 ± 5.0 (2) | 2.0 ± 1.0 (2) | 0.33 | 6.0 ± 1.0 (2) |" in table
    )
    assert "| CartPole-v1 | 1 | 0 | the zoo's (d = 1) | 500.0 ± 0.0 (1) | 400.0 ± 0.0 (1) |  | same runs |" in table
    assert "| Hopper-v5 | 3 | | | missing | | | |" in table
    assert "Below sb3_contrib's mean with the packaged settings: none; the smallest p: 0.33." in table  # one test
    results[(MATCHED, "LunarLanderContinuous-v3")] = [run(0, 0.0, **region), run(1, 0.5, **region)]
    assert "mean with the packaged settings: LunarLanderContinuous-v3 (p 0.33); the smallest p: 0.33." in matched_table(
        results, ("CartPole-v1", "LunarLanderContinuous-v3")
    )
    assert matched_table({("sb3_trpo_ext", "CartPole-v1"): [run(0, 500.0)]}, ("CartPole-v1",)) == ""


def test_packaged_settings_table_adjusts_the_smallest_p_for_the_number_of_environments() -> None:
    from benchmarks.report import matched_table

    def runs(finals: list[float]) -> list[dict]:
        return [{"seed": seed, "final_return": final} for seed, final in enumerate(finals)]

    results = {  # d = 1 environments: the sb3_trpo_ext runs are the packaged settings' runs
        ("sb3_trpo_ext", "CartPole-v1"): runs([1.0, 2.0, 3.0]),
        ("sb3_contrib", "CartPole-v1"): runs([4.0, 5.0, 6.0]),  # p = 2 / 20
        ("sb3_trpo_ext", "Acrobot-v1"): runs([1.0, 4.0]),
        ("sb3_contrib", "Acrobot-v1"): runs([2.0, 3.0]),  # p = 1
        (MATCHED, "CartPole-v1"): runs([0.0]),  # the table is drawn once the translated arm has results
    }
    table = matched_table(results, ("CartPole-v1", "Acrobot-v1"))
    assert "the smallest p: 0.10, 0.20 once adjusted for testing 2 environments at once (Holm's method" in table


def test_holm_adjustment() -> None:
    from benchmarks.report import holm_adjusted

    # sorted 0.01, 0.02, 0.04, 0.5 of m = 4: 4 * 0.01, 3 * 0.02, max(0.06, 2 * 0.04), max(0.08, 1 * 0.5)
    assert holm_adjusted([0.04, 0.5, 0.01, 0.02]) == pytest.approx([0.08, 0.5, 0.04, 0.06])
    # the step-down keeps the order (0.03 * 2 = 0.06 would drop below 0.025 * 3 = 0.075), and caps at 1
    assert holm_adjusted([0.025, 0.03, 0.03]) == pytest.approx([0.075, 0.075, 0.075])
    assert holm_adjusted([0.6, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjusted([]) == []


def test_mann_whitney_p_is_the_exact_two_sided_rank_test() -> None:
    from benchmarks.report import mann_whitney_p

    # fully separated samples of 3: the 2 most extreme of C(6, 3) = 20 rank orders
    assert mann_whitney_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(2 / 20)
    assert mann_whitney_p([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2 / 20)
    # interleaved: U = 2 of 4, the middle of the distribution
    assert mann_whitney_p([1.0, 4.0], [2.0, 3.0]) == pytest.approx(1.0)
    assert mann_whitney_p([1.0], [2.0, 3.0]) is None


def test_line_search_probe_records_every_update_and_leaves_training_unchanged() -> None:
    from benchmarks.line_search_probe import ProbedTRPO, summary
    from sb3_trpo_ext import TRPO

    kwargs = {"n_steps": 256, "batch_size": 64, "seed": 3, "policy_kwargs": {"net_arch": [16]}}
    probed = ProbedTRPO("MlpPolicy", "Pendulum-v1", **kwargs)
    probed.records = []
    probed.learn(768)
    plain = TRPO("MlpPolicy", "Pendulum-v1", **kwargs).learn(768)
    for a, b in zip(probed.policy.parameters(), plain.policy.parameters()):
        assert th.equal(a, b)  # the probe restores what the line search chose, bit for bit
    assert len(probed.records) == 3
    record = probed.records[0]
    assert record["first_kl_old_new"] > 0 and record["first_kl_new_old"] > 0
    # a first candidate inside the bound in one direction only: the two line searches would decide differently
    records = [
        {"backtracks": 0, "accepted": True, "first_kl_old_new": 0.009, "first_kl_new_old": 0.011, "first_surrogate_gain": 1.0},
        {"backtracks": 2, "accepted": True, "first_kl_old_new": 0.02, "first_kl_new_old": 0.03, "first_surrogate_gain": 1.0},
    ]
    result = summary(records, target_kl=0.01)
    assert result["decisions_differ"] == 1 and result["updates_with_backtracks"] == 1 and result["updates_rejected"] == 0


def test_line_search_table_shows_each_probe(tmp_path: Path) -> None:
    from benchmarks.report import line_search_table

    assert line_search_table(tmp_path) == ""
    summary = {
        "updates": 489,
        "updates_with_backtracks": 1,
        "updates_rejected": 0,
        "decisions_differ": 0,
        "median_first_kl_old_new": 0.1819,
        "median_first_kl_new_old": 0.1813,
        "max_first_kl_old_new": 0.2952,
        "max_first_kl_new_old": 0.2957,
        "target_kl": 0.24,
    }
    data = {"env_id": "HalfCheetah-v5", "seed": 1, "timesteps": 1001472, "summary": summary}
    (tmp_path / "HalfCheetah-v5-seed1.json").write_text(json.dumps(data))
    table = line_search_table(tmp_path)
    assert "| HalfCheetah-v5 | 1 | 1,001,472 | 489 | 0.24 | 0.182 / 0.181 | 0.295 / 0.296 | 1 | 0 | 0 |" in table


def test_update_map_probe_matches_sb3_contrib_with_several_critic_minibatches_and_leaves_training_unchanged() -> None:
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from benchmarks.update_map_probe import MirroredTRPO, summary
    from sb3_trpo_ext import TRPO, from_sb3_contrib
    from tests.test_contrib_equivalence import TargetEnv

    contrib_kwargs = {
        "n_steps": 256,
        "batch_size": 64,  # four critic minibatches per epoch, in sb3-contrib's order within the comparison
        "n_critic_updates": 3,
        "cg_max_steps": 15,
        "target_kl": 0.01,
        "cg_damping": 0.1,
        "policy_kwargs": {"net_arch": [16]},
    }
    ours_kwargs = from_sb3_contrib(TargetEnv().action_space, **contrib_kwargs)
    probed = MirroredTRPO("MlpPolicy", TargetEnv(), seed=3, device="cpu", **ours_kwargs)
    state = th.get_rng_state(), np.random.get_state()
    reference = sb3_contrib.TRPO("MlpPolicy", TargetEnv(), seed=3, device="cpu", **contrib_kwargs)
    th.set_rng_state(state[0])
    np.random.set_state(state[1])
    probed.mirror(reference, every=1).learn(3 * 256)
    plain = TRPO("MlpPolicy", TargetEnv(), seed=3, device="cpu", **ours_kwargs).learn(3 * 256)
    for a, b in zip(probed.policy.parameters(), plain.policy.parameters()):
        assert th.equal(a, b)  # the comparison puts everything back before the run's own update
    assert len(probed.records) == 3
    result = summary(probed.records)
    # float32 sums in a different order: about 1e-6 measured; a critic trained in another minibatch order is ~1e-2 off
    assert result["max_actor_difference"] < 1e-4, result
    assert result["max_critic_difference"] < 1e-4, result
    assert result["acceptance_differs"] == 0
    assert all(record["accepted"] and record["contrib_accepted"] for record in probed.records)


def test_update_map_table_shows_each_probe(tmp_path: Path) -> None:
    from benchmarks.report import update_map_table

    assert update_map_table(tmp_path) == ""
    summary = {
        "updates_compared": 49,
        "median_actor_difference": 6.4e-7,
        "max_actor_difference": 2.1e-6,
        "median_contrib_cg_start_difference": 9.0e-7,
        "max_contrib_cg_start_difference": 1.4e-6,
        "median_critic_difference": 7.6e-7,
        "max_critic_difference": 3.0e-6,
        "min_actor_length_ratio": 0.9999991,
        "max_actor_length_ratio": 1.0000012,
        "acceptance_differs": 0,
        "updates_with_backtracks": 1,
    }
    data = {
        "env_id": "HalfCheetah-v5",
        "seed": 9,
        "timesteps": 1001472,
        "every": 10,
        "final_return": 457.2,
        "summary": summary,
    }
    (tmp_path / "HalfCheetah-v5-seed9.json").write_text(json.dumps(data))
    table = update_map_table(tmp_path)
    row = "| HalfCheetah-v5 | 9 | 1,001,472 | 457 | 49 (one in 10) | 6.4e-07 / 2.1e-06 | 9.0e-07 / 1.4e-06 | "
    assert row + "7.6e-07 / 3.0e-06 | 0.999999 - 1.000001 | 0 |" in table, table


def test_cg_start_variants_start_each_package_as_the_other_does() -> None:
    sb3_contrib = pytest.importorskip("sb3_contrib")
    import sb3_contrib.trpo.trpo as contrib_module

    import sb3_trpo_ext.trpo.trpo as module
    from benchmarks.cg_start import cg_start

    generator = th.Generator().manual_seed(0)
    root = th.randn(12, 12, generator=generator, dtype=th.float64)
    matrix = root @ root.T + 0.1 * th.eye(12, dtype=th.float64)
    b = th.randn(12, generator=generator, dtype=th.float64)

    def matvec(v: th.Tensor) -> th.Tensor:
        return matrix @ v

    def ours() -> th.Tensor:
        th.manual_seed(5)
        return module.conjugate_gradient(matvec, b, max_iter=4, residual_tol=1e-10).x

    def theirs() -> th.Tensor:
        th.manual_seed(5)
        return contrib_module.conjugate_gradient_solver(matvec, b, max_iter=4)

    assert sb3_contrib is not None
    # four iterations on a 12 x 12 system: far from converged, so the start shows in the result
    assert not th.allclose(ours(), theirs(), rtol=1e-6, atol=1e-9)
    with cg_start("sb3_trpo_ext_random_start"):
        th.testing.assert_close(ours(), theirs(), rtol=1e-9, atol=1e-12)
    with cg_start("sb3_contrib_zero_start"):
        th.testing.assert_close(theirs(), ours(), rtol=1e-9, atol=1e-12)
    assert not th.allclose(ours(), theirs(), rtol=1e-6, atol=1e-9)  # both put back


def test_cg_start_table_compares_each_variant_with_sb3_contrib(tmp_path: Path) -> None:
    from benchmarks.report import cg_start_table

    assert cg_start_table(tmp_path) == ""
    runs = []
    for seed, shift in ((1, 0.0), (2, 10.0), (3, 20.0)):
        for variant, level in (("sb3_contrib", 100.0), ("sb3_trpo_ext", 1000.0)):
            evaluations = [0.0, 0.0, level + shift, level + shift, level + shift]
            record = {"variant": variant, "seed": seed, "timesteps": [10240 * (i + 1) for i in range(5)]}
            runs.append({**record, "evaluations": evaluations, "training_episodes_mean": level})
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(run) + "\n" for run in runs))
    table = cg_start_table(tmp_path)
    assert "| sb3_trpo_ext | 3 | 51,200 | 1010 / 1010 | 1010 | 1000 | 0.10 |" in table, table
    assert "| sb3_contrib | 3 | 51,200 | 110 / 110 | 110 | 100 |  |" in table, table
    assert "seeds 1-3" in table


def test_cg_start_runs_leave_out_a_cut_short_line_and_a_run_without_evaluations(tmp_path: Path) -> None:
    from benchmarks.cg_start import load_runs

    good = {"variant": "sb3_contrib", "seed": 1, "timesteps": [10240], "evaluations": [5.0], "training_episodes_mean": 1}
    empty = {**good, "seed": 2, "timesteps": [], "evaluations": []}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(empty) + "\n" + json.dumps(good)[:20])  # an interrupted write
    assert load_runs(path) == [good]


def test_returns_smoke_results_do_not_count_as_finished_real_cells(tmp_path: Path) -> None:
    from benchmarks.returns import Cell, is_finished

    cell = Cell("sb3_trpo_ext", "CartPole-v1", 0)
    cell.path(tmp_path).parent.mkdir(parents=True)
    cell.path(tmp_path).write_text(json.dumps({"final_return": 10.0, "smoke": True}))
    assert is_finished(cell, tmp_path, smoke=True)
    assert not is_finished(cell, tmp_path)


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("benchmarks.update_map_probe", ["--every", "0"], "--every must be >= 1, got 0"),
        ("benchmarks.update_map_probe", ["--env", "CartPole-v1", "--steps", "0"], "--steps must be at least 1024"),
        ("benchmarks.line_search_probe", ["--env", "CartPole-v1", "--steps", "-1"], "--steps must be at least 1024"),
        ("benchmarks.beyond_speed", ["--steps", "0"], "--steps and --pairs must be >= 1"),
        ("benchmarks.speed", ["--pairs", "0"], "--pairs must be >= 1, got 0"),
        ("benchmarks.cg_start", ["--steps", "0"], "--steps must be >= 10240"),
        ("benchmarks.fingerprint", ["--compare", "{not_a_fingerprint}"], "is not a fingerprint file"),
        ("benchmarks.fingerprint", ["--compare", "{fingerprint}", "--timesteps", "1024"], "was made with 512"),
        ("benchmarks.fingerprint", ["--compare", "{fingerprint}", "--envs", "Hopper-v5"], "has no hash for Hopper-v5"),
    ],
)
def test_benchmark_commands_reject_bad_options_before_running(
    module: str, args: list[str], message: str, tmp_path: Path
) -> None:
    not_a_fingerprint = tmp_path / "result.json"
    not_a_fingerprint.write_text(json.dumps({"final_return": 1.0}))
    fingerprint = tmp_path / "fingerprint.json"
    fingerprint.write_text(json.dumps({"hashes": {"CartPole-v1": "0" * 64}, "timesteps": 512, "seed": 3}))
    args = [arg.format(not_a_fingerprint=not_a_fingerprint, fingerprint=fingerprint) for arg in args]
    result = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_make_model_builds_a_probe_subclass_and_refuses_another_family() -> None:
    from benchmarks.line_search_probe import ProbedTRPO

    config = zoo_config("Pendulum-v1")
    env = make_train_env(config, seed=0)
    model = make_model(MATCHED, config, env, seed=0, algorithm=ProbedTRPO)
    assert type(model) is ProbedTRPO and model.n_steps == config.model_kwargs["n_steps"]
    with pytest.raises(TypeError, match="not a subclass"):
        make_model("sb3_contrib", config, env, seed=0, algorithm=ProbedTRPO)


def test_beyond_speed_splits_each_ratio_into_updates_and_the_rest(tmp_path: Path) -> None:
    from benchmarks.beyond_speed import summary
    from benchmarks.report import beyond_table

    def row(variant: str, pair: int, ms: float, train_ms: float) -> dict:
        return {"task": "t", "variant": variant, "pair": pair, "warmup": pair < 0, "steps": 8, "ms": ms, "train_ms": train_ms}

    rows = [row("TRPO", -1, 99.0, 1.0), row("X", -1, 1.0, 0.5)]  # the warm-up round is left out
    rows += [row("TRPO", 0, 1.0, 0.25), row("X", 0, 3.0, 2.5), row("TRPO", 1, 2.0, 0.5), row("X", 1, 4.0, 3.0)]
    x = summary(rows)["t"]["X"]
    assert x["ratio"] == (2.0, 2.5, 3.0) and x["pairs"] == 2
    assert x["train_ratio"] == (6.0, 8.0, 10.0) and x["train_ms"] == 2.75  # 2.5 / 0.25 and 3.0 / 0.5
    assert x["rest_ratio"] == (0.5 / 0.75, (0.5 / 0.75 + 1.0 / 1.5) / 2, 1.0 / 1.5) and x["rest_ms"] == 0.75

    versions = {"sb3_trpo_ext": "0", "git_commit": "c", "torch": "2"}
    data = {"created": "now", "versions": versions, "load_average": [1, 1, 1], "torch_threads": 1}
    (tmp_path / "beyond.json").write_text(json.dumps({**data, "summary": summary(rows)}))
    # a 1.5x total would leave 1.5 * 1.5 (TRPO's median total) - 0.75 (X's rest) = 1.5 for X's train()
    assert "| t | X | 3.500 | 2.00 / 2.50 / 3.00 | 2.750 (8.00) | 0.750 (0.67) | 1.500 |" in beyond_table(tmp_path)


def test_report_refuses_a_mistyped_results_folder_or_speed_run_and_leaves_the_readme(tmp_path: Path) -> None:
    from benchmarks.report import main

    readme = tmp_path / "README.md"
    readme.write_text("untouched")
    figures = str(tmp_path / "figures")
    with pytest.raises(SystemExit) as exit_info:
        main(["--results", str(tmp_path / "typo"), "--figures", figures, "--readme", str(readme)])
    assert exit_info.value.code == 2
    (tmp_path / "results" / "returns").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["--results", str(tmp_path / "results"), "--speed-run", "nope", "--figures", figures, "--readme", str(readme)])
    assert exit_info.value.code == 2
    assert readme.read_text() == "untouched"
