"""
Fisher-vector products written out for SB3's standard MLP actor with a Gaussian or a categorical head.

For an MLP (``Linear`` layers with ``Tanh``/``ReLU``) followed by the ``action_net`` ``Linear``, the Gauss-Newton form
of the Fisher matrix ``F = J^T M J / N`` can be applied with one forward-mode pass (``J v``: the tangent of every
layer) and one backward pass (``J^T w``), re-using the activations of a single forward pass for all conjugate-gradient
iterations. ``M`` is the Fisher information of the action distribution in the head's outputs: for a diagonal Gaussian
in ``(mean, log_std)`` with a state-independent ``log_std``, ``1 / std^2`` for the mean and ``2`` for ``log_std``; for a
categorical in its logits, ``diag(p) - p p^T``. This needs about half the matrix products of the generic autograd
version (which differentiates through a backward pass) and no autograd graph; the generic version remains the
reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from torch import nn

from sb3_trpo_ext.common.lean_policy import is_plain_box, plain_mlp


class MlpFisher:
    """
    Damped Fisher-vector products ``v -> F v + damping v`` for a plain MLP actor with a Gaussian or categorical head.

    :param hidden: The hidden ``Linear`` layers, in order
    :param activations: The activation module after each hidden layer
    :param head: The ``action_net`` producing the mean (Gaussian) or the logits (categorical)
    :param log_std: The state-independent log standard deviation parameter (``None``: categorical head)
    :param actor_params: The actor parameters, in the order of the flat vectors
    """

    def __init__(
        self,
        hidden: Sequence[nn.Linear],
        activations: Sequence[nn.Module],
        head: nn.Linear,
        log_std: nn.Parameter | None,
        actor_params: Sequence[nn.Parameter],
    ) -> None:
        self.hidden, self.activations, self.head, self.log_std = list(hidden), list(activations), head, log_std
        offsets, offset = {}, 0
        for param in actor_params:
            offsets[id(param)] = (offset, param.numel())
            offset += param.numel()
        self.size = offset
        self.offsets = offsets
        self.inputs: list[th.Tensor] = []  # input of each Linear layer (hidden ones, then the head)
        self.derivatives: list[th.Tensor] = []  # activation derivative after each hidden layer
        self.inverse_variance = th.empty(0)
        self.probabilities = th.empty(0)
        self.damping = 0.0

    @staticmethod
    def build(
        policy: ActorCriticPolicy, observation_space: spaces.Space, use_sde: bool, actor_params: Sequence[nn.Parameter]
    ) -> MlpFisher | None:
        """
        :return: The specialised product if the actor is a plain MLP with a diagonal Gaussian (no gSDE, unsquashed) or
            a categorical head on flat Box observations and the actor parameters are exactly its parameters,
            else ``None``
        """
        gaussian = type(policy.action_dist) is DiagGaussianDistribution and not use_sde and not policy.squash_output
        if not gaussian and type(policy.action_dist) is not CategoricalDistribution:
            return None
        if type(policy.pi_features_extractor) is not FlattenExtractor or not is_plain_box(
            observation_space, policy.normalize_images
        ):
            return None
        if type(policy.mlp_extractor) is not MlpExtractor or type(policy.action_net) is not nn.Linear:
            return None
        layers = plain_mlp(policy.mlp_extractor.policy_net)
        if layers is None or len(layers) % 2 != 0:
            return None
        hidden = [m for m in layers[0::2] if isinstance(m, nn.Linear)]
        activations = layers[1::2]
        if len(hidden) != len(activations) or any(isinstance(m, nn.Linear) for m in activations):
            return None
        if any(layer.bias is None for layer in [*hidden, policy.action_net]):
            return None
        log_std = policy.log_std if gaussian else None
        own = [p for layer in [*hidden, policy.action_net] for p in (layer.weight, layer.bias)]
        own += [log_std] if log_std is not None else []
        if {id(p) for p in own} != {id(p) for p in actor_params} or len(own) != len(actor_params):
            return None
        return MlpFisher(hidden, activations, policy.action_net, log_std, actor_params)

    @th.no_grad()
    def prepare(self, observations: th.Tensor, damping: float) -> None:
        """
        One forward pass at the current (old) parameters: cache every layer's input and activation derivative.

        :param observations: The batch (Box observations, preprocessed as SB3's ``FlattenExtractor`` does)
        :param damping: Damping added to the Fisher matrix
        """
        x = th.flatten(observations.float(), 1)
        self.inputs, self.derivatives = [], []
        for layer, activation in zip(self.hidden, self.activations):
            self.inputs.append(x)
            pre = th.addmm(layer.bias, x, layer.weight.t())
            if isinstance(activation, nn.Tanh):
                x = th.tanh(pre)
                self.derivatives.append(1.0 - x * x)
            else:
                x = th.relu(pre)
                self.derivatives.append((pre > 0).to(x.dtype))
        self.inputs.append(x)
        if self.log_std is not None:
            self.inverse_variance = th.exp(-2.0 * self.log_std.detach())
        else:
            self.probabilities = th.softmax(th.addmm(self.head.bias, x, self.head.weight.t()), dim=-1)
        self.damping = damping

    def _piece(self, vector: th.Tensor, param: th.Tensor) -> th.Tensor:
        offset, size = self.offsets[id(param)]
        return vector[offset : offset + size].view_as(param)

    @th.no_grad()
    def __call__(self, vector: th.Tensor) -> th.Tensor:
        """:return: ``F v + damping v`` for a flat vector ``v`` over the actor parameters"""
        layers = [*self.hidden, self.head]
        n_samples = self.inputs[0].shape[0]
        # Forward mode: J v, the tangent of every layer's output (the input itself has none)
        tangent: th.Tensor | None = None
        for index, layer in enumerate(layers):
            d_weight, d_bias = self._piece(vector, layer.weight), self._piece(vector, layer.bias)
            d_out = th.addmm(d_bias, self.inputs[index], d_weight.t())
            if tangent is not None:
                d_out.addmm_(tangent, layer.weight.t())
            tangent = d_out * self.derivatives[index] if index < len(self.hidden) else d_out
        assert tangent is not None
        if self.log_std is not None:
            # M: Fisher information of the Gaussian, 1 / std^2 for the mean (log_std: 2 per sample, below)
            delta = tangent * self.inverse_variance
        else:
            # M: Fisher information of a categorical in its logits, diag(p) - p p^T
            p = self.probabilities
            delta = p * tangent - p * (p * tangent).sum(dim=1, keepdim=True)
        # Backward: J^T (M J v)
        out = th.empty_like(vector)
        for index in range(len(layers) - 1, -1, -1):
            layer = layers[index]
            self._piece(out, layer.weight).copy_(delta.t().mm(self.inputs[index]))
            self._piece(out, layer.bias).copy_(delta.sum(0))
            if index > 0:
                delta = delta.mm(layer.weight).mul_(self.derivatives[index - 1])
        if self.log_std is not None:
            self._piece(out, self.log_std).copy_(2.0 * n_samples * self._piece(vector, self.log_std))
        return out.div_(n_samples).add_(vector, alpha=self.damping)
