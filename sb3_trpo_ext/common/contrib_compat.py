"""
Translate sb3-contrib's ``target_kl`` and ``cg_damping`` into this package's units.

sb3-contrib's TRPO measures the KL with ``kl_divergence(new, old).mean()``. For Box actions (diagonal Gaussian, with
or without gSDE) and MultiBinary actions (independent Bernoullis), SB3's ``kl_divergence`` returns one value per
action dimension, so that ``.mean()`` averages over the ``d`` action dimensions as well as over the samples. The
constraint it enforces is therefore ``KL / d <= target_kl``, and the matrix its conjugate gradient inverts is
``F / d + cg_damping * I``. This package constrains the KL of the whole action distribution (the sum over
independent dimensions), as the TRPO paper does: with the same numbers its trust region is ``d`` times smaller.

Solving ``(F / d + lambda I) x = g`` gives ``d`` times the solution of ``(F + d lambda I) x = g``, and the maximal
step ``sqrt(2 delta / x^T A x)`` then comes out the same, so sb3-contrib's ``(target_kl, cg_damping)`` is exactly
this package's ``(d * target_kl, d * cg_damping)``: the same search direction, the same maximal step and the same
bound in the line search. What still differs is the line search's KL direction and inequality (sb3-contrib accepts on
``KL(new || old) < target_kl``, this package on ``KL(old || new) <= target_kl``, the paper's), which decide only
between candidates at the edge of the trust region. For Discrete and MultiDiscrete actions SB3's KL is already one
value per sample and the factor is 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

#: sb3-contrib's defaults, used when the hyperparameters given to :func:`from_sb3_contrib` do not set them
SB3_CONTRIB_TARGET_KL = 0.01
SB3_CONTRIB_CG_DAMPING = 0.1


def kl_dimension_factor(action_space: spaces.Space) -> int:
    """
    How many values sb3-contrib's TRPO averages its KL over for one sample.

    :param action_space: The environment's action space
    :return: The number of action dimensions for Box and MultiBinary spaces, 1 for Discrete and MultiDiscrete
    """
    if isinstance(action_space, (spaces.Box, spaces.MultiBinary)):
        return max(1, int(np.prod(action_space.shape)))
    if isinstance(action_space, (spaces.Discrete, spaces.MultiDiscrete)):
        return 1
    raise TypeError(
        f"action_space: {type(action_space).__name__} is not supported by sb3-contrib's TRPO "
        "(expected Box, Discrete, MultiDiscrete or MultiBinary)"
    )


def from_sb3_contrib(action_space: spaces.Space, **hyperparameters: Any) -> dict[str, Any]:
    """
    Hyperparameters for this package's TRPO that reproduce what sb3-contrib's TRPO does with ``hyperparameters``.

    ``target_kl`` and ``cg_damping`` (sb3-contrib's defaults 0.01 and 0.1 where absent) are multiplied by
    :func:`kl_dimension_factor`; every other entry is returned unchanged. Example::

        zoo = dict(n_steps=1024, target_kl=0.04, cg_damping=0.1)  # tuned for sb3_contrib.TRPO
        model = TRPO("MlpPolicy", env, **from_sb3_contrib(env.action_space, **zoo))

    :param action_space: The environment's action space
    :param hyperparameters: Keyword arguments meant for ``sb3_contrib.TRPO``
    :return: Keyword arguments for :class:`sb3_trpo_ext.TRPO`
    """
    factor = kl_dimension_factor(action_space)
    translated = dict(hyperparameters)
    defaults = {"target_kl": SB3_CONTRIB_TARGET_KL, "cg_damping": SB3_CONTRIB_CG_DAMPING}
    for name, default in defaults.items():
        # rounded to 12 significant digits: 6 * 0.1 is 0.6, not 0.6000000000000001
        translated[name] = float(f"{factor * float(hyperparameters.get(name, default)):.12g}")
    return translated
