"""The lean ``VecEnv.step`` of the rollouts does what SB3's ``DummyVecEnv`` / ``VecNormalize`` ``step`` does: the same
results bit for bit, as independent copies, and the same state left in the wrappers."""

from copy import deepcopy
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import SimpleMultiObsEnv
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecFrameStack, VecNormalize

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.lean_vec_env import batch_moments, copy_infos, make_lean_env_step, update_running_stats


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal values of the same types, arrays compared bit for bit (NaN and the sign of zeros included) with their
    dtypes."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where  # same keys in the same order
        for key in a:
            if not (key == "t" and where.endswith("['episode']")):  # Monitor's wall-clock time of the episode
                assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
        if not a.dtype.hasobject:  # -0.0 == 0.0: the bits tell them apart
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where
    else:
        assert a == b, where


def make_env(env_id: str, normalize: dict[str, Any] | None) -> VecEnv:
    # A short time limit on top of the environment's own ends: truncations and terminations both happen
    env = make_vec_env(
        env_id, n_envs=3, seed=5, wrapper_class=gym.wrappers.TimeLimit, wrapper_kwargs={"max_episode_steps": 25}
    )
    return env if normalize is None else VecNormalize(env, **normalize)


def wrapper_state(env: VecEnv) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if isinstance(env, VecNormalize):
        for name in ("obs_rms", "ret_rms"):
            rms = getattr(env, name, None)  # no obs_rms with norm_obs=False
            state[name] = None if rms is None else (rms.mean, rms.var, rms.count)
        state.update(returns=env.returns, old_obs=env.old_obs, old_reward=env.old_reward)
        env = env.venv
    assert isinstance(env, DummyVecEnv)
    state.update(
        actions=env.actions, buf_obs=env.buf_obs, buf_rews=env.buf_rews, buf_dones=env.buf_dones, reset_infos=env.reset_infos
    )
    return state


@pytest.mark.parametrize(
    "env_id,normalize",
    [
        ("CartPole-v1", None),
        ("Pendulum-v1", None),
        ("CartPole-v1", {}),
        ("Pendulum-v1", {"gamma": 0.9, "clip_obs": 0.5, "clip_reward": 0.1}),  # clipping active
        ("Hopper-v5", {}),  # float64 observations, terminations
        ("Pendulum-v1", {"norm_obs": False}),
        ("Pendulum-v1", {"norm_reward": False}),
        ("CartPole-v1", {"training": False}),
    ],
)
def test_lean_env_step_gives_sb3_results_and_leaves_the_same_state(env_id: str, normalize: dict[str, Any] | None) -> None:
    sb3_env, lean_env = make_env(env_id, normalize), make_env(env_id, normalize)
    lean_step = make_lean_env_step(lean_env)
    assert lean_step is not None
    assert_same(sb3_env.reset(), lean_env.reset())
    rng = np.random.default_rng(0)
    space = sb3_env.action_space
    dones_seen = truncations_seen = 0
    for step in range(120):
        if isinstance(space, gym.spaces.Discrete):
            actions = rng.integers(space.n, size=3)
        else:
            actions = rng.uniform(space.low, space.high, size=(3, *space.shape)).astype(np.float32)
        expected, got = sb3_env.step(actions), lean_step(actions)
        assert_same(expected, got, f"step {step}")
        assert_same(wrapper_state(sb3_env), wrapper_state(lean_env), f"state after step {step}")
        dones_seen += int(got[2].sum())
        truncations_seen += sum(info["TimeLimit.truncated"] for info in got[3])
        # The results are copies: changing them changes nothing in the environment (as with SB3's deep copies)
        got[0][...] = 1e6
        got[3][0]["x"] = 1
    assert dones_seen > 5 and truncations_seen > 0


