"""
Invalid-action masks for TRPO: validating them, and reading masked distributions in the canonical parametrisation.

A mask holds one boolean per outcome of every categorical component of the action space, in the layout of
sb3-contrib (``Discrete(n)``: ``n`` entries; ``MultiDiscrete(nvec)``: ``sum(nvec)`` entries, component after
component; ``MultiBinary(n)``: ``2 n`` entries, ``(0, 1)`` for each bit). A masked outcome gets the logit ``-1e8``,
so its normalised probability is exactly 0 in float32: it is never sampled, and it contributes nothing to the
surrogate, to KL(old || new) (``0 log 0 = 0``) or to the Fisher information ``diag(p) - p p^T``.
Background on invalid action masking: https://arxiv.org/abs/2006.14171 (Huang and Ontanon, 2020).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from itertools import pairwise

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.utils import EXPECTED_METHOD_NAME, get_action_masks
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper

from sb3_trpo_ext.common.errors import UnsupportedActionSpaceError


def mask_component_sizes(action_space: spaces.Space) -> list[int]:
    """
    Number of outcomes of each categorical component of a maskable action space.

    :param action_space: A ``Discrete``, ``MultiDiscrete`` or one-dimensional ``MultiBinary`` space
    :return: The sizes, whose sum is the length of one mask
    """
    if isinstance(action_space, spaces.Discrete):
        return [int(action_space.n)]
    if isinstance(action_space, spaces.MultiDiscrete):
        return [int(n) for n in np.asarray(action_space.nvec).flatten()]
    if isinstance(action_space, spaces.MultiBinary) and isinstance(action_space.n, (int, np.integer)):
        return [2] * int(action_space.n)
    raise UnsupportedActionSpaceError(
        f"Unsupported action space {action_space}: MaskableTRPO supports Discrete, MultiDiscrete and "
        "one-dimensional MultiBinary actions"
    )


def check_action_masks(
    masks: np.ndarray | th.Tensor | Sequence[bool],
    action_space: spaces.Space,
    n_envs: int | None = None,
    unit: str = "environment",
) -> np.ndarray:
    """
    Check that every environment's mask has the right length and leaves at least one valid outcome in every
    action component.

    :param masks: Masks of one environment or of ``n_envs`` environments, in any layout whose last axes hold
        ``mask_length`` entries per environment (for ``MultiDiscrete``, one row per component is accepted too when
        the components have equal sizes), as sb3-contrib reads them: they are viewed as ``(-1, mask_length)``
    :param action_space: The action space the masks apply to
    :param n_envs: The number of environments the masks must cover (not checked if None)
    :param unit: What one mask is for, in the error message (``"observation"`` in ``predict``)
    :return: The masks as a boolean array of shape ``(n_envs, mask_length)``
    :raises ValueError: naming the environment (or observation) index and the component whose mask has no valid action, or
        when the masks' size does not fit the action space or the number of environments
    """
    sizes = mask_component_sizes(action_space)
    length = sum(sizes)
    array = masks.detach().cpu().numpy() if isinstance(masks, th.Tensor) else np.asarray(masks)
    if array.dtype.kind == "O" and all(isinstance(x, (bool, np.bool_, numbers.Real)) for x in array.flat):
        array = array.astype(bool)  # a mixed list of booleans and numbers
    if array.dtype.kind not in "biuf":  # strings ("0", "False") and other objects would all count as valid
        raise ValueError(
            f"Action masks must hold booleans or numbers (True / 1: the action is valid), got an array of dtype "
            f"{array.dtype} for the action space {action_space}"
        )
    array = array if array.dtype == np.bool_ else array.astype(bool)
    if array.size == 0 or array.size % length != 0 or (n_envs is not None and array.size != n_envs * length):
        plural = "" if n_envs == 1 else "s"
        expected = f"{length} entries per {unit}" + (f" for {n_envs} {unit}{plural}" if n_envs is not None else "")
        raise ValueError(
            f"Action masks of shape {np.asarray(masks).shape} do not fit the action space {action_space}: expected {expected}"
        )
    array = array.reshape(-1, length)
    if len(sizes) == 1 and array.any(axis=1).all():  # the common case, checked in one pass
        return array
    offsets = np.cumsum([0, *sizes])
    for component, (start, end) in enumerate(pairwise(offsets)):
        empty = np.flatnonzero(~array[:, start:end].any(axis=1))
        if empty.size > 0:
            where = f" (action component {component})" if len(sizes) > 1 else ""
            raise ValueError(
                f"The action mask of {unit} index {int(empty[0])} has no valid action{where}: "
                "at least one action must be allowed in every state"
            )
    return array


def make_mask_getter(env: VecEnv) -> Callable[[], np.ndarray]:
    """
    ``get_action_masks(env)`` (sb3-contrib: ``np.stack(env.env_method("action_masks"))``) for rollouts. For SB3's
    ``DummyVecEnv``, alone or under ``VecEnvWrapper`` classes that forward ``env_method`` as they inherit it
    (``VecNormalize``, ``VecMonitor``, ...), each environment's ``action_masks`` is looked up and called exactly as
    ``env_method`` does, without its index bookkeeping; anything else calls ``get_action_masks``.

    :param env: The training environment
    :return: A function returning the current masks of every environment, one row each (a fresh array)
    """
    inner: VecEnv = env
    while isinstance(inner, VecEnvWrapper) and type(inner).env_method is VecEnvWrapper.env_method:
        if "env_method" in vars(inner):  # replaced on the instance
            return lambda: get_action_masks(env)
        inner = inner.venv
    if type(inner) is not DummyVecEnv or "env_method" in vars(inner) or "_get_target_envs" in vars(inner):
        return lambda: get_action_masks(env)
    envs = inner.envs
    if len(envs) == 1:
        only = envs[0]
        # np.stack of one mask: the mask as a (copied) array with a leading axis of 1
        return lambda: np.array(only.get_wrapper_attr(EXPECTED_METHOD_NAME)())[np.newaxis]
    return lambda: np.stack([env_i.get_wrapper_attr(EXPECTED_METHOD_NAME)() for env_i in envs])
