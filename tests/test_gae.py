"""GAE advantages in the rollout buffer against an independent reference of the recursion
A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}, with episode ends and time-limit truncations."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_trpo_ext import TRPO


class CountingEnv(gym.Env):
    """Random rewards; terminates at random, and is truncated by a TimeLimit."""

    def __init__(self, seed: int) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(2,))
        self.action_space = spaces.Discrete(2)
        self.rng = np.random.default_rng(seed)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        return self.rng.uniform(-1, 1, size=2).astype(np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs = self.rng.uniform(-1, 1, size=2).astype(np.float32)
        return obs, float(self.rng.normal()), bool(self.rng.random() < 0.05), False, {}


class RecordTransitions(BaseCallback):
    """Keeps what the environment really returned, before the algorithm touches the rewards."""

    def __init__(self) -> None:
        super().__init__()
        self.rewards: list[np.ndarray] = []
        self.dones: list[np.ndarray] = []
        self.truncated_terminal_obs: list[list[np.ndarray | None]] = []

    def _on_rollout_start(self) -> None:
        self.rewards, self.dones, self.truncated_terminal_obs = [], [], []

    def _on_step(self) -> bool:
        self.rewards.append(np.array(self.locals["rewards"], dtype=np.float64))  # copied before bootstrapping
        self.dones.append(np.array(self.locals["dones"]))
        infos = self.locals["infos"]
        self.truncated_terminal_obs.append(
            [info["terminal_observation"] if info.get("TimeLimit.truncated", False) else None for info in infos]
        )
        return True


def reference_gae(
    rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, last_values: np.ndarray, gamma: float, lam: float
) -> np.ndarray:
    """Backwards recursion over time, one column per environment; ``dones[t]`` ends the episode after step t."""
    n_steps, n_envs = rewards.shape
    advantages = np.zeros((n_steps, n_envs))
    for env in range(n_envs):
        next_advantage, next_value = 0.0, last_values[env]
        for t in reversed(range(n_steps)):
            not_done = 0.0 if dones[t, env] else 1.0
            delta = rewards[t, env] + gamma * next_value * not_done - values[t, env]
            next_advantage = delta + gamma * lam * not_done * next_advantage
            advantages[t, env] = next_advantage
            next_value = values[t, env]
    return advantages


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (0.5, 0.0)])
def test_buffer_gae_matches_reference_with_episode_ends_and_truncations(gamma: float, lam: float) -> None:
    env = DummyVecEnv([lambda i=i: gym.wrappers.TimeLimit(CountingEnv(i), max_episode_steps=7) for i in range(2)])
    model = TRPO(
        "MlpPolicy", env, n_steps=50, batch_size=50, gamma=gamma, gae_lambda=lam, policy_kwargs={"net_arch": [8]}, seed=0
    )
    recorder = RecordTransitions()
    model.learn(100, callback=recorder)  # two rollouts; the buffer holds the second one (before this update)
    # Re-collect one rollout without training to compare the buffer with what the environment returned
    model._setup_learn(100, callback=None, reset_num_timesteps=False)
    from stable_baselines3.common.callbacks import CallbackList

    callback = CallbackList([recorder])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)

    buffer = model.rollout_buffer
    rewards = np.stack(recorder.rewards)
    dones = np.stack(recorder.dones)
    values = buffer.values.astype(np.float64)
    n_truncations = 0
    # Time-limit truncation: the episode ends, but the reward is bootstrapped with gamma * V(terminal observation)
    for t, row in enumerate(recorder.truncated_terminal_obs):
        for e, terminal_obs in enumerate(row):
            if terminal_obs is not None:
                n_truncations += 1
                with th.no_grad():
                    v = model.policy.predict_values(model.policy.obs_to_tensor(terminal_obs)[0]).item()
                rewards[t, e] += gamma * v
    assert n_truncations > 0 and (dones.sum() - n_truncations) > 0  # both kinds of episode end occurred
    np.testing.assert_allclose(buffer.rewards, rewards, rtol=1e-5, atol=1e-5)

    with th.no_grad():
        last_values = model.policy.predict_values(model.policy.obs_to_tensor(model._last_obs)[0]).numpy().flatten()
    expected = reference_gae(rewards, values, dones, last_values, gamma, lam)
    np.testing.assert_allclose(buffer.advantages, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(buffer.returns, expected + values, rtol=1e-4, atol=1e-4)