class BoxEnv(gym.Env):
    """Random observations of a given space, random rewards, terminations and truncations."""

    def __init__(self, space: gym.spaces.Space, seed: int) -> None:
        self.observation_space, self.action_space = space, gym.spaces.Discrete(2)
        self.observation_space.seed(seed)
        self.rng, self.t = np.random.default_rng(seed), 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.t += 1
        terminated, truncated = bool(self.rng.random() < 0.1), self.t >= 7
        return self.observation_space.sample(), float(self.rng.standard_normal()), terminated, truncated, {}


@pytest.mark.parametrize(
    "dtype,normalize",
    [
        (np.float16, {}),  # np.mean sums float16 in float32
        (np.float32, {"clip_obs": 0.0, "clip_reward": 0.0}),  # np.clip keeps -0.0 at a bound of 0
        (np.uint8, {"norm_reward": False}),
        (np.float64, {"training": False}),
    ],
)
def test_lean_env_step_on_other_observation_dtypes(dtype: type, normalize: dict[str, Any]) -> None:
    def build() -> VecEnv:
        space = gym.spaces.Box(-100, 100, (3,), dtype) if dtype != np.uint8 else gym.spaces.Box(0, 255, (3,), dtype)
        return VecNormalize(DummyVecEnv([lambda i=i: BoxEnv(space, i) for i in range(3)]), **normalize)

    sb3_env, lean_env = build(), build()
    lean_step = make_lean_env_step(lean_env)
    assert lean_step is not None
    assert_same(sb3_env.reset(), lean_env.reset())
    for step in range(30):
        actions = np.arange(3) % 2
        assert_same(sb3_env.step(actions), lean_step(actions), f"step {step}")
        assert_same(wrapper_state(sb3_env), wrapper_state(lean_env), f"state after step {step}")


def test_running_stats_of_float16_batches_are_numpys() -> None:
    arr = (np.random.default_rng(0).standard_normal((3, 5)) * 100 + 1000).astype(np.float16)
    expected, got = RunningMeanStd(shape=(5,)), RunningMeanStd(shape=(5,))
    expected.update(arr)
    update_running_stats(got, arr)
    assert_same((expected.mean, expected.var, expected.count), (got.mean, got.var, got.count))


def test_lean_env_step_results_are_independent_copies() -> None:
    env = make_env("Pendulum-v1", {})
    step = make_lean_env_step(env)
    assert step is not None
    env.reset()
    actions = np.zeros((3, 1), dtype=np.float32)
    for _ in range(25):  # up to the time limit: terminal observations in the infos
        obs, rewards, dones, infos = step(actions)
    assert dones.all()
    venv = env.venv  # type: ignore[attr-defined]
    pairs = [(obs, env.old_obs), (env.old_obs, venv.buf_obs[None]), (rewards, venv.buf_rews), (dones, venv.buf_dones)]
    for ours, theirs in pairs:
        assert not np.shares_memory(ours, theirs)
    for info, buffered in zip(infos, venv.buf_infos):
        assert info is not buffered
        assert not np.shares_memory(info["terminal_observation"], buffered["terminal_observation"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 4), (2, 17), (3, 5), (64, 3), (2,), (7,)])
