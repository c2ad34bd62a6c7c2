"""
Bad input fails with a message naming the parameter or space, its value and the valid range: at construction, or,
for a hyperparameter set after it, before anything is collected or updated.
"""

import inspect
import re
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib import MaskablePPO, RecurrentPPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from sb3_trpo_ext import TRPO, MaskableTRPO, RecurrentTRPO

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
    # flags given as strings would count as true ("no", "False")
    ("use_sde", "no", "True or False"),
    ("normalize_advantage", "False", "True or False"),
    ("sde_sample_freq", 2.5, "an integer"),
    ("sde_sample_freq", "4", "an integer"),
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


def test_single_sample_buffer_reached_after_construction_is_rejected_before_training(tmp_path: Path) -> None:
    # by a new environment at load (2 envs saved, 1 given), or by assignment
    TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2), n_steps=1, batch_size=2).save(tmp_path / "two_envs")
    loaded = TRPO.load(tmp_path / "two_envs", env=make_vec_env("CartPole-v1", n_envs=1))
    assigned = TRPO("MlpPolicy", "CartPole-v1", n_steps=1, batch_size=1, normalize_advantage=False)
    assigned.normalize_advantage = True
    for model in (loaded, assigned):
        before = weights(model)
        with pytest.raises(ValueError, match=re.escape("n_steps * n_envs must be > 1") + ".*set after"):
            model.learn(4)
        assert unchanged(before, model) and model.num_timesteps == 0


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
    ("action_space", "reason"),
    [
        (spaces.Tuple([spaces.Discrete(2), spaces.Discrete(3)]), "supports Box, Discrete"),
        (spaces.Dict({"a": spaces.Discrete(2)}), "supports Box, Discrete"),
        (spaces.Box(-np.inf, np.inf, shape=(2,)), "finite lower and upper bounds"),
        (spaces.Box(np.array([-1.0, -np.inf]), np.array([1.0, 1.0])), "finite lower and upper bounds"),
        (spaces.MultiBinary((2, 2)), "need n as an int, as in MultiBinary(3), got n=(2, 2)"),
        (spaces.MultiBinary([3]), "need n as an int, as in MultiBinary(3), got n="),
        (spaces.MultiDiscrete([[2, 3], [2, 3]]), "one-dimensional, got shape (2, 2)"),
    ],
    ids=["tuple", "dict", "infinite-box", "half-infinite-box", "2d-multibinary", "list-n-multibinary", "2d-multidiscrete"],
)
@pytest.mark.parametrize("algo", [TRPO, MaskableTRPO, RecurrentTRPO], ids=lambda cls: cls.__name__)
def test_unsupported_action_space_names_the_space(action_space: spaces.Space, reason: str, algo: type) -> None:
    if algo is MaskableTRPO and isinstance(action_space, spaces.Box):
        pytest.skip("MaskableTRPO rejects every Box action space (tested in test_maskable.py)")
    policy = "MlpLstmPolicy" if algo is RecurrentTRPO else "MlpPolicy"
    with pytest.raises(ValueError, match="Unsupported action space") as error:
        algo(policy, SpaceEnv(BOX, action_space))
    assert str(action_space) in str(error.value)
    assert reason in str(error.value)
    assert isinstance(error.value, AssertionError)  # what SB3 and sb3-contrib raise: code written for them catches it


