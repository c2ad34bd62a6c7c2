"""
Critic regression without per-minibatch overhead.

TRPO fits its value function with many small Adam steps (the RL Zoo's MuJoCo settings: 20 epochs of 16 minibatches
per update). With autograd and ``optimizer.step()`` each step costs far more in Python and dispatch overhead than in
arithmetic. For the standard SB3 critic, an MLP (``nn.Sequential`` of ``Linear`` and ``Tanh``/``ReLU``) followed by a
``Linear`` value head, :class:`FastMlpCritic` writes the forward and backward passes out by hand and applies the Adam
update with PyTorch's fused kernel on the optimizer's own state tensors, so saving, loading and the learning-rate
schedule see an ordinary ``torch.optim.Adam``. Any other critic or optimizer falls back to the generic autograd path.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch as th
from stable_baselines3.common.torch_layers import MlpExtractor
from threadpoolctl import ThreadpoolController
from torch import nn

from sb3_trpo_ext.common.policy_utils import PROCESS_STATE_LOCK, all_finite, optimizer_runs_as_defined

_ACTIVATIONS = (nn.Tanh, nn.ReLU)
#: Adam's first moments, second moments and step counts, one tensor per parameter each
AdamState = tuple[list[th.Tensor], list[th.Tensor], list[th.Tensor]]
#: A minibatch source: torch tensors, or NumPy arrays for the NumPy passes
Batch = TypeVar("Batch", np.ndarray, th.Tensor)


def _tanh(x: th.Tensor) -> th.Tensor:
    """``tanh(x) = 2 sigmoid(2x) - 1``: the same function to float32 rounding, and several times faster than
    ``torch.tanh`` on CPU in PyTorch 2.13 (measured on the project's machines)."""
    return th.sigmoid(x * 2.0).mul_(2.0).sub_(1.0)


@functools.cache
def _threadpools() -> ThreadpoolController:
    """The BLAS and OpenMP libraries loaded in this process (found once: scanning them costs milliseconds)."""
    return ThreadpoolController()


class _BlasLimit:
    """The process-wide BLAS thread limit, counted: set by the first block to enter, restored by the last to leave."""

    users = 0
    limiter: Any = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """
    Limit NumPy's BLAS to one thread while NumPy does the critic's small matrix products. By default OpenBLAS would use
    every core: on these matrices that is slower, and on a loaded machine many times slower (measured: 20x on a
    2-core machine running two other trainings). The limit is process-wide: with models trained in threads, it is
    set when the first block enters and restored when the last one leaves.
    """
    with PROCESS_STATE_LOCK:
        if _BlasLimit.users == 0:
            _BlasLimit.limiter = _threadpools().limit(limits=1, user_api="blas")
        _BlasLimit.users += 1
    try:
        yield
    finally:
        with PROCESS_STATE_LOCK:
            _BlasLimit.users -= 1
            if _BlasLimit.users == 0:
                _BlasLimit.limiter.restore_original_limits()
                _BlasLimit.limiter = None


def fused_adam_compatible(optimizer: th.optim.Optimizer) -> bool:
    """
    True for a ``torch.optim.Adam`` whose update the fused kernel reproduces (no weight decay, AMSGrad, ...) and whose
    ``step()`` has no hooks (which the fused step would skip).
    """
    if type(optimizer) is not th.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    if not optimizer_runs_as_defined(optimizer):
        return False
    for group in optimizer.param_groups:
        if group["weight_decay"] != 0 or group["amsgrad"] or group["maximize"] or group["differentiable"]:
            return False
        if group.get("capturable") or group.get("decoupled_weight_decay"):
            return False
    return True


def holds_all(optimizer: th.optim.Optimizer, params: Sequence[th.Tensor]) -> bool:
    """Whether the optimizer holds every one of ``params`` (a user's optimizer may hold only some of the critic)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return all(id(p) in held for p in params)


#: The per-parameter state of Adam (and AdamW) that has its parameter's shape
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_optimizer_state(optimizer: th.optim.Optimizer) -> None:
    """
    Raise a ``ValueError`` if one of Adam's moments in ``optimizer``'s state does not have its parameter's shape, dtype
    or device: an optimizer state saved with another network, which ``set_parameters`` and ``load`` accept when it
    holds as many tensors. PyTorch's fused Adam kernel does not check, and would read and write past the ends of
    smaller state tensors. Other state (step counts, other optimizers' factored or quantised statistics) is left alone.

    :param optimizer: The optimizer
    """
    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if key not in _ADAM_MOMENTS or not isinstance(value, th.Tensor):
                    continue
                if value.shape != param.shape or value.dtype != param.dtype or value.device != param.device:
                    raise ValueError(
                        f"The optimizer's state does not fit its parameters: {key!r} of parameter {index} (group "
                        f"{group_index}) is a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}, the "
                        f"parameter a {param.dtype} tensor of shape {tuple(param.shape)} on {param.device}. It was "
                        "probably saved with another network (set_parameters, load); load the matching optimizer "
                        "state, or leave the optimizer out of what set_parameters loads"
                    )


class FusedAdam:
    """
    ``optimizer.step()`` of a :func:`fused_adam_compatible` Adam for given gradients: PyTorch's fused Adam kernel
    called directly on the optimizer's own state tensors (created as ``torch.optim.Adam`` creates them), so saving,
    loading and learning-rate schedules see an ordinary Adam, without its per-step Python overhead.

    :param optimizer: The Adam optimizer
    :param params: The parameters to update (all in the optimizer, float32, dense)
    """

    def __init__(self, optimizer: th.optim.Adam, params: Sequence[th.Tensor]) -> None:
        self.optimizer = optimizer
        self.params = list(params)

    @staticmethod
    def build(optimizer: th.optim.Optimizer, params: Sequence[th.Tensor]) -> FusedAdam | None:
        """:return: The fused step, or ``None`` where ``optimizer.step()`` must be used"""
        if not fused_adam_compatible(optimizer) or any(p.dtype != th.float32 or p.is_sparse for p in params):
            return None
        if not holds_all(optimizer, params):
            return None
        return FusedAdam(optimizer, params)  # type: ignore[arg-type]

    def state(self) -> AdamState:
        """The Adam state of each parameter, created as ``torch.optim.Adam`` would on its first step."""
        check_optimizer_state(self.optimizer)  # the fused kernel would not
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for param in self.params:
            state = self.optimizer.state[param]
            if len(state) == 0:
                state["step"] = th.tensor(0.0, dtype=th.float32, device=param.device)
                state["exp_avg"] = th.zeros_like(param, memory_format=th.preserve_format)
                state["exp_avg_sq"] = th.zeros_like(param, memory_format=th.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps

    @th.no_grad()
    def step(self, grads: Sequence[th.Tensor], state: AdamState | None = None) -> None:
        """
        One Adam update of ``params`` with ``grads`` (torch.optim.Adam's update; the functional wrapper, which
        regroups the tensors by device at every call, is skipped).

        :param grads: One gradient per parameter
        :param state: :meth:`state`, when the caller keeps it across steps
        """
        exp_avgs, exp_avg_sqs, steps = self.state() if state is None else state
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        th._foreach_add_(steps, 1)
        th._fused_adam_(
            self.params,
            list(grads),
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )


class SavedCritic:
    """
    Parameters and the optimizer's state for them (Adam's moments and step counts), saved to undo an update.

    :param optimizer: The optimizer holding ``params``
    :param params: The parameters
    """

    def __init__(self, optimizer: th.optim.Optimizer, params: Sequence[th.Tensor]) -> None:
        self.optimizer, self.params = optimizer, list(params)
        self.values = [p.detach().clone() for p in self.params]
        self.states = [
            {k: v.clone() if isinstance(v, th.Tensor) else copy.deepcopy(v) for k, v in optimizer.state[p].items()}
            if p in optimizer.state
            else None
            for p in self.params
        ]

    def state_tensors(self) -> list[th.Tensor]:
        """The floating-point tensors of the optimizer's current state for the parameters."""
        return optimizer_state_tensors(self.optimizer, self.params)

    def was_finite(self) -> bool:
        """Whether every saved value (parameters, floating-point state) was finite."""
        saved = [v for state in self.states if state for v in state.values() if isinstance(v, th.Tensor)]
        return all_finite([*self.values, *(v for v in saved if v.is_floating_point())])

    @th.no_grad()
    def restore(self) -> None:
        """Write the saved values back in place (the same tensor objects); drop state created after the save."""
        for param, value, state in zip(self.params, self.values, self.states):
            param.copy_(value)
            if state is None:
                self.optimizer.state.pop(param, None)
                continue
            current = self.optimizer.state[param]
            for key in list(current):
                if key not in state:
                    del current[key]
            for key, saved in state.items():
                if isinstance(saved, th.Tensor) and isinstance(current.get(key), th.Tensor):
                    current[key].copy_(saved)
                else:
                    current[key] = saved


def optimizer_state_tensors(optimizer: th.optim.Optimizer, params: Sequence[th.Tensor]) -> list[th.Tensor]:
    """The floating-point tensors of the optimizer's state for ``params`` (Adam's moments, its step counts)."""
    return [
        v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, th.Tensor) and v.is_floating_point()
    ]


