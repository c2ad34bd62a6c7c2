"""``python -m sb3_trpo_ext``, the README's default job, with a tiny budget."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sb3_trpo_ext", "--timesteps", "1024", "--eval-episodes", "2", "--no-progress-bar", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_trains_evaluates_and_saves_on_one_torch_thread(tmp_path: Path) -> None:
    saved = tmp_path / "new folder" / "model.zip"  # created, as SB3's save does
    result = run_cli("--save", str(saved))
    assert result.returncode == 0, result.stderr
    assert "training TRPO (MlpPolicy) on CartPole-v1 for 1024 steps, in whole rollouts of 1024 (torch on 1 thread)" in (
        result.stdout
    )
    assert "Evaluation on CartPole-v1: mean return" in result.stdout
    assert saved.exists()


def test_cli_rejects_a_negative_thread_count() -> None:
    result = run_cli("--threads", "-1")
    assert result.returncode == 2
    assert "--threads must be >= 0, got -1" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timesteps", "0"], "--timesteps must be a finite number >= 1, got 0.0"),
        (["--timesteps", "inf"], "--timesteps must be a finite number >= 1, got inf"),
        (["--n-envs", "0"], "--n-envs must be >= 1, got 0"),
        (["--eval-episodes", "0"], "--eval-episodes must be >= 1, got 0"),
        (["--save", "{file}/model.zip"], "--save {file}/model.zip: {file} is not a writable folder"),
        (["--save", "{folder}"], "--save {folder}: is a folder"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**32 - n_envs] = [0, 4294967294], got -1"),
        (["--seed", "4294967295"], "--seed must be an integer in [0, 2**32 - n_envs] = [0, 4294967294], got 4294967295"),
        (["--env", "NotAnEnv-v0"], "--env NotAnEnv-v0: NameNotFound"),
        (["--env", "ALE/Pong-v5"], "--env ALE/Pong-v5: NamespaceNotFound"),
        (["--env", "Blackjack-v1"], "--env Blackjack-v1: Unsupported observation space Tuple"),
    ],
)
def test_cli_rejects_bad_options_before_training(args: list[str], message: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    names = {"file": a_file, "folder": tmp_path}
    args, message = [arg.format(**names) for arg in args], message.format(**names)
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "training TRPO" not in result.stdout


def test_cli_trains_dict_observations_with_the_multi_input_policy() -> None:
    result = run_cli("--env", "tests.helpers:sb3_trpo_ext_tests/SimpleMultiObs-v0", "--timesteps", "256")
    assert result.returncode == 0, result.stderr
    assert "training TRPO (MultiInputPolicy)" in result.stdout