@pytest.mark.parametrize(
    ("observation_space", "reason"),
    [
        (spaces.Tuple([BOX, BOX]), "supports Box, Discrete"),
        (spaces.Box(-1.0, 1.0, shape=()), "at least one dimension, got shape ()"),
        (spaces.Dict({"vector": BOX, "scalar": spaces.Box(-1.0, 1.0, shape=())}), "(key 'scalar')"),
        (spaces.MultiDiscrete([[2, 3], [2, 3]]), "one-dimensional, got shape (2, 2)"),
        (spaces.Discrete(3, start=1), "must start at 0 (SB3 one-hot encodes values 0 to n - 1), got start=1"),
        (spaces.Dict({"vector": BOX, "codes": spaces.MultiDiscrete([3, 3], start=[0, -1])}), "(key 'codes')"),
    ],
    ids=["tuple", "0d-box", "dict-with-0d-box", "2d-multidiscrete", "shifted-discrete", "dict-with-shifted-multidiscrete"],
)
@pytest.mark.parametrize("algo", [TRPO, MaskableTRPO, RecurrentTRPO], ids=lambda cls: cls.__name__)
def test_unsupported_observation_space_names_the_space(observation_space: spaces.Space, reason: str, algo: type) -> None:
    policy = "MultiInputPolicy" if isinstance(observation_space, spaces.Dict) else "MlpPolicy"
    if algo is RecurrentTRPO:
        policy = policy.replace("Policy", "LstmPolicy")
    with pytest.raises(ValueError, match="Unsupported observation space") as error:
        algo(policy, SpaceEnv(observation_space, spaces.Discrete(2)))
    assert str(observation_space) in str(error.value)
    assert reason in str(error.value)
    assert isinstance(error.value, NotImplementedError)  # what SB3's preprocessing raises


def weights(model: BaseAlgorithm) -> dict[str, th.Tensor]:
    return {name: tensor.clone() for name, tensor in model.policy.state_dict().items()}


def unchanged(before: dict[str, th.Tensor], model: BaseAlgorithm) -> bool:
    after = model.policy.state_dict()
    return all(th.equal(tensor, after[name]) for name, tensor in before.items())


# The constructor's bad values, less those that load() itself uses to build the model (the learning-rate schedule,
# the rollout buffer's size)
LATE_BAD_HYPERPARAMETERS = [case for case in BAD_HYPERPARAMETERS if case[0] not in ("learning_rate", "n_steps")]


@pytest.mark.parametrize("name,value,valid_range", LATE_BAD_HYPERPARAMETERS)
@pytest.mark.parametrize("how", ["assignment", "custom_objects"])
def test_invalid_hyperparameter_set_after_construction_fails_before_anything_is_collected(
    name: str, value: float, valid_range: str, how: str, tmp_path: Path
) -> None:
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, seed=0)
    if how == "assignment":
        setattr(model, name, value)
    else:
        model.save(tmp_path / "model")
        if name == "use_sde":  # it decides which policy load builds: refused there, before the policy is built
            with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}: it must be {valid_range}")):
                TRPO.load(tmp_path / "model", env=model.get_env(), custom_objects={name: value})
            return
        model = TRPO.load(tmp_path / "model", env=model.get_env(), custom_objects={name: value})
    before = weights(model)
    with pytest.raises(ValueError) as error:
        model.learn(64)
    message = str(error.value)
    assert f"{name}={value!r}" in message and valid_range in message
    assert model.num_timesteps == 0
    assert unchanged(before, model)