def test_batch_moments_are_numpys_mean_and_var(dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    arr = (rng.standard_normal(shape) * 1e3 + 1e4).astype(dtype)
    mean, var = batch_moments(arr)
    assert_same(mean, np.mean(arr, axis=0))
    assert_same(var, np.var(arr, axis=0))


class Opaque:
    def __init__(self) -> None:
        self.payload = [1, 2]


def test_copy_infos_equals_deepcopy_and_keeps_shared_arrays_shared() -> None:
    shared = np.arange(3.0)
    infos = [
        {"a": np.float64(1.5), "b": 3, "c": "text", "d": None, "arr": shared, "nested": {"r": 1.0, "l": 2}},
        {"same": shared, "flag": np.bool_(True), "f32": np.float32(2.0)},
    ]
    copied = copy_infos(infos)
    assert_same(copied, deepcopy(infos))
    assert copied[0]["arr"] is copied[1]["same"] and copied[0]["arr"] is not shared
    assert copied[0]["nested"] is not infos[0]["nested"]
    with_object = [{"obj": Opaque(), "arr": shared}]
    copied = copy_infos(with_object)  # anything else: deepcopy itself
    assert copied[0]["obj"] is not with_object[0]["obj"] and copied[0]["obj"].payload == [1, 2]
    assert copied[0]["obj"].payload is not with_object[0]["obj"].payload


class ObjectSpace(gym.spaces.Space):
    """Observations that are arrays of Python objects."""

    def __init__(self) -> None:
        super().__init__(shape=(2,), dtype=object)

    def sample(self, mask: Any = None, probability: Any = None) -> np.ndarray:
        return np.array([[1], {"k": 2}], dtype=object)

    def contains(self, x: Any) -> bool:
        return True


def test_object_observations_are_stepped_with_their_own_step() -> None:
    # DummyVecEnv deep-copies the objects in its buffer; a copy of the array would share them
    assert make_lean_env_step(DummyVecEnv([lambda: BoxEnv(ObjectSpace(), 0)])) is None


@pytest.mark.parametrize("name", ["normalize_obs", "_normalize_obs", "normalize_reward", "_update_reward"])
def test_methods_replaced_on_a_vec_normalize_are_called(name: str) -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2))
    setattr(env, name, getattr(env, name))
    assert make_lean_env_step(env) is None


@pytest.mark.parametrize("name", ["_save_obs", "_obs_from_buf"])
def test_methods_replaced_on_a_dummy_vec_env_are_called(name: str) -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2)
    setattr(env, name, getattr(env, name))
    assert make_lean_env_step(env) is None
    assert make_lean_env_step(VecNormalize(env)) is None


def test_an_update_replaced_on_the_running_stats_is_called() -> None:
    # Frozen observation statistics
    sb3_env, lean_env = make_env("Pendulum-v1", {}), make_env("Pendulum-v1", {})
    for env in (sb3_env, lean_env):
        env.obs_rms.update = lambda arr: None  # type: ignore[attr-defined]
    lean_step = make_lean_env_step(lean_env)
    assert lean_step is not None
    assert_same(sb3_env.reset(), lean_env.reset())
    actions = np.zeros((3, 1), dtype=np.float32)
    for step in range(5):
        assert_same(sb3_env.step(actions), lean_step(actions), f"step {step}")
        assert_same(wrapper_state(sb3_env), wrapper_state(lean_env), f"state after step {step}")


class StepCounter:
    def __init__(self, step: Any) -> None:
        self.calls, self._step = 0, step

    def __call__(self, actions: np.ndarray) -> Any:
        self.calls += 1
        return self._step(actions)


class MyDummyVecEnv(DummyVecEnv):
    pass


def test_other_environments_are_stepped_with_their_own_step() -> None:
    assert make_lean_env_step(VecFrameStack(make_vec_env("CartPole-v1"), 2)) is None
    assert make_lean_env_step(MyDummyVecEnv([lambda: gym.make("CartPole-v1")])) is None
    assert make_lean_env_step(make_vec_env(SimpleMultiObsEnv)) is None  # Dict observations
    assert make_lean_env_step(VecNormalize(make_vec_env(SimpleMultiObsEnv))) is None
    assert make_lean_env_step(VecNormalize(MyDummyVecEnv([lambda: gym.make("CartPole-v1")]))) is None
    # A step replaced on the instance (a timer, a test double) is the one the rollouts call
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2))
    counter = StepCounter(env.step)
    env.step = counter  # type: ignore[method-assign]
    assert make_lean_env_step(env) is None
    TRPO("MlpPolicy", env, n_steps=32, batch_size=32).learn(64)
    assert counter.calls == 32  # 64 steps of 2 environments
