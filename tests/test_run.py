"""TRPO runs wherever sb3-contrib's TRPO runs: every supported space, vectorised environments, gSDE, VecNormalize,
callbacks, progress bar and loggers."""

import os

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv, SimpleMultiObsEnv
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import SubprocVecEnv, VecNormalize

from sb3_trpo_ext import TRPO
from tests.helpers import TINY, make_identity_env


@pytest.mark.parametrize("kind", ["box", "discrete", "multidiscrete", "multibinary"])
def test_action_spaces(kind: str) -> None:
    model = TRPO("MlpPolicy", make_identity_env(kind), n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0)
    model.learn(128)
    assert model.num_timesteps == 128
    assert model.logger.name_to_value["train/n_updates"] == 2


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_float_budget_and_string_env(env_id: str) -> None:
    model = TRPO("MlpPolicy", env_id, n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0)
    model.learn(2.56e2)  # a float budget, as people write 1e6
    assert model.num_timesteps == 256


def test_learn_rejects_a_non_finite_budget() -> None:
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, policy_kwargs=TINY)
    with pytest.raises(ValueError, match="total_timesteps"):
        model.learn(float("inf"))


def test_discrete_observations() -> None:
    env = make_identity_env("discrete")  # Discrete observations and actions
    assert isinstance(env.observation_space, gym.spaces.Discrete)
    TRPO("MlpPolicy", env, n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0).learn(64)


def test_image_observations_with_cnn_policy() -> None:
    env = FakeImageEnv(screen_height=40, screen_width=40, n_channels=1, discrete=True)
    model = TRPO(
        "CnnPolicy", env, n_steps=32, batch_size=16, policy_kwargs={"features_extractor_kwargs": {"features_dim": 16}}, seed=0
    )
    model.learn(64)
    assert model.logger.name_to_value["train/n_updates"] == 2


@pytest.mark.parametrize("shared", [True, False])
def test_dict_observations(shared: bool) -> None:
    env = SimpleMultiObsEnv(random_start=False)
    policy_kwargs = {"net_arch": [8], "share_features_extractor": shared}
    TRPO("MultiInputPolicy", env, n_steps=64, batch_size=32, policy_kwargs=policy_kwargs, seed=0).learn(128)


@pytest.mark.parametrize("sde_sample_freq", [-1, 4])
def test_gsde(sde_sample_freq: int) -> None:
    model = TRPO(
        "MlpPolicy",
        "Pendulum-v1",
        n_steps=64,
        batch_size=32,
        use_sde=True,
        sde_sample_freq=sde_sample_freq,
        policy_kwargs=TINY,
        seed=0,
    )
    model.learn(128)
    assert "train/std" in model.logger.name_to_value


def test_subproc_vec_env_and_vec_normalize() -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, vec_env_cls=SubprocVecEnv, seed=0))
    try:
        model = TRPO("MlpPolicy", env, n_steps=32, batch_size=32, policy_kwargs=TINY, seed=0)
        model.learn(128)
        assert model.num_timesteps == 128
        assert env.obs_rms.count > 1
    finally:
        env.close()