class SetBatchSizeToZero(BaseCallback):
    """Sets an invalid ``batch_size`` at the end of the first rollout, just before the update."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.model.batch_size = 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("algo", [TRPO, RecurrentTRPO])
def test_invalid_hyperparameter_set_by_a_callback_fails_before_the_update_moves_a_weight(algo: type[TRPO]) -> None:
    # The critic's minibatches would fail only after the policy step: the update must not be half applied
    policy = "MlpLstmPolicy" if algo is RecurrentTRPO else "MlpPolicy"
    model = algo(policy, "CartPole-v1", n_steps=32, batch_size=16, seed=0)
    before = weights(model)
    with pytest.raises(ValueError, match=re.escape("batch_size=0")):
        model.learn(64, callback=SetBatchSizeToZero())
    assert unchanged(before, model)


def ppo_files() -> list[tuple[type[BaseAlgorithm], type[TRPO], str, Any]]:
    return [
        (MaskablePPO, MaskableTRPO, "MlpPolicy", lambda: InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10)),
        (RecurrentPPO, RecurrentTRPO, "MlpLstmPolicy", lambda: make_vec_env("CartPole-v1", n_envs=2, seed=0)),
    ]


@pytest.mark.parametrize("ppo,trpo,policy,make_env", ppo_files())
def test_ppo_file_trains_once_given_a_target_kl(
    ppo: type[BaseAlgorithm], trpo: type[TRPO], policy: str, make_env: Any, tmp_path: Path
) -> None:
    # MaskablePPO and RecurrentPPO save target_kl=None (no early stopping), which is no trust region
    env = make_env()
    ppo(policy, env, n_steps=32, batch_size=16, seed=0).save(tmp_path / "ppo")
    model = trpo.load(tmp_path / "ppo", env=env)
    model.predict(env.observation_space.sample())  # the policy itself loads and acts
    before = weights(model)
    with pytest.raises(ValueError, match=r"target_kl=None: it must be a finite number > 0\..*custom_objects"):
        model.learn(64)
    assert unchanged(before, model)
    model = trpo.load(tmp_path / "ppo", env=env, custom_objects={"target_kl": 0.01})
    model.learn(64)
    assert not unchanged(before, model)


class NaNObservation(gym.Wrapper):
    """CartPole whose observations turn NaN after ``after`` steps."""

    def __init__(self, env: gym.Env, after: int) -> None:
        super().__init__(env)
        self.after, self.steps = after, 0

    def step(self, action: Any) -> tuple:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return obs * np.nan if self.steps >= self.after else obs, reward, terminated, truncated, info


def test_nan_observation_under_discrete_actions_names_the_environment_index() -> None:
    # Box actions go on with NaN actions and the update is skipped; a categorical draw from NaN probabilities cannot
    env = make_vec_env("CartPole-v1", n_envs=3, seed=0, wrapper_class=NaNObservation, wrapper_kwargs={"after": 10**9})
    env.envs[1].after = 5  # type: ignore[attr-defined]
    model = TRPO("MlpPolicy", env, n_steps=32, batch_size=16, seed=0)
    before = weights(model)
    with pytest.raises(ValueError, match=r"NaN for environment index 1: its observation holds NaN"):
        model.learn(64)
    assert unchanged(before, model)


class NaNAfter(gym.Env):
    """Box observations that turn NaN after ``after`` steps, under the given action space."""

    def __init__(self, action_space: spaces.Space, after: int = 10**9) -> None:
        self.observation_space, self.action_space = spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32), action_space
        self.after, self.steps = after, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        return np.zeros(3, dtype=np.float32), {}

    def step(self, action: object) -> tuple:
        self.steps += 1
        obs = np.full(3, np.nan if self.steps >= self.after else 0.5, dtype=np.float32)
        return obs, 1.0, False, self.steps % 7 == 0, {}


def generic_rollout_step(model: TRPO) -> TRPO:
    """Send the model's rollouts through SB3's own ``collect_rollouts``: a (no-op) forward hook on the policy."""
    model.policy.register_forward_hook(lambda module, args, output: None)
    assert model._lean_policy_step() is None
    return model


@pytest.mark.parametrize("generic", [False, True], ids=["lean-step", "sb3-step"])
@pytest.mark.parametrize(
    "action_space", [spaces.MultiDiscrete([2, 3]), spaces.MultiBinary(3)], ids=["multidiscrete", "multibinary"]
)
def test_nan_observation_under_multi_actions_names_the_environment_index(action_space: spaces.Space, generic: bool) -> None:
    env = make_vec_env(lambda: NaNAfter(action_space), n_envs=3, seed=0)
    env.envs[1].unwrapped.after = 5  # type: ignore[attr-defined]
    model = TRPO("MlpPolicy", env, n_steps=32, batch_size=16, seed=0, policy_kwargs={"net_arch": [8]})
    if generic:  # SB3's step, where torch.distributions' argument check fails first
        generic_rollout_step(model)
    before = weights(model)
    with pytest.raises(ValueError, match=r"NaN for environment index 1: its observation holds NaN") as error:
        model.learn(64)
    if generic:
        assert str(error.value.__cause__).startswith("Expected parameter")  # torch's own message kept as the cause
    assert unchanged(before, model)


class NaNWeightAtRolloutStart(BaseCallback):
    """Writes a NaN into the action head when the rollout starts (after learn's own check of the weights)."""

    def _on_rollout_start(self) -> None:
        with th.no_grad():
            self.model.policy.action_net.weight[0, 0] = float("nan")  # type: ignore[union-attr]

    def _on_step(self) -> bool:
        return True


def test_nan_weights_under_sb3_rollout_step_are_named() -> None:
    model = generic_rollout_step(TRPO("MlpPolicy", NaNAfter(spaces.MultiBinary(3)), n_steps=16, batch_size=16, seed=0))
    with pytest.raises(ValueError, match=r"action distribution is NaN: the policy's weights hold NaN or inf"):
        model.learn(16, callback=NaNWeightAtRolloutStart())


@pytest.mark.parametrize(
    "algo,policy,env", [(TRPO, "MlpPolicy", "Pendulum-v1"), (RecurrentTRPO, "MlpLstmPolicy", "Pendulum-v1")]
)
@pytest.mark.parametrize("how", ["policy_kwargs", "set_parameters"])
def test_nan_weights_from_outside_are_named_before_anything_is_collected(
    algo: type[TRPO], policy: str, env: str, how: str
) -> None:
    # Gaussian actions: the lean step has no distribution check, NaN actions would reach the environments and every
    # update would be skipped (sb3-contrib stops at torch's check of Normal(scale=nan))
    kwargs = {"log_std_init": float("nan")} if how == "policy_kwargs" else {}
    model = algo(policy, env, n_steps=16, batch_size=16, seed=0, policy_kwargs={"net_arch": [8], **kwargs})
    if how == "set_parameters":
        params = model.get_parameters()
        params["policy"]["log_std"] = th.full_like(params["policy"]["log_std"], float("nan"))
        model.set_parameters(params)
    with pytest.raises(ValueError, match=r"The policy's weights hold NaN or inf \(log_std\)"):
        model.learn(16)
    assert model.num_timesteps == 0


def test_only_the_distribution_check_is_translated() -> None:
    from sb3_trpo_ext.common.lean_policy import explain_undefined_distribution

    model = TRPO("MlpPolicy", NaNAfter(spaces.MultiBinary(3)), n_steps=16, batch_size=16, seed=0)
    nan_rows = np.full((2, 3), np.nan, dtype=np.float32)
    # any other ValueError is left to the caller to re-raise, even where the observations hold NaN
    explain_undefined_distribution(ValueError("Expected parameter from a callback"), nan_rows, model.policy)
    torch_check = ValueError("Expected parameter logits (Tensor of shape (2, 3)) of distribution Bernoulli(...)")
    with pytest.raises(ValueError, match=r"NaN for environment index \[0, 1\]: its observation holds NaN"):
        explain_undefined_distribution(torch_check, nan_rows, model.policy)
    explain_undefined_distribution(torch_check, np.zeros((2, 3), dtype=np.float32), model.policy)  # finite: unexplained


def test_zero_dimensional_box_observations_are_left_to_a_features_extractor_that_takes_them() -> None:
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class Scalars(BaseFeaturesExtractor):
        def __init__(self, observation_space: spaces.Space) -> None:
            super().__init__(observation_space, features_dim=1)

        def forward(self, observations: th.Tensor) -> th.Tensor:
            return observations.reshape(-1, 1)

    env = SpaceEnv(spaces.Box(-1.0, 1.0, shape=()), spaces.Discrete(2))
    model = TRPO("MlpPolicy", env, n_steps=16, batch_size=16, policy_kwargs={"features_extractor_class": Scalars})
    model.learn(32)
    assert model.num_timesteps == 32


def test_the_late_check_covers_every_hyperparameter_the_constructor_checks() -> None:
    from sb3_trpo_ext.trpo.trpo import _VALIDATED

    assert set(_VALIDATED) == set(inspect.signature(TRPO._validate_hyperparameters).parameters)


@pytest.mark.parametrize(
    "algo,policy,make_env",
    [
        (TRPO, "MlpPolicy", lambda: "CartPole-v1"),
        (MaskableTRPO, "MlpPolicy", lambda: InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10)),
        (RecurrentTRPO, "MlpLstmPolicy", lambda: "CartPole-v1"),
    ],
)
def test_learning_rate_schedule_invalid_at_start_is_rejected_at_construction(
    algo: type[TRPO], policy: str, make_env: Any
) -> None:
    with pytest.raises(ValueError, match=r"learning_rate=.*it returned inf at progress_remaining=1\.0"):
        algo(policy, make_env(), learning_rate=lambda _: float("inf"))


