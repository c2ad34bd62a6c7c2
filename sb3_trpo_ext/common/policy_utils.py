"""
Glue between SB3 policies and the numerics of :mod:`sb3_trpo_ext.common.numerics`.

* :func:`distribution_params` reads an SB3 distribution in the canonical parametrisation used for KL and Fisher.
* :func:`split_actor_critic_parameters` decides which parameters belong to the policy (the actor) by the structure
  of the computation: a parameter is an actor parameter if the action distribution depends on it. Names are never
  looked at, so custom policies with arbitrary module names work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch as th
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs

from sb3_trpo_ext.common.numerics import BERNOULLI, CATEGORICAL, GAUSSIAN, DistParams

#: Held while this package switches process-wide state (PyTorch's forward-mode AD level, backend flags and the default
#: argument checks of ``torch.distributions``; NumPy's BLAS thread limit, see ``critic.single_threaded_blas``), so that
#: models trained in threads of one process (RL Zoo's ``-optimize --n-jobs``) do not interleave the switches: PyTorch
#: allows one forward-mode level per process. Other threads still see the switched state while it is in force.
PROCESS_STATE_LOCK = threading.RLock()


@contextmanager
def process_wide(owner: Any, name: str, value: Any) -> Iterator[None]:
    """
    ``owner.name = value`` for the block, under :data:`PROCESS_STATE_LOCK`, then the previous value again. Only this
    attribute: ``th.backends.mkldnn.flags()`` and ``th.backends.cudnn.flags()`` would reset the others too.
    """
    with PROCESS_STATE_LOCK:
        previous = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, previous)


def distribution_params(distribution: Distribution) -> DistParams:
    """
    Parameters of an SB3 action distribution, in the canonical parametrisation of :class:`DistParams`.

    Squashed Gaussians (``squash_output=True``) are represented by their underlying Gaussian: tanh is a fixed
    bijection, so it changes neither the KL nor the Fisher information.

    :param distribution: A distribution returned by ``policy.get_distribution(obs)``
    :return: Its parameters, still attached to the autograd graph
    """
    if isinstance(distribution, (DiagGaussianDistribution, StateDependentNoiseDistribution)):
        normal = distribution.distribution
        return DistParams(GAUSSIAN, (normal.loc, th.log(normal.scale)))
    if isinstance(distribution, MultiCategoricalDistribution):
        return DistParams(CATEGORICAL, tuple(component.logits for component in distribution.distribution))
    if isinstance(distribution, CategoricalDistribution):
        return DistParams(CATEGORICAL, (distribution.distribution.logits,))
    if isinstance(distribution, BernoulliDistribution):
        return DistParams(BERNOULLI, (distribution.distribution.logits,))
    # sb3-contrib's maskable distributions: one torch Categorical in ``distribution`` (Discrete), or one per action
    # component in ``distributions`` (MultiDiscrete, and MultiBinary as categoricals of two outcomes). Their logits
    # are already masked (masked outcomes at -1e8 before normalisation, so probability 0).
    for attribute in ("distribution", "distributions"):
        inner = getattr(distribution, attribute, None)
        if isinstance(inner, th.distributions.Categorical):
            return DistParams(CATEGORICAL, (inner.logits,))
        if isinstance(inner, list) and inner and all(isinstance(d, th.distributions.Categorical) for d in inner):
            return DistParams(CATEGORICAL, tuple(d.logits for d in inner))
    raise TypeError(f"TRPO does not support the action distribution {type(distribution).__name__}")


def split_actor_critic_parameters(
    policy: ActorCriticPolicy,
    observations: PyTorchObs,
    distribution_fn: Callable[[], Distribution] | None = None,
    value_fn: Callable[[], th.Tensor] | None = None,
) -> tuple[list[th.nn.Parameter], list[th.nn.Parameter]]:
    """
    Split the policy's trainable parameters into actor and critic parameters, by what the outputs depend on.

    One forward pass on ``observations``, in evaluation mode (each module's mode is restored after it), builds the
    graph of the action distribution and of the value;
    ``torch.autograd.grad(..., allow_unused=True)`` then tells which parameters each output depends on.
    A parameter that feeds the action distribution is an actor parameter, even if the value also depends on it
    (a features extractor shared between actor and critic): it is moved only by the trust-region step, never by the
    critic's regression, so the KL constraint holds for every step of the policy. The critic parameters are those
    that feed the value and not the action distribution.

    :param policy: The actor-critic policy
    :param observations: A batch of observations (one sample is enough)
    :param distribution_fn: The forward pass to the action distribution (default:
        ``policy.get_distribution(observations)``; recurrent policies pass their own, with hidden states)
    :param value_fn: The forward pass to the value (default: ``policy.predict_values(observations)``)
    :return: ``(actor_params, critic_params)``, each in the order of ``policy.parameters()``
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    # in evaluation mode, as a rollout: the pass must leave no trace (BatchNorm's running statistics, Dropout's
    # random numbers), and a training-mode BatchNorm cannot take the single sample it is given
    modes = [(module, module.training) for module in policy.modules()]
    policy.set_training_mode(False)
    try:
        with th.enable_grad():
            distribution = distribution_fn() if distribution_fn is not None else policy.get_distribution(observations)
            dist_tensors = distribution_params(distribution).tensors
            values = value_fn() if value_fn is not None else policy.predict_values(observations)
            actor_grads = th.autograd.grad(th.stack([t.sum() for t in dist_tensors]).sum(), params, allow_unused=True)
            critic_grads = th.autograd.grad(values.sum(), params, allow_unused=True)
    finally:
        for module, training in modes:
            module.training = training
    actor = [p for p, g in zip(params, actor_grads) if g is not None]
    actor_ids = {id(p) for p in actor}
    critic = [p for p, g in zip(params, critic_grads) if g is not None and id(p) not in actor_ids]
    if not actor:
        raise ValueError("the policy's action distribution does not depend on any trainable parameter")
    return actor, critic


def index_observations(observations: PyTorchObs, indices: th.Tensor | slice) -> PyTorchObs:
    """
    Select rows of a batch of observations (a tensor or a dict of tensors).

    :param observations: Batch of observations
    :param indices: Row indices or a slice
    :return: The selected rows, same structure
    """
    if isinstance(observations, dict):
        return {key: value[indices] for key, value in observations.items()}
    return observations[indices]


def all_finite(tensors: Sequence[th.Tensor]) -> bool:
    """
    One check (one synchronisation) per device, not one per tensor; per device because PyTorch's optimizers keep
    Adam's step count on the CPU beside CUDA parameters.

    :param tensors: Tensors to check
    :return: True if every element of every tensor is finite
    """
    by_device: dict[th.device, list[th.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach().reshape(-1))
    return all(bool((group[0] if len(group) == 1 else th.cat(group)).isfinite().all()) for group in by_device.values())


@contextmanager
def parameters_replaced(module: th.nn.Module, values: dict[int, th.Tensor]) -> Iterator[None]:
    """
    Run ``module`` with some of its parameters replaced by other tensors (``id(parameter) -> tensor``), then put the
    very same parameter objects back. Every registration of a parameter is replaced, once per module even where a
    module is registered under several names (SB3's shared features extractor); ``torch.func.functional_call``
    does not restore the original objects in that case. LSTMs notice the change of weights themselves.
    """
    swapped: list[tuple[th.nn.Module, str, th.nn.Parameter]] = []
    try:
        for submodule in module.modules():  # each module once
            for name, param in submodule._parameters.items():
                if param is not None and id(param) in values:
                    swapped.append((submodule, name, param))
        for submodule, name, param in swapped:
            submodule._parameters[name] = values[id(param)]  # type: ignore[assignment]
        yield
    finally:
        for submodule, name, param in swapped:
            submodule._parameters[name] = param
