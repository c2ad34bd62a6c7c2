"""
Glue between SB3 policies and the numerics of :mod:`sb3_trpo_ext.common.numerics`.

* :func:`distribution_params` reads an SB3 distribution in the canonical parametrisation used for KL and Fisher.
* :func:`split_actor_critic_parameters` decides which parameters belong to the policy (the actor) by the structure
  of the computation: a parameter is an actor parameter if the action distribution depends on it. Names are never
  looked at, so custom policies with arbitrary module names work.
"""

from __future__ import annotations

import inspect
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
from torch.nn.utils.parametrize import is_parametrized
from torch.optim import optimizer as torch_optimizer

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
    distribution_fn: Callable[[PyTorchObs], Distribution] | None = None,
    value_fn: Callable[[PyTorchObs], th.Tensor] | None = None,
) -> tuple[list[th.nn.Parameter], list[th.nn.Parameter]]:
    """
    Split the policy's trainable parameters into actor and critic parameters, by what the outputs depend on.

    Forward passes build the graph of the action distribution and of the value, and
    ``torch.autograd.grad(..., allow_unused=True)`` tells which parameters each output depends on.
    A parameter that feeds the action distribution is an actor parameter, even if the value also depends on it
    (a features extractor shared between actor and critic): it is moved only by the trust-region step, never by the
    critic's regression, so the KL constraint holds for every step of the policy. The critic parameters are those
    that feed the value and not the action distribution.

    There are two passes, on the first observation twice (a training-mode BatchNorm cannot take one sample): in
    evaluation mode, as rollouts act, and in training mode, as ``train()`` computes the step; a dependency in either
    counts (a parameter used only in one mode, as in an ``if self.training`` branch, is not left out). Neither pass
    leaves a trace: each module's mode is restored (by its ``train``), the buffers (BatchNorm's running statistics)
    are copied back, and the random number generators of the CPU and the parameters' GPUs are restored (Dropout).

    :param policy: The actor-critic policy
    :param observations: A batch of observations (the first is used)
    :param distribution_fn: ``observations -> `` the action distribution (default: ``policy.get_distribution``;
        recurrent policies pass their own, with hidden states for as many rows as given)
    :param value_fn: ``observations -> `` the value (default: ``policy.predict_values``)
    :return: ``(actor_params, critic_params)``, each in the order of ``policy.parameters()``
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    rows = index_observations(observations, th.zeros(2, dtype=th.long, device=policy.device))
    modes = [(module, module.training) for module in policy.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in policy.buffers()]
    gpus = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    actor_ids: set[int] = set()
    value_ids: set[int] = set()
    try:
        with th.random.fork_rng(devices=gpus), th.enable_grad():
            for training in (False, True):
                policy.set_training_mode(training)
                distribution = distribution_fn(rows) if distribution_fn is not None else policy.get_distribution(rows)
                dist_tensors = distribution_params(distribution).tensors
                values = value_fn(rows) if value_fn is not None else policy.predict_values(rows)
                actor_grads = th.autograd.grad(th.stack([t.sum() for t in dist_tensors]).sum(), params, allow_unused=True)
                value_grads = th.autograd.grad(values.sum(), params, allow_unused=True)
                actor_ids.update(id(p) for p, g in zip(params, actor_grads) if g is not None)
                value_ids.update(id(p) for p, g in zip(params, value_grads) if g is not None)
    finally:
        for module, training in modes:  # parents first: each module ends in its own mode, through its own train()
            module.train(training)
        with th.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    actor = [p for p in params if id(p) in actor_ids]
    critic = [p for p in params if id(p) in value_ids and id(p) not in actor_ids]
    if not actor:
        raise ValueError("the policy's action distribution does not depend on any trainable parameter")
    return actor, critic


def runs_as_defined(module: th.nn.Module) -> bool:
    """
    Whether calling ``module`` and its submodules runs their classes' methods and nothing else, so that the
    specialised paths, which read the weights and write the forward and backward passes out, compute what calling
    them computes. Not so where a module has hooks (forward, forward pre-, backward; also the global ones, and
    ``spectral_norm`` / ``weight_norm``, which are pre-hooks), a parametrisation (``torch.nn.utils.parametrize``),
    or a method replaced on the instance (``forward``, ``predict_values``, ...), or where a parameter has a gradient
    hook: those take the generic path.
    """
    hook_tables = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(th.nn.modules.module, f"_global{name}", None) for name in hook_tables):
        return False
    for submodule in module.modules():
        if any(getattr(submodule, name, None) for name in hook_tables) or is_parametrized(submodule):
            return False
        cls = type(submodule)
        if any(callable(value) and inspect.isfunction(getattr(cls, name, None)) for name, value in vars(submodule).items()):
            return False  # an instance attribute shadows a method of the class
    return not any(getattr(param, "_backward_hooks", None) for param in module.parameters())


def optimizer_runs_as_defined(optimizer: th.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` runs the class's update and nothing else (no step hooks, global or its own)."""
    tables = (
        getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
        getattr(torch_optimizer, "_global_optimizer_post_hooks", None),
        getattr(optimizer, "_optimizer_step_pre_hooks", None),
        getattr(optimizer, "_optimizer_step_post_hooks", None),
    )
    return not any(tables) and "step" not in vars(optimizer)


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