@pytest.mark.parametrize(
    ("schedule", "returned"),
    [(lambda p: 1e-3 if p > 0.6 else float("nan"), "nan"), (lambda p: 1e-3 * (p - 0.5), "-")],
    ids=["nan-later", "negative-later"],
)
def test_learning_rate_schedule_invalid_later_fails_before_the_update_moves_a_weight(schedule: Any, returned: str) -> None:
    # updates at progress_remaining 0.75, 0.5, 0.25, 0.0: valid at first, then not
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0, learning_rate=schedule)
    weights: list[th.Tensor] = []

    class Snapshot(BaseCallback):
        def _on_rollout_end(self) -> None:  # the last thing before train()
            weights[:] = [p.detach().clone() for p in self.model.policy.parameters()]

        def _on_step(self) -> bool:
            return True

    with pytest.raises(ValueError, match=rf"learning_rate=.*it returned {re.escape(returned)}.* at progress_remaining="):
        model.learn(256, callback=Snapshot())
    assert model._n_updates >= 1  # the schedule's valid values were applied first
    assert weights and all(th.equal(a, b) for a, b in zip(weights, model.policy.parameters()))
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


def test_a_linear_schedule_past_the_end_of_a_run_gives_a_zero_rate(tmp_path: Path) -> None:
    # SB3's last update of a run whose total is not a multiple of n_steps * n_envs has a negative progress_remaining,
    # where RL Zoo's lin_1e-3 (progress * 1e-3) is negative: the rate is the schedule's end, 0, not an error
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0, learning_rate=lambda p: 1e-3 * p)
    model.learn(100)  # two rollouts of 64 steps: the second ends at progress 1 - 128 / 100 < 0
    assert model._current_progress_remaining < 0
    assert model.logger.name_to_value["train/learning_rate"] == 0.0
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0
    model.save(tmp_path / "model.zip")
    loaded = TRPO.load(tmp_path / "model.zip", env=model.get_env())
    loaded.learn(64)  # a saved negative progress does not stop the next run
    assert loaded.num_timesteps == 64 and loaded._n_updates == model._n_updates + 1