class LocalsReader(BaseCallback):
    """A custom callback reading the algorithm's local variables, as many users write them."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.stop_after, self.calls, self.rollout_ends = stop_after, 0, 0
        self.seen_keys: set[str] = set()

    def _on_step(self) -> bool:
        self.calls += 1
        self.seen_keys |= set(self.locals)
        assert self.locals["actions"].shape[0] == self.training_env.num_envs
        return self.stop_after is None or self.calls < self.stop_after

    def _on_rollout_end(self) -> None:
        self.rollout_ends += 1


def test_custom_callback_sees_locals_and_can_stop_training_early() -> None:
    callback = LocalsReader(stop_after=10)
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2), n_steps=32, batch_size=64, policy_kwargs=TINY)
    model.learn(1_000, callback=callback)
    assert callback.calls == 10
    assert model.num_timesteps == 20
    assert {"rewards", "dones", "infos", "new_obs", "actions", "values", "log_probs"} <= callback.seen_keys


def test_sb3_callbacks(tmp_path: os.PathLike) -> None:
    eval_env = make_vec_env("CartPole-v1", n_envs=1)
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1.0, verbose=0)  # any return beats it: stops at first eval
    eval_callback = EvalCallback(eval_env, eval_freq=64, n_eval_episodes=2, callback_on_new_best=stop, log_path=str(tmp_path))
    checkpoint = CheckpointCallback(save_freq=32, save_path=str(tmp_path / "ckpt"), name_prefix="trpo")
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs=TINY, seed=0)
    model.learn(10_000, callback=CallbackList([checkpoint, eval_callback]))
    assert model.num_timesteps == 64  # stopped by the reward threshold at the first evaluation
    assert os.path.exists(os.path.join(tmp_path, "evaluations.npz"))
    saved = sorted(os.listdir(tmp_path / "ckpt"))
    assert saved == ["trpo_32_steps.zip", "trpo_64_steps.zip"]
    TRPO.load(tmp_path / "ckpt" / "trpo_64_steps.zip")


def test_progress_bar() -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("rich")
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs=TINY)
    model.learn(64, progress_bar=True)
    assert model.num_timesteps == 64


def test_tensorboard_and_csv_logging_record_the_diagnostics(tmp_path: os.PathLike) -> None:
    pytest.importorskip("tensorboard")
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, policy_kwargs=TINY, tensorboard_log=str(tmp_path))
    model.learn(192, tb_log_name="run")
    assert any(name.startswith("run") for name in os.listdir(tmp_path))
    model.set_logger(configure(str(tmp_path / "csv"), ["csv"]))
    model.learn(192, reset_num_timesteps=False)
    header = (tmp_path / "csv" / "progress.csv").read_text().splitlines()[0].split(",")
    for key in [
        "train/surrogate_before",
        "train/surrogate_after",
        "train/kl",
        "train/line_search_success",
        "train/line_search_backtracks",
        "train/cg_iterations",
        "train/cg_residual_norm",
        "train/value_loss",
        "train/explained_variance",
        "train/std",
        "train/n_updates",
    ]:
        assert key in header, key


def test_tensorboard_runs_are_told_apart_from_sb3_contribs(tmp_path: os.PathLike) -> None:
    pytest.importorskip("tensorboard")
    from sb3_contrib import TRPO as ContribTRPO

    for cls in (ContribTRPO, TRPO, TRPO):  # one shared folder, as RL Zoo's -tb gives both --algo trpo and trpo_ext
        cls("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs=TINY, tensorboard_log=str(tmp_path)).learn(32)
    assert sorted(os.listdir(tmp_path)) == ["TRPO_1", "TRPO_ext_1", "TRPO_ext_2"]


def test_continued_training_keeps_counting() -> None:
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs=TINY)
    model.learn(64)
    model.learn(64, reset_num_timesteps=False)
    assert model.num_timesteps == 128
    assert model._n_updates == 4


def test_predict_shapes() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=32, batch_size=32, policy_kwargs=TINY)
    obs = np.zeros((5, 3), dtype=np.float32)
    actions, state = model.predict(obs, deterministic=True)
    assert actions.shape == (5, 1) and state is None


def test_trpo_needs_no_sb3_contrib_and_the_extras_say_what_they_need() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['sb3_contrib'] = None  # as if sb3-contrib were not installed\n"
        "import sb3_trpo_ext\n"
        "sb3_trpo_ext.TRPO('MlpPolicy', 'CartPole-v1', n_steps=32, batch_size=32).learn(32)\n"
        "try:\n"
        "    sb3_trpo_ext.MaskableTRPO\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs sb3-contrib" in result.stdout


def test_the_package_lists_every_export_including_the_lazily_imported_ones() -> None:
    import sb3_trpo_ext

    assert set(sb3_trpo_ext.__all__) <= set(dir(sb3_trpo_ext))
    assert all(hasattr(sb3_trpo_ext, name) for name in sb3_trpo_ext.__all__)


@pytest.mark.parametrize("algorithm", ["TRPO", "TRPO-gSDE", "RecurrentTRPO"])
def test_train_std_is_the_policys_after_the_update(algorithm: str) -> None:
    # As SB3's PPO and sb3-contrib's TRPO: exp(log_std).mean() of the policy the update leaves, not the one before
    import torch as th

    from sb3_trpo_ext import RecurrentTRPO

    if algorithm == "RecurrentTRPO":
        model: TRPO = RecurrentTRPO("MlpLstmPolicy", "Pendulum-v1", n_steps=64, batch_size=64, seed=0)
    else:
        model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, use_sde=algorithm == "TRPO-gSDE", seed=0)
    before = th.exp(model.policy.log_std).mean().item()
    model.learn(64)  # one rollout, one update; the update's records stay until the next rollout dumps them
    after = th.exp(model.policy.log_std).mean().item()
    assert after != before
    assert model.logger.name_to_value["train/std"] == after


def test_a_fractional_total_timesteps_trains_as_sb3_does() -> None:
    # SB3's loop runs while num_timesteps < total_timesteps: 96.5 steps need four rollouts of 32, as 97 do
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), n_steps=16, batch_size=32, seed=0)
    model.learn(96.5)
    assert model.num_timesteps == 128 and model._total_timesteps == 96.5


def test_a_subclass_overriding_sb3_contribs_methods_is_warned_that_they_are_not_called() -> None:
    class ContribStyle(TRPO):
        def hessian_vector_product(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("not called")

    with pytest.warns(UserWarning, match=r"ContribStyle defines hessian_vector_product: sb3-contrib's TRPO calls"):
        ContribStyle("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32)


def test_an_env_sb3_converts_is_checked_after_the_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    # An OpenAI Gym env has spaces of another library, which SB3 converts (with shimmy) before anything reads them
    import stable_baselines3.common.base_class as base_class

    class LegacySpace:
        """Not a Gymnasium space."""

    class LegacyEnv:
        observation_space, action_space = LegacySpace(), LegacySpace()

    def convert(env: object) -> gym.Env:
        return gym.make("CartPole-v1") if isinstance(env, LegacyEnv) else env  # type: ignore[return-value]

    monkeypatch.setattr(base_class, "_patch_env", convert)
    model = TRPO("MlpPolicy", LegacyEnv(), n_steps=32, batch_size=32)  # type: ignore[arg-type]
    assert isinstance(model.action_space, gym.spaces.Discrete)
    model.learn(32)
