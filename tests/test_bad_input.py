"""Bad input fails at construction with a message naming the parameter or space, its value and the valid range."""

import re

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from sb3_trpo_ext import TRPO

BAD_HYPERPARAMETERS = [
    ("target_kl", 0.0, "> 0"),
    ("target_kl", -0.01, "> 0"),
    ("target_kl", float("nan"), "> 0"),
    ("cg_max_steps", 0, ">= 1"),
    ("cg_damping", -0.1, ">= 0"),
    ("line_search_shrinking_factor", 0.0, "(0, 1)"),
    ("line_search_shrinking_factor", 1.0, "(0, 1)"),
    ("line_search_shrinking_factor", 1.5, "(0, 1)"),
    ("line_search_max_iter", 0, ">= 1"),
    ("n_critic_updates", -1, ">= 0"),
    ("sub_sampling_factor", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("gamma", 1.01, "[0, 1]"),
    ("gamma", -0.1, "[0, 1]"),
    ("gae_lambda", 1.5, "[0, 1]"),
    ("gae_lambda", -0.5, "[0, 1]"),
    ("n_steps", 0, ">= 1"),
    # integer hyperparameters reject fractions (they would fail inside train(), after a whole rollout) and None
    ("batch_size", 32.5, "an integer >= 1"),
    ("n_steps", 64.5, "an integer >= 1"),
    ("cg_max_steps", 3.5, "an integer >= 1"),
    ("line_search_max_iter", 2.5, "an integer >= 1"),
    ("n_critic_updates", 1.5, "an integer >= 0"),
    ("sub_sampling_factor", 1.5, "an integer >= 1"),
    ("batch_size", None, "an integer >= 1"),
    ("target_kl", None, "> 0"),
    ("learning_rate", -1e-3, ">= 0, or a schedule"),
    ("learning_rate", float("inf"), ">= 0, or a schedule"),
    ("learning_rate", "0.001", ">= 0, or a schedule"),
]


@pytest.mark.parametrize("name,value,valid_range", BAD_HYPERPARAMETERS)
def test_invalid_hyperparameter_names_parameter_value_and_range(name: str, value: float, valid_range: str) -> None:
    with pytest.raises(ValueError) as error:
        TRPO("MlpPolicy", "CartPole-v1", **{name: value})
    message = str(error.value)
    assert name in message
    assert repr(value) in message
    assert valid_range in message


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"gamma": np.float32(0.99), "gae_lambda": np.float32(0.9), "target_kl": np.float32(0.02)},
        {"cg_damping": np.float16(0.1), "line_search_shrinking_factor": np.float64(0.8)},
        {"n_steps": np.int64(32), "batch_size": np.int32(16), "cg_max_steps": np.int16(5), "n_critic_updates": np.uint8(2)},
    ],
)
def test_numpy_scalar_hyperparameters_are_accepted_and_train(hyperparameters: dict) -> None:
    # Values read from arrays, configuration files or optimisers are NumPy scalars; sb3-contrib accepts them too
    model = TRPO("MlpPolicy", "CartPole-v1", **{"n_steps": 32, "batch_size": 16, **hyperparameters})
    model.learn(64)
    assert model.num_timesteps == 64


def test_single_sample_buffer_with_advantage_normalisation_is_rejected() -> None:
    with pytest.raises(ValueError, match=re.escape("n_steps * n_envs must be > 1")):
        TRPO("MlpPolicy", "CartPole-v1", n_steps=1, batch_size=1)
    TRPO("MlpPolicy", "CartPole-v1", n_steps=1, batch_size=1, normalize_advantage=False)  # fine without it


def test_truncated_minibatch_warning_is_kept() -> None:
    with pytest.warns(UserWarning, match="truncated mini-batch"):
        TRPO("MlpPolicy", "CartPole-v1", n_steps=100, batch_size=64)


class SpaceEnv(gym.Env):
    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        return self.observation_space.sample(), {}

    def step(self, action: object) -> tuple:
        return self.observation_space.sample(), 0.0, False, False, {}


BOX = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)


@pytest.mark.parametrize(
    "action_space",
    [spaces.Tuple([spaces.Discrete(2), spaces.Discrete(3)]), spaces.Dict({"a": spaces.Discrete(2)})],
    ids=["tuple", "dict"],
)
def test_unsupported_action_space_names_the_space(action_space: spaces.Space) -> None:
    with pytest.raises(ValueError, match="Unsupported action space") as error:
        TRPO("MlpPolicy", SpaceEnv(BOX, action_space))
    assert str(action_space) in str(error.value)


def test_unsupported_observation_space_names_the_space() -> None:
    observation_space = spaces.Tuple([BOX, BOX])
    with pytest.raises(ValueError, match="Unsupported observation space") as error:
        TRPO("MlpPolicy", SpaceEnv(observation_space, spaces.Discrete(2)))
    assert str(observation_space) in str(error.value)