@pytest.mark.parametrize(
    "observation_space",
    [spaces.MultiDiscrete([3, 3]), spaces.Dict({"vector": BOX, "codes": spaces.MultiDiscrete([3, 3])})],
    ids=["multidiscrete", "dict-with-multidiscrete"],
)
def test_recurrent_trpo_names_multidiscrete_observations_its_lstm_cannot_take(observation_space: spaces.Space) -> None:
    # sb3-contrib's LSTM policies size the LSTM with a NumPy integer there; RecurrentPPO raises torch's TypeError
    policy = "MultiInputLstmPolicy" if isinstance(observation_space, spaces.Dict) else "MlpLstmPolicy"
    with pytest.raises(TypeError, match="input_size should be of type int"):
        RecurrentPPO(policy, SpaceEnv(observation_space, spaces.Discrete(2)))
    with pytest.raises(ValueError, match="LSTM policies cannot take MultiDiscrete observations") as error:
        RecurrentTRPO(policy, SpaceEnv(observation_space, spaces.Discrete(2)))
    assert str(observation_space) in str(error.value)


@pytest.mark.parametrize(
    "action_space",
    [spaces.Discrete(2, start=2), spaces.MultiDiscrete([2, 2], start=[1, 0])],
    ids=["discrete", "multidiscrete"],
)
def test_shifted_discrete_actions_are_warned_about_once_and_still_train(action_space: spaces.Space) -> None:
    # SB3 (and sb3-contrib) draw actions from 0 and send them unshifted; SB3's check_env warns, so does TRPO
    with pytest.warns(UserWarning, match="with a non-zero start") as record:
        model = TRPO("MlpPolicy", SpaceEnv(BOX, action_space), n_steps=16, batch_size=16)
    assert sum("non-zero start" in str(w.message) for w in record) == 1
    assert str(action_space) in str(next(w.message for w in record if "non-zero start" in str(w.message)))
    model.learn(32)