def optimizer_update(optimizer: th.optim.Optimizer, params: Sequence[th.Tensor]) -> Callable[[Sequence[th.Tensor]], None]:
    """
    ``grads -> None``: one optimizer update of ``params`` from the given gradients: :class:`FusedAdam` where it
    applies, else ``optimizer.step()`` with only these parameters' gradients set (every other one stays ``None``,
    which the optimizer skips).

    :param optimizer: The optimizer holding ``params``
    :param params: The parameters to update
    :return: The update function
    """
    fused = FusedAdam.build(optimizer, params)
    if fused is not None:
        state = fused.state()
        return lambda grads: fused.step(grads, state)

    def step(grads: Sequence[th.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        for param in params:  # also those the optimizer does not hold (its zero_grad leaves them)
            param.grad = None

    return step


class FastMlpCritic:
    """
    Hand-written value regression for ``value_net(mlp_extractor.value_net(features))``.

    :param layers: The critic's linear layers, the value head last
    :param activations: The activation after each hidden layer (one fewer than ``layers``)
    :param optimizer: The policy's Adam optimizer, whose state tensors are updated in place
    """

    #: On the CPU, run the forward and backward passes in NumPy (fewer, cheaper calls than torch's dispatcher for
    #: these small matrices; Adam stays torch's fused kernel), single-threaded: where torch may use several threads,
    #: only while every matrix product of a minibatch is below :attr:`numpy_max_products` multiply-adds (larger ones
    #: are left to torch, which can split them). Tested against the torch version and autograd.
    numpy_on_cpu = True
    numpy_max_products = 1 << 22

    def __init__(self, layers: Sequence[nn.Linear], activations: Sequence[nn.Module], optimizer: th.optim.Adam) -> None:
        self.layers = list(layers)
        self.activations = list(activations)
        self.optimizer = optimizer
        self.params: list[th.Tensor] = [p for layer in self.layers for p in (layer.weight, layer.bias)]
        self._tanh = [isinstance(activation, nn.Tanh) for activation in self.activations]

    @staticmethod
    def build(
        mlp_extractor: nn.Module, value_head: nn.Module, critic_params: Sequence[nn.Parameter], optimizer: th.optim.Optimizer
    ) -> FastMlpCritic | None:
        """
        :return: A fast critic if the architecture and the optimizer are the standard ones and the optimizer holds every
            critic parameter, else ``None``
        """
        if type(mlp_extractor) is not MlpExtractor or type(value_head) is not nn.Linear or value_head.bias is None:
            return None
        layers: list[nn.Linear] = []
        activations: list[nn.Module] = []
        modules = list(mlp_extractor.value_net)
        for i, module in enumerate(modules):
            if i % 2 == 0 and type(module) is nn.Linear and module.bias is not None:
                layers.append(module)
            elif i % 2 == 1 and type(module) in _ACTIVATIONS:
                activations.append(module)
            else:
                return None
        if len(layers) != len(activations):
            return None
        layers.append(value_head)
        critic = FastMlpCritic(layers, activations, optimizer)  # type: ignore[arg-type]
        if {id(p) for p in critic.params} != {id(p) for p in critic_params}:
            return None
        # the fused Adam step's own conditions (else the generic path updates only what the optimizer holds)
        if FusedAdam.build(optimizer, critic.params) is None:
            return None
        return critic

    def loss_and_gradients(self, features: th.Tensor, returns: th.Tensor) -> tuple[th.Tensor, list[th.Tensor]]:
        """
        Mean squared error ``mean((V(s) - R)^2)`` and its gradient with respect to each parameter, by backpropagation
        written out for the MLP.

        :param features: Critic inputs, shape ``(batch, features_dim)``
        :param returns: Regression targets, shape ``(batch,)``
        :return: The loss and one gradient per parameter, in the order of ``self.params``
        """
        hidden = [features]
        for layer, tanh in zip(self.layers[:-1], self._tanh):
            pre = th.addmm(layer.bias, hidden[-1], layer.weight.t())
            hidden.append(_tanh(pre) if tanh else th.relu(pre))
        head = self.layers[-1]
        values = th.addmm(head.bias, hidden[-1], head.weight.t())
        error = values.squeeze(1) - returns
        loss = error.square().mean()
        # dL/dV = 2 (V - R) / batch, then back through each layer
        delta = (error * (2.0 / error.shape[0])).unsqueeze(1)
        grads: list[th.Tensor] = []
        for index in range(len(self.layers) - 1, -1, -1):
            layer, inputs = self.layers[index], hidden[index]
            grads.append(delta.sum(0))  # bias
            grads.append(delta.t().mm(inputs))  # weight
            if index > 0:
                upstream = delta.mm(layer.weight)
                if self._tanh[index - 1]:
                    delta = th.ops.aten.tanh_backward(upstream, inputs)  # upstream * (1 - tanh^2)
                else:
                    delta = th.ops.aten.threshold_backward(upstream, inputs, 0.0)  # upstream * (relu > 0)
        grads.reverse()  # -> (w0, b0, w1, b1, ...), the order of self.params
        return loss, grads

    def numpy_loss_and_gradients(
        self, features: np.ndarray, returns: np.ndarray, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """
        :meth:`loss_and_gradients` in NumPy, on arrays that share memory with the parameters (CPU only).

        :return: The errors ``V(s) - R`` of the minibatch (the loss is their mean square) and one gradient per
            parameter, in the order of ``self.params``
        """
        hidden = [features]
        for weight, bias, tanh in zip(weights[:-1], biases[:-1], self._tanh):
            pre = hidden[-1] @ weight.T
            pre += bias
            hidden.append(np.tanh(pre, out=pre) if tanh else np.maximum(pre, 0.0, out=pre))
        values = hidden[-1] @ weights[-1].T
        values += biases[-1]
        error = values[:, 0] - returns
        # dL/dV = 2 (V - R) / batch, then back through each layer (float32 throughout: the Python scalar is weak)
        delta = (error * (2.0 / error.shape[0]))[:, None]
        grads: list[np.ndarray] = []
        for index in range(len(weights) - 1, -1, -1):
            inputs = hidden[index]
            grads.append(delta.sum(axis=0))  # bias
            grads.append(delta.T @ inputs)  # weight
            if index > 0:
                delta = delta @ weights[index]
                if self._tanh[index - 1]:
                    derivative = inputs * inputs
                    np.subtract(1.0, derivative, out=derivative)
                    delta *= derivative  # upstream * (1 - tanh^2)
                else:
                    delta *= inputs > 0  # upstream * (relu > 0)
        grads.reverse()  # -> (w0, b0, w1, b1, ...), the order of self.params
        return error, grads

    @staticmethod
    def _minibatches(features: Batch, returns: Batch, batch_size: int, n_epochs: int) -> Iterator[tuple[Batch, Batch]]:
        """
        ``n_epochs`` passes over the data in minibatches of ``batch_size``, each pass in the order of a permutation
        drawn from torch's generator (the same draws for tensors and NumPy arrays); one gather per pass, the
        minibatches are then contiguous slices of the shuffled data.
        """
        n_samples = returns.shape[0]
        for _ in range(n_epochs):
            if isinstance(returns, th.Tensor):
                permutation: Any = th.randperm(n_samples, device=returns.device)
            else:
                permutation = th.randperm(n_samples).numpy()
            shuffled_features, shuffled_returns = features[permutation], returns[permutation]
            for start in range(0, n_samples, batch_size):
                yield shuffled_features[start : start + batch_size], shuffled_returns[start : start + batch_size]

    def _use_numpy(self, features: th.Tensor, returns: th.Tensor, batch_size: int) -> bool:
        """Whether :meth:`fit` runs the NumPy passes (see :attr:`numpy_on_cpu`)."""
        if not self.numpy_on_cpu or features.device.type != "cpu" or returns.device.type != "cpu":
            return False
        largest = max(min(batch_size, returns.shape[0]) * layer.in_features * layer.out_features for layer in self.layers)
        return th.get_num_threads() == 1 or largest <= self.numpy_max_products

    def _fit_numpy(
        self, features: th.Tensor, returns: th.Tensor, batch_size: int, n_epochs: int, adam: FusedAdam
    ) -> list[float]:
        """:meth:`fit` with the passes in NumPy; the same permutations (torch's generator) and the same Adam kernel."""
        state = adam.state()
        weights = [layer.weight.detach().numpy() for layer in self.layers]  # views: Adam updates them in place
        biases = [layer.bias.detach().numpy() for layer in self.layers]
        all_features = np.ascontiguousarray(features.detach().numpy(), dtype=np.float32)
        all_returns = np.ascontiguousarray(returns.detach().numpy(), dtype=np.float32)
        errors = []
        with single_threaded_blas(), np.errstate(all="ignore"):  # NumPy silent on overflow, as torch is
            for batch_features, batch_returns in self._minibatches(all_features, all_returns, batch_size, n_epochs):
                error, grads = self.numpy_loss_and_gradients(batch_features, batch_returns, weights, biases)
                adam.step([th.from_numpy(grad) for grad in grads], state)
                errors.append(error)
            return [float(np.mean(np.square(error))) for error in errors]

    @th.no_grad()
    def fit(self, features: th.Tensor, returns: th.Tensor, batch_size: int, n_epochs: int) -> list[float]:
        """
        Adam on minibatches of a random permutation, ``n_epochs`` passes over the data.

        :param features: Critic inputs of the whole batch
        :param returns: Regression targets of the whole batch
        :param batch_size: Minibatch size
        :param n_epochs: Number of passes
        :return: The loss of every minibatch
        """
        adam = FusedAdam(self.optimizer, self.params)
        if self._use_numpy(features, returns, batch_size):
            return self._fit_numpy(features, returns, batch_size, n_epochs, adam)
        state = adam.state()
        losses = []
        for batch_features, batch_returns in self._minibatches(features, returns, batch_size, n_epochs):
            loss, grads = self.loss_and_gradients(batch_features, batch_returns)
            adam.step(grads, state)
            losses.append(loss)
        return [float(x) for x in th.stack(losses).tolist()] if losses else []
