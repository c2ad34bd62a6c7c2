"""
A cheaper ``VecEnv.step`` for rollouts.

On small MuJoCo tasks SB3's own vectorised-environment code costs about as much as the simulation: ``DummyVecEnv``
deep-copies its info dicts and observations at every step, and ``VecNormalize`` deep-copies the observations again
and updates its running statistics through ``np.mean`` / ``np.var``, whose Python wrappers cost more than their
arithmetic on a batch of two rows. :func:`make_lean_env_step` builds, for SB3's own ``DummyVecEnv`` and for a
``VecNormalize`` directly on top of one, a function that does what ``env.step(actions)`` does, with the same
arithmetic in the same order: the same observations, rewards, dones and infos (bit for bit, as fresh copies), and the
same state left in the wrappers (buffers, running statistics, discounted returns, ``old_obs``, ``old_reward``).
Anything else (other ``VecEnv`` classes or wrappers, subclasses, Dict, Tuple or object observations, a ``step`` or
one of the methods it calls replaced on the instance) gets ``None`` and is stepped with ``env.step``.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import Any

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

EnvStep = Callable[[np.ndarray], VecEnvStepReturn]

#: Immutable values that ``deepcopy`` returns as they are (or as an equal immutable copy).
_ATOMIC = frozenset({bool, int, float, complex, str, bytes, type(None), np.bool_, np.int64, np.int32, np.float64, np.float32})


class _NotPlain(Exception):
    """An info value that :func:`copy_infos` leaves to ``deepcopy``."""


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if id(value) in memo:  # a container met before: shared in the copy too, as deepcopy keeps it
        return memo[id(value)]
    if kind is np.ndarray and not value.dtype.hasobject:
        copied = value.copy(order="K")  # ndarray.__deepcopy__ of a numeric array
    elif kind is dict:
        copied = {}
        memo[id(value)] = copied
        for key, item in value.items():
            copied[_copy(key, memo)] = _copy(item, memo)
        return copied
    else:
        raise _NotPlain
    memo[id(value)] = copied
    return copied


def copy_infos(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    ``deepcopy(infos)`` for the common case of info dicts holding numbers, strings, numeric arrays and nested dicts
    of those, without ``deepcopy``'s generic dispatch; anything else falls back to ``deepcopy``.

    :param infos: One info dict per environment
    :return: An independent copy, equal to ``deepcopy(infos)``
    """
    memo: dict[int, Any] = {}
    try:
        return [_copy(info, memo) for info in infos]
    except _NotPlain:
        return deepcopy(infos)