def other_network_parameters(algo: type[TRPO], policy: str, env: str) -> tuple[TRPO, dict[str, Any]]:
    """A model, and the parameters of the same class with other hidden layers (after an update: Adam has state)."""
    model = algo(policy, env, n_steps=16, batch_size=16, seed=0, policy_kwargs={"net_arch": [16]})
    other = algo(policy, env, n_steps=16, batch_size=16, seed=1, policy_kwargs={"net_arch": [8, 8]})
    model.learn(16)
    other.learn(16)
    return model, other.get_parameters()


def optimizer_state(model: TRPO) -> list[th.Tensor]:
    return [t.clone() for state in model.policy.optimizer.state.values() for t in state.values()]


@pytest.mark.parametrize(
    "algo,policy,env", [(TRPO, "MlpPolicy", "CartPole-v1"), (RecurrentTRPO, "MlpLstmPolicy", "CartPole-v1")]
)
@pytest.mark.parametrize("given", ["everything", "policy only"])
def test_set_parameters_that_do_not_fit_leave_the_model_as_it_was(
    algo: type[TRPO], policy: str, env: str, given: str, tmp_path: Path
) -> None:
    # SB3's set_parameters copies every tensor whose name matches before it finds the mismatch
    model, params = other_network_parameters(algo, policy, env)
    own = model.get_parameters()
    if given == "policy only":  # the right network, but the optimizer missing: the names do not match
        params = {"policy": {name: tensor.clone() for name, tensor in own["policy"].items()}}
        with th.no_grad():
            for param in model.policy.parameters():
                param.add_(1.0)  # so that loading own["policy"] would show
    before, adam_before = weights(model), optimizer_state(model)
    with pytest.raises((RuntimeError, ValueError)):
        model.set_parameters(params)
    assert unchanged(before, model)
    assert all(th.equal(a, b) for a, b in zip(adam_before, optimizer_state(model), strict=True))
    model.learn(32, reset_num_timesteps=False)  # still trains, and saves
    model.save(tmp_path / "model")


def test_optimizer_state_of_another_network_is_refused_before_training() -> None:
    # The same number of tensors passes set_parameters; PyTorch's fused Adam kernel would then read and write past the
    # ends of the smaller moments (a crash of the process): run in a child process so that a regression fails here
    import subprocess
    import sys

    code = (
        "import torch as th\n"
        "from sb3_trpo_ext import TRPO\n"
        "def make(net, seed):\n"
        "    return TRPO('MlpPolicy', 'CartPole-v1', n_steps=16, batch_size=16, seed=seed, policy_kwargs={'net_arch': net})\n"
        "model, other = make([64], 0), make([8], 1)\n"
        "model.learn(16); other.learn(16)\n"
        "params = model.get_parameters()\n"
        "params['policy.optimizer'] = other.get_parameters()['policy.optimizer']\n"
        "model.set_parameters(params)\n"
        "before = [p.clone() for p in model.policy.parameters()]\n"
        "try:\n"
        "    model.learn(64, reset_num_timesteps=False)\n"
        "except ValueError as error:\n"
        "    print('REFUSED', error)\n"
        "print('UNCHANGED', all(th.equal(a, b) for a, b in zip(before, model.policy.parameters())))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "REFUSED The optimizer's state does not fit its parameters" in result.stdout
    assert "of shape (8, 4)" in result.stdout and "of shape (64, 4)" in result.stdout
    assert "UNCHANGED True" in result.stdout


def test_string_masks_are_refused_not_read_as_all_valid() -> None:
    from sb3_trpo_ext.maskable.masks import check_action_masks

    with pytest.raises(ValueError, match=r"booleans or numbers.*dtype <U1"):
        check_action_masks(np.array(["0", "0", "1"]), spaces.Discrete(3), n_envs=1)
    with pytest.raises(ValueError, match=r"booleans or numbers.*dtype object"):
        check_action_masks(np.array([True, None, 1], dtype=object), spaces.Discrete(3), n_envs=1)
    mixed = check_action_masks(np.array([True, 0, 1], dtype=object), spaces.Discrete(3), n_envs=1)  # as astype(bool)
    assert mixed.tolist() == [[True, False, True]]
    model = MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=3, n_invalid_actions=1), n_steps=16, batch_size=16)
    with pytest.raises(ValueError, match=r"booleans or numbers"):
        model.predict(model.observation_space.sample(), action_masks=["False", "False", "True"])


