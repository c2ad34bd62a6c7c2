"""Save/load round trips, parameters get/set, same-seed determinism, and cross-loading with sb3-contrib's TRPO."""

import os

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_trpo_ext import TRPO
from tests.helpers import TINY, make_identity_env


def observations_for(model: TRPO, n: int = 20) -> np.ndarray:
    space = model.observation_space
    space.seed(0)
    return np.stack([space.sample() for _ in range(n)])


@pytest.mark.parametrize("kind", ["box", "discrete", "multidiscrete", "multibinary"])
def test_save_load_round_trip_gives_identical_deterministic_actions(kind: str, tmp_path: os.PathLike) -> None:
    model = TRPO("MlpPolicy", make_identity_env(kind), n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0)
    model.learn(128)
    obs = observations_for(model)
    expected, _ = model.predict(obs, deterministic=True)
    path = os.path.join(tmp_path, "model.zip")
    model.save(path)
    loaded = TRPO.load(path, env=make_identity_env(kind))
    actions, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, expected)
    for name, value in model.get_parameters()["policy"].items():
        assert th.equal(value, loaded.get_parameters()["policy"][name])
    # training continues after loading
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded.num_timesteps == 192
    assert loaded.target_kl == model.target_kl and loaded.cg_max_steps == model.cg_max_steps


def test_get_set_parameters_copies_weights() -> None:
    source = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0).learn(64)
    target = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, policy_kwargs=TINY, seed=1)
    target.set_parameters(source.get_parameters())
    obs = observations_for(source)
    np.testing.assert_array_equal(source.predict(obs, deterministic=True)[0], target.predict(obs, deterministic=True)[0])
    target.learn(64)  # the split of actor and critic parameters still refers to live tensors


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_trained_model_trains_and_leaves_the_original_alone(how: str) -> None:
    import copy
    import pickle

    from sb3_trpo_ext.common.mlp_fisher import MlpFisher

    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), n_steps=64, batch_size=64, seed=0)
    model.learn(128)
    assert isinstance(model._mlp_fisher, MlpFisher)  # caches built for the original's parameter objects
    original = {name: tensor.clone() for name, tensor in model.policy.state_dict().items()}
    duplicate = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    duplicate.learn(384, reset_num_timesteps=False)
    assert duplicate.logger.name_to_value["train/line_search_success"] == 1.0
    assert all(th.equal(tensor, model.policy.state_dict()[name]) for name, tensor in original.items())
    assert not all(th.equal(tensor, duplicate.policy.state_dict()[name]) for name, tensor in original.items())
    model.learn(128, reset_num_timesteps=False)  # and the original still trains with its own caches


def test_same_seed_gives_same_parameters_after_several_updates() -> None:
    def run() -> dict[str, th.Tensor]:
        env = make_vec_env("Pendulum-v1", n_envs=2, seed=3)
        model = TRPO("MlpPolicy", env, n_steps=64, batch_size=32, policy_kwargs=TINY, seed=3, use_sde=True)
        model.learn(512)
        return model.policy.state_dict()

    first, second = run(), run()
    for name in first:
        assert th.equal(first[name], second[name]), name


def test_different_seeds_give_different_parameters() -> None:
    states = []
    for seed in (0, 1):
        model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, policy_kwargs=TINY, seed=seed)
        states.append(model.learn(128).policy.state_dict())
    assert any(not th.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("kind", ["box", "discrete"])
def test_model_saved_by_sb3_contrib_loads_and_predicts_the_same(kind: str, tmp_path: os.PathLike) -> None:
    sb3_contrib = pytest.importorskip("sb3_contrib")
    theirs = sb3_contrib.TRPO("MlpPolicy", make_identity_env(kind), n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0)
    theirs.learn(128)
    path = os.path.join(tmp_path, "contrib.zip")
    theirs.save(path)
    ours = TRPO.load(path, env=make_identity_env(kind))
    assert isinstance(ours, TRPO)
    obs = observations_for(ours)
    np.testing.assert_array_equal(ours.predict(obs, deterministic=True)[0], theirs.predict(obs, deterministic=True)[0])
    ours.learn(64, reset_num_timesteps=False)  # and trains on


@pytest.mark.parametrize("kind", ["box", "discrete"])
def test_model_saved_here_loads_in_sb3_contrib_and_predicts_the_same(kind: str, tmp_path: os.PathLike) -> None:
    sb3_contrib = pytest.importorskip("sb3_contrib")
    ours = TRPO("MlpPolicy", make_identity_env(kind), n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0).learn(128)
    path = os.path.join(tmp_path, "ours.zip")
    ours.save(path)
    theirs = sb3_contrib.TRPO.load(path, env=make_identity_env(kind))
    obs = observations_for(ours)
    np.testing.assert_array_equal(theirs.predict(obs, deterministic=True)[0], ours.predict(obs, deterministic=True)[0])
    theirs.learn(64, reset_num_timesteps=False)


def test_constructor_matches_sb3_contrib_parameters_and_defaults() -> None:
    import inspect

    sb3_contrib = pytest.importorskip("sb3_contrib")
    theirs = inspect.signature(sb3_contrib.TRPO.__init__).parameters
    ours = inspect.signature(TRPO.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
    # Positional order is the same too, so positional calls behave identically
    assert list(ours)[: len(theirs)] == list(theirs)
