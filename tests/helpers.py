"""Shared helpers of the test suite: tiny models and direct (slow, obvious) reference computations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvBox, IdentityEnvMultiBinary, IdentityEnvMultiDiscrete

from sb3_trpo_ext import TRPO

TINY = {"net_arch": [8]}

#: A registered environment with Dict observations, for ``gym.make("tests.helpers:" + DICT_ENV_ID)`` (the CLI)
DICT_ENV_ID = "sb3_trpo_ext_tests/SimpleMultiObs-v0"
if DICT_ENV_ID not in gym.registry:
    gym.register(DICT_ENV_ID, entry_point="stable_baselines3.common.envs:SimpleMultiObsEnv", max_episode_steps=50)


def make_identity_env(kind: str) -> gym.Env:
    """A tiny SB3 test environment whose action space is of the given kind."""
    if kind == "box":
        return IdentityEnvBox(ep_length=20)
    if kind == "discrete":
        return IdentityEnv(dim=3, ep_length=20)
    if kind == "multidiscrete":
        return IdentityEnvMultiDiscrete(dim=3, ep_length=20)
    if kind == "multibinary":
        return IdentityEnvMultiBinary(dim=3, ep_length=20)
    raise ValueError(kind)


def torch_distribution(model: TRPO, observations: th.Tensor) -> list[th.distributions.Distribution]:
    """The policy's action distribution as plain torch distributions (one per independent component)."""
    distribution = model.policy.get_distribution(observations).distribution
    return list(distribution) if isinstance(distribution, list) else [distribution]


def detached_copy(distribution: th.distributions.Distribution) -> th.distributions.Distribution:
    if isinstance(distribution, th.distributions.Normal):
        return th.distributions.Normal(distribution.loc.detach(), distribution.scale.detach())
    if isinstance(distribution, th.distributions.Categorical):
        return th.distributions.Categorical(logits=distribution.logits.detach())
    if isinstance(distribution, th.distributions.Bernoulli):
        return th.distributions.Bernoulli(logits=distribution.logits.detach())
    raise TypeError(type(distribution))


def summed_kl(old: list[th.distributions.Distribution], new: list[th.distributions.Distribution]) -> th.Tensor:
    """KL(old || new) per sample, summed over action components, by torch's own kl_divergence."""
    total = 0.0
    for o, n in zip(old, new):
        kl = th.distributions.kl_divergence(o, n)
        total = total + (kl.sum(dim=-1) if kl.dim() > 1 else kl)
    return total  # type: ignore[return-value]


def mean_kl_to(model: TRPO, old: list[th.distributions.Distribution], observations: th.Tensor) -> float:
    with th.no_grad():
        return summed_kl(old, torch_distribution(model, observations)).mean().item()


def sample_observations(space: spaces.Space, n: int, seed: int = 0) -> np.ndarray:
    space.seed(seed)
    return np.stack([space.sample() for _ in range(n)]).astype(np.float32)


def parameters_snapshot(params: list[th.nn.Parameter]) -> list[th.Tensor]:
    return [p.detach().clone() for p in params]


def bit_identical(params: list[th.nn.Parameter], snapshot: list[th.Tensor]) -> bool:
    return all(th.equal(p.detach(), s) for p, s in zip(params, snapshot))


class MultiActionEnv(gym.Env):
    """Box observations, MultiDiscrete or MultiBinary actions, episodes of random length."""

    def __init__(self, action_space: gym.spaces.Space) -> None:
        self.observation_space = gym.spaces.Box(-5.0, 5.0, shape=(4,), dtype=np.float32)
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        return self.np_random.normal(size=4).astype(np.float32), {}

    def step(self, action: np.ndarray) -> tuple:
        reward = float(np.sum(action)) - 1.0
        return self.np_random.normal(size=4).astype(np.float32), reward, bool(self.np_random.random() < 0.05), False, {}