def test_n_steps_changed_on_a_built_model_is_named_before_anything_is_collected(tmp_path: Path) -> None:
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, seed=0)
    model.n_steps = 64
    with pytest.raises(ValueError, match=r"n_steps=64: the model's rollout buffer was built for n_steps=32"):
        model.learn(64)
    assert model.num_timesteps == 0
    model.save(tmp_path / "model")  # the way out the message gives
    loaded = TRPO.load(tmp_path / "model", env=model.get_env(), custom_objects={"n_steps": 64})
    loaded.learn(128)
    assert loaded.rollout_buffer.buffer_size == 64


@pytest.mark.parametrize("log_interval", [0, "1", 1.5])
def test_log_interval_is_checked_before_anything_is_collected(log_interval: Any) -> None:
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, seed=0)
    with pytest.raises(ValueError, match=rf"log_interval must be a non-zero integer.*got {re.escape(repr(log_interval))}"):
        model.learn(64, log_interval=log_interval)
    assert model.num_timesteps == 0
    model.learn(64, log_interval=-1)  # SB3 logs every rollout then (iteration % -1 == 0), and so do we


def test_learn_without_an_environment_says_how_to_give_one(tmp_path: Path) -> None:
    TRPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16).save(tmp_path / "model")
    model = TRPO.load(tmp_path / "model")
    with pytest.raises(ValueError, match=r"no environment to learn from.*set_env"):
        model.learn(64)


@pytest.mark.parametrize(
    "source,policy,env",
    [
        (RecurrentPPO, "MlpLstmPolicy", "CartPole-v1"),
        (RecurrentTRPO, "MlpLstmPolicy", "CartPole-v1"),
        (MaskablePPO, "MlpPolicy", InvalidActionEnvDiscrete(dim=5, n_invalid_actions=1)),
    ],
)
def test_trpo_names_the_class_that_runs_another_familys_policy(
    source: type[BaseAlgorithm], policy: str, env: Any, tmp_path: Path
) -> None:
    model = source(policy, env, n_steps=16, batch_size=16)
    model.save(tmp_path / "model")
    family = "RecurrentTRPO" if "Lstm" in policy else "MaskableTRPO"
    message = rf"TRPO cannot train the policy class .*use sb3_trpo_ext\.{family}"
    if family == "RecurrentTRPO":
        # an LSTM policy builds under TRPO, so a file still loads and predicts (with its states); learn is refused
        loaded = TRPO.load(tmp_path / "model", env=model.get_env())
        obs = model.get_env().reset()
        _, state = loaded.predict(obs, episode_start=np.ones(len(obs), dtype=bool))
        loaded.predict(obs, state=state, episode_start=np.zeros(len(obs), dtype=bool))
        with pytest.raises(ValueError, match=message):
            loaded.learn(32)
        assert loaded.num_timesteps == 0
    else:  # a maskable policy does not even build under TRPO
        with pytest.raises(ValueError, match=message):
            TRPO.load(tmp_path / "model", env=model.get_env())
        with pytest.raises(ValueError, match=message):
            TRPO(type(model.policy), env, n_steps=16, batch_size=16)
        with pytest.raises(ValueError, match=r"RecurrentTRPO cannot train the policy class .*use sb3_trpo_ext\.MaskableTRPO"):
            RecurrentTRPO(type(model.policy), env, n_steps=16, batch_size=16)