def batch_moments(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """
    ``(np.mean(arr, axis=0), np.var(arr, axis=0))`` for a float array, with the ufuncs NumPy's own implementation
    calls, on the same values in the same order (a sum, a division by the count, squared deviations from that mean,
    a sum, a division), without its Python wrappers; ``np.var`` computes the same mean a second time, here it is
    computed once. Bit-identical to NumPy's results (tested).

    :param arr: A float32 or float64 array, one row per sample
    :return: The mean and the (biased) variance over the first axis
    """
    count = np.intp(arr.shape[0])  # NumPy divides by the count as an intp
    total = np.add.reduce(arr, 0)
    if type(total) is np.ndarray:
        mean = np.true_divide(total, count, out=total, casting="unsafe")
    else:  # a 1-D batch: NumPy scalars
        mean = total.dtype.type(total / count)
    deviations = np.subtract(arr, mean)
    np.square(deviations, out=deviations)
    spread = np.add.reduce(deviations, 0)
    if type(spread) is np.ndarray:
        return mean, np.true_divide(spread, count, out=spread, casting="unsafe")
    return mean, spread.dtype.type(spread / count)


def update_running_stats(rms: RunningMeanStd, arr: np.ndarray) -> None:
    """``rms.update(arr)`` with :func:`batch_moments` for the batch's mean and variance."""
    # float32 / float64 only: np.mean sums float16 in float32, batch_moments would sum it in float16.
    # An ``update`` replaced on the object (frozen statistics) is the one to call.
    if type(rms) is not RunningMeanStd or arr.dtype.char not in "fd" or "update" in vars(rms):
        rms.update(arr)
        return
    mean, var = batch_moments(arr)
    rms.update_from_moments(mean, var, arr.shape[0])


#: The methods that SB3's ``step`` calls on each wrapper, and that the lean step does without calling them.
_DUMMY_METHODS = ("step", "step_async", "step_wait", "_save_obs", "_obs_from_buf")
_NORMALIZE_METHODS = (
    "step",
    "step_async",
    "step_wait",
    "normalize_obs",
    "_normalize_obs",
    "normalize_reward",
    "_update_reward",
)


def _replaced_on_instance(env: VecEnv, names: tuple[str, ...]) -> bool:
    """True when one of the methods ``names`` was replaced on the object (a timer, a test double)."""
    return any(name in vars(env) for name in names)


def _dummy_step(venv: DummyVecEnv) -> EnvStep | None:
    """``DummyVecEnv.step`` (``step_async`` then ``step_wait``) with cheaper copies, or ``None``."""
    if type(venv) is not DummyVecEnv or _replaced_on_instance(venv, _DUMMY_METHODS) or venv.keys != [None]:
        return None
    if venv.buf_obs[None].dtype.hasobject:  # type: ignore[index]  # deepcopy copies the objects, not only the array
        return None
    envs, buf_rews, buf_dones, buf_infos, reset_infos = (
        venv.envs,
        venv.buf_rews,
        venv.buf_dones,
        venv.buf_infos,
        venv.reset_infos,
    )
    buf_obs = venv.buf_obs[None]  # type: ignore[index]  # the single array of non-Dict observations

    def step(actions: np.ndarray) -> VecEnvStepReturn:
        venv.actions = actions  # step_async
        for env_idx, env in enumerate(envs):
            obs, buf_rews[env_idx], terminated, truncated, buf_infos[env_idx] = env.step(actions[env_idx])
            buf_dones[env_idx] = terminated or truncated
            buf_infos[env_idx]["TimeLimit.truncated"] = truncated and not terminated
            if buf_dones[env_idx]:
                # the final observation goes to the info dict, then the environment is reset
                buf_infos[env_idx]["terminal_observation"] = obs
                obs, reset_infos[env_idx] = env.reset()
            buf_obs[env_idx] = obs
        # fresh copies, as DummyVecEnv returns them
        return buf_obs.copy(order="K"), buf_rews.copy(), buf_dones.copy(), copy_infos(buf_infos)

    return step


def _normalize_step(vec_normalize: VecNormalize) -> EnvStep | None:
    """``VecNormalize.step`` over :func:`_dummy_step`, or ``None``."""
    if type(vec_normalize) is not VecNormalize or _replaced_on_instance(vec_normalize, _NORMALIZE_METHODS):
        return None
    if isinstance(getattr(vec_normalize, "obs_rms", None), dict):  # Dict observations (absent with norm_obs=False)
        return None
    inner = _dummy_step(vec_normalize.venv)  # type: ignore[arg-type]
    if inner is None:
        return None
    vn = vec_normalize

    def step(actions: np.ndarray) -> VecEnvStepReturn:
        obs, rewards, dones, infos = inner(actions)
        assert isinstance(obs, np.ndarray)
        vn.old_obs = obs
        vn.old_reward = rewards
        if vn.training and vn.norm_obs:
            update_running_stats(vn.obs_rms, obs)  # type: ignore[arg-type]  # not a Dict: checked above
        if vn.norm_obs:
            # clip((obs - mean) / sqrt(var + epsilon)) in float32; ndarray.clip is what np.clip calls (np.minimum of
            # np.maximum is not: with a bound of 0 it turns -0.0 into 0.0)
            rms = vn.obs_rms
            assert isinstance(rms, RunningMeanStd)
            scaled = (obs - rms.mean) / np.sqrt(rms.var + vn.epsilon)
            normalized = scaled.clip(-vn.clip_obs, vn.clip_obs).astype(np.float32)
        else:
            normalized = obs.copy(order="K")
        if vn.training:
            vn.returns = vn.returns * vn.gamma + rewards
            update_running_stats(vn.ret_rms, vn.returns)
        if vn.norm_reward:
            scaled_rewards = rewards / np.sqrt(vn.ret_rms.var + vn.epsilon)
            rewards = scaled_rewards.clip(-vn.clip_reward, vn.clip_reward)
        rewards = rewards.astype(np.float32)
        for idx, done in enumerate(dones):
            if done and "terminal_observation" in infos[idx]:
                infos[idx]["terminal_observation"] = vn.normalize_obs(infos[idx]["terminal_observation"])
        vn.returns[dones] = 0
        return normalized, rewards, dones, infos

    return step


def make_lean_env_step(env: VecEnv) -> EnvStep | None:
    """
    The rollout's ``env.step`` for SB3's ``DummyVecEnv``, alone or under ``VecNormalize``, with array observations.

    :param env: The training environment
    :return: ``actions -> (obs, rewards, dones, infos)`` doing what ``env.step(actions)`` does, or ``None`` where
        ``env.step`` must be used
    """
    if type(env) is DummyVecEnv:
        return _dummy_step(env)
    if type(env) is VecNormalize:
        return _normalize_step(env)
    return None