def test_recurrent_predict_checks_state_and_episode_start_against_the_observations() -> None:
    model = RecurrentTRPO("MlpLstmPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs={"lstm_hidden_size": 8})
    two = np.zeros((2, 4), dtype=np.float32)
    _, state = model.predict(two, episode_start=np.ones(2, dtype=bool))
    assert state[0].shape == (1, 2, 8)
    model.predict(two, state=state, episode_start=np.zeros(2, dtype=bool))  # the normal use
    one_env_state = (state[0][:, :1], state[1][:, :1])
    bad = {
        "another batch size": (one_env_state, None),  # RecurrentPPO reads the two observations as one sequence
        "another hidden size": ((np.zeros((1, 2, 9)), np.zeros((1, 2, 9))), None),
        "a single array": ((state[0],), None),
        "three arrays": ((*state, state[0]), None),
        "not a pair": (state[0], None),
    }
    for bad_state, starts in bad.values():
        with pytest.raises(ValueError, match=r"state must be the \(hidden, cell\) pair.*\(1, 2, 8\)"):
            model.predict(two, state=bad_state, episode_start=starts)
    for flags in (np.zeros(3, dtype=bool), np.zeros(0, dtype=bool)):
        with pytest.raises(
            ValueError,
            match=rf"episode_start must hold one flag per observation \(2\), got an array of shape \({len(flags)},\)",
        ):
            model.predict(two, state=state, episode_start=flags)
    # one observation, unbatched, with or without a batch axis on its flag
    model.predict(np.zeros(4, dtype=np.float32), state=None, episode_start=np.ones(1, dtype=bool))


def test_an_optimizer_whose_state_is_not_shaped_like_the_parameters_still_trains() -> None:
    # only Adam's moments are checked against the parameters' shapes (Adafactor keeps factored row / column statistics)
    model = TRPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=16,
        batch_size=16,
        seed=0,
        policy_kwargs={"net_arch": [8], "optimizer_class": th.optim.Adafactor},
    )
    model.learn(32)
    assert any(
        isinstance(value, th.Tensor) and value.dim() > 0 and value.shape != param.shape
        for param, state in model.policy.optimizer.state.items()
        for value in state.values()
    )
    model.learn(32, reset_num_timesteps=False)
    assert model.num_timesteps == 64


@pytest.mark.parametrize(
    "algo,policy,env",
    [
        (TRPO, "MlpPolicy", "CartPole-v1"),
        (TRPO, "MlpPolicy", "Pendulum-v1"),
        (RecurrentTRPO, "MlpLstmPolicy", "CartPole-v1"),
        (MaskableTRPO, "MlpPolicy", "masked"),
    ],
)
def test_predict_on_a_nan_observation_names_its_index(algo: type[TRPO], policy: str, env: str) -> None:
    from sb3_contrib.common.wrappers import ActionMasker

    environment: Any = env
    if env == "masked":  # Box observations (NaN-able), every action valid
        environment = ActionMasker(gym.make("CartPole-v1"), lambda _: np.ones(2, dtype=bool))
    model = algo(policy, environment, n_steps=16, batch_size=16, seed=0)
    size = model.observation_space.shape[0]  # type: ignore[index]
    batch = np.zeros((3, size), dtype=np.float32)
    batch[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN for observation index 2: it holds NaN or inf") as error:
        model.predict(batch)
    assert str(error.value.__cause__).startswith("Expected parameter")  # torch's own message kept as the cause
    with pytest.raises(ValueError, match=r"NaN for observation index 0: it holds NaN or inf"):
        model.predict(batch[2])  # one observation, without a batch axis
    model.predict(batch[:2])  # the finite ones still predict
