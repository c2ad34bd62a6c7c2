"""
``J v`` of a recurrent policy's action distribution over padded sequences, by the LSTM's tangent recurrence.

Within one update the conjugate gradient asks for many products ``J v`` at the same parameters. An LSTM step is
``z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``, gates ``(i, f, g, o) = (sigma, sigma, tanh, sigma)(z_t)``,
``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``. Its derivative along a direction ``(dW_ih, dW_hh, db, dx)`` of the
parameters and inputs is linear, with coefficients that depend only on the forward pass at the current parameters::

    dz_t = (dW_ih x_t + W_ih dx_t + dW_hh h_{t-1} + db) + W_hh dh_{t-1}
    d(i, f, g, o) = (i (1 - i), f (1 - f), 1 - g^2, o (1 - o)) * dz_t
    dc_t = f dc_{t-1} + g di + c_{t-1} df + i dg
    dh_t = tanh(c_t) do + o (1 - tanh(c_t)^2) dc_t

:class:`LSTMLayerTangent` runs the forward pass once per update and keeps those coefficients; each ``J v`` then
computes the bracket for all steps at once (matrix products over the whole batch) and walks the sequences with one
small matrix product and a few element-wise operations per step (on NumPy views of the tensors on the CPU, where
each operation costs less). Forward-mode differentiation through PyTorch's LSTM kernel
(what this replaces) recomputes the forward pass and dispatches many more operations per step, at every ``J v``.
The initial states of the sequences are held fixed (``dh_0 = dc_0 = 0``), as in the replay of the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.autograd import forward_ad

from sb3_trpo_ext.common.critic import single_threaded_blas
from sb3_trpo_ext.common.policy_utils import PROCESS_STATE_LOCK, parameters_replaced, runs_as_defined
from sb3_trpo_ext.recurrent.lean_step import LSTM_WEIGHTS, is_plain_lstm

Array = Any  # a tensor or a NumPy array (see _walk)
#: ``(primal, directions -> tangents)``, see :func:`make_lstm_jacobian_vector`
JacobianVector = tuple[tuple[th.Tensor, ...], Callable[[Sequence[th.Tensor]], tuple[th.Tensor | None, ...]]]


def supports_tangent_recurrence(lstm: nn.Module) -> bool:
    """Whether ``lstm`` is a plain ``nn.LSTM`` (see :func:`is_plain_lstm`) without dropout between its layers."""
    return is_plain_lstm(lstm) and bool(lstm.dropout == 0.0)


class LSTMLayerTangent:
    """
    The tangent recurrence of one LSTM layer along fixed sequences at fixed weights.

    :param weights: ``(weight_ih, weight_hh, bias_ih, bias_hh)`` of the layer
    :param inputs: Inputs ``(T, n, input_size)``, time first
    :param state: Initial ``(h, c)``, each ``(n, hidden_size)``
    """

    def __init__(self, weights: Sequence[th.Tensor], inputs: th.Tensor, state: tuple[th.Tensor, th.Tensor]) -> None:
        w_ih, w_hh, b_ih, b_hh = (w.detach() for w in weights)
        n_steps, n_seq, _ = inputs.shape
        hidden_size = w_hh.shape[1]
        self.w_ih, self.w_hh_t = w_ih, w_hh.t().contiguous()
        self.inputs = inputs.detach().reshape(n_steps * n_seq, -1)
        with th.no_grad():
            projected = th.addmm(b_ih + b_hh, self.inputs, w_ih.t()).view(n_steps, n_seq, 4 * hidden_size)
            activated = inputs.new_empty((n_steps, n_seq, 4 * hidden_size))  # (i, f, g, o) after their nonlinearity
            cells = inputs.new_empty((n_steps + 1, n_seq, hidden_size))  # c_0 .. c_T
            tanh_cell = inputs.new_empty((n_steps, n_seq, hidden_size))
            outputs = inputs.new_empty((n_steps, n_seq, hidden_size))
            h = state[0].detach()
            cells[0] = state[1].detach()
            candidate = slice(2 * hidden_size, 3 * hidden_size)
            for t in range(n_steps):
                gates = th.addmm(projected[t], h, self.w_hh_t)
                th.sigmoid(gates, out=activated[t])
                th.tanh(gates[:, candidate], out=activated[t, :, candidate])
                i, f, g, o = activated[t].chunk(4, dim=1)
                th.addcmul(f * cells[t], i, g, out=cells[t + 1])
                th.tanh(cells[t + 1], out=tanh_cell[t])
                h = th.mul(o, tanh_cell[t], out=outputs[t])
            i, f, g, o = activated.chunk(4, dim=2)
            # d(i, f, g, o) = slope * dz; dc = g di + c_{t-1} df + i dg + f dc_{t-1}; dh = tanh(c) do + o' dc
            gate_slope = activated * (1 - activated)
            gate_slope[:, :, candidate] = 1 - g * g
            # so dz_i, dz_f, dz_g enter dc and dz_o enters dh with these weights (slopes folded in)
            gate_weight = gate_slope * th.cat((g, cells[:-1], i, tanh_cell), dim=2)
            forget = f.contiguous()
            output_slope = o * (1 - tanh_cell * tanh_cell)
            previous_h = th.cat((state[0].detach().unsqueeze(0), outputs[:-1]))
        self.previous_h = previous_h.view(n_steps * n_seq, hidden_size)
        self._coefficients = (self.w_hh_t, gate_weight, forget, output_slope)
        on_cpu = inputs.device.type == "cpu" and inputs.dtype in (th.float32, th.float64)
        self._numpy = tuple(t.numpy() for t in self._coefficients) if on_cpu else None
        #: ``h_t`` of every step, ``(T, n, hidden_size)``: the layer's output at the current weights
        self.outputs = outputs

    def __call__(self, d_weights: Sequence[th.Tensor | None], d_inputs: th.Tensor | None) -> th.Tensor:
        """
        :param d_weights: Directions of ``(weight_ih, weight_hh, bias_ih, bias_hh)`` (``None``: zero)
        :param d_inputs: Direction of the inputs ``(T, n, input_size)``, or ``None`` (zero)
        :return: ``dh_t`` of every step, ``(T, n, hidden_size)``
        """
        with th.no_grad():
            return self._tangent(d_weights, d_inputs)

    def _tangent(self, d_weights: Sequence[th.Tensor | None], d_inputs: th.Tensor | None) -> th.Tensor:
        n_steps, n_seq, hidden_size = self.outputs.shape
        d_w_ih, d_w_hh, d_b_ih, d_b_hh = d_weights
        driving = self.inputs.new_zeros((n_steps * n_seq, 4 * hidden_size))
        if d_b_ih is not None:
            driving += d_b_ih
        if d_b_hh is not None:
            driving += d_b_hh
        if d_w_ih is not None:
            driving.addmm_(self.inputs, d_w_ih.t())
        if d_w_hh is not None:
            driving.addmm_(self.previous_h, d_w_hh.t())
        if d_inputs is not None:
            driving.addmm_(d_inputs.reshape(n_steps * n_seq, -1), self.w_ih.t())
        driving = driving.view(n_steps, n_seq, 4 * hidden_size)
        d_outputs = self.outputs.new_empty(self.outputs.shape)
        if self._numpy is not None:  # the same walk on NumPy views of the same memory: less overhead per operation
            with single_threaded_blas():  # OpenBLAS's threads only slow these small products down
                _walk(driving.numpy(), d_outputs.numpy(), *self._numpy)
        else:
            _walk(driving, d_outputs, *self._coefficients)
        return d_outputs


def _walk(driving: Array, d_outputs: Array, w_hh_t: Array, *coefficients: Array) -> None:
    """
    The tangent recurrence step by step, written with operators only, so that it runs on tensors and on NumPy arrays.

    :param driving: ``dW_ih x_t + W_ih dx_t + dW_hh h_{t-1} + db``, ``(T, n, 4 * hidden_size)``
    :param d_outputs: Filled with ``dh_t``, ``(T, n, hidden_size)``
    :param w_hh_t: ``W_hh`` transposed
    :param coefficients: Gate weights, forget gates, output slopes (see :class:`LSTMLayerTangent`)
    """
    gate_weight, forget, output_slope = coefficients
    n_steps, _, hidden_size = d_outputs.shape
    f_, g_, o_ = hidden_size, 2 * hidden_size, 3 * hidden_size
    d_h: Array | None = None
    d_c: Array | None = None
    for t in range(n_steps):
        weighted = (driving[t] if d_h is None else driving[t] + d_h @ w_hh_t) * gate_weight[t]
        d_cell_input = weighted[:, :f_] + weighted[:, f_:g_] + weighted[:, g_:o_]
        d_c = d_cell_input if d_c is None else d_cell_input + forget[t] * d_c
        d_h = weighted[:, o_:] + output_slope[t] * d_c
        d_outputs[t] = d_h


def make_lstm_jacobian_vector(
    policy: RecurrentActorCriticPolicy,
    params: Sequence[th.nn.Parameter],
    observations: PyTorchObs,
    states: tuple[th.Tensor, ...],
    rows: th.Tensor,
    distribution_tensors: Callable[[Distribution], tuple[th.Tensor, ...]],
) -> JacobianVector | None:
    """
    ``J v`` of the action distribution's parameters on ``rows`` of the padded sequences, at the current parameters.

    The features extractor and the heads after the LSTM (``mlp_extractor.forward_actor`` and the action
    distribution) are differentiated in forward mode (batched, no recurrence), the LSTM by :class:`LSTMLayerTangent`.
    Applies where ``get_distribution`` is sb3-contrib's (features, ``_process_sequence`` on ``lstm_actor``, heads) and
    ``lstm_actor`` supports the recurrence; the sequences must hold no episode start (resets already applied to
    ``states``). Otherwise ``None``.

    :param policy: The recurrent policy
    :param params: Actor parameters, in the order of the directions passed to the returned function
    :param observations: Padded observations of all sequences (``n_seq * max_length`` rows, sequence-major)
    :param states: Initial ``(h, c)`` of the actor's LSTM, each ``(n_layers, n_seq, hidden_size)``
    :param rows: Rows whose distribution parameters are wanted
    :param distribution_tensors: Distribution -> its parameter tensors (``distribution_params(d).tensors``)
    :return: ``(primal, jvp)``: the distribution tensors on ``rows`` recomputed through the recurrence's own forward
        pass (to check it against the policy's), and ``directions -> their tangents`` (``None`` where a tangent is
        zero); or ``None`` where the recurrence does not apply
    """
    cls = type(policy)
    if cls.get_distribution is not RecurrentActorCriticPolicy.get_distribution or not runs_as_defined(policy):
        return None
    if cls._process_sequence is not RecurrentActorCriticPolicy._process_sequence:  # type: ignore[comparison-overlap]
        return None
    lstm = policy.lstm_actor
    if not supports_tangent_recurrence(lstm):
        return None
    n_layers, n_seq = states[0].shape[:2]
    index_of = {id(p): k for k, p in enumerate(params)}
    lstm_weights = [[getattr(lstm, f"{name}_l{layer}") for name in LSTM_WEIGHTS] for layer in range(n_layers)]
    lstm_ids = {id(w) for layer in lstm_weights for w in layer}
    if {id(p) for p in lstm.parameters()} != lstm_ids:  # e.g. a reparametrised weight: its parameters are not these
        return None
    others = [p for p in params if id(p) not in lstm_ids]  # features extractor, actor network, action head, log_std
    extractor_ids = {id(p) for p in policy.pi_features_extractor.parameters()}
    extractor_moves = any(id(p) in extractor_ids for p in others)

    def extract_features() -> th.Tensor:  # as get_distribution
        return super(ActorCriticPolicy, policy).extract_features(observations, policy.pi_features_extractor)  # type: ignore[return-value]

    def heads(latent: th.Tensor) -> tuple[th.Tensor, ...]:  # as get_distribution, after the LSTM
        return distribution_tensors(policy._get_action_dist_from_latent(policy.mlp_extractor.forward_actor(latent)))

    def time_first(flat: th.Tensor) -> th.Tensor:  # as _process_sequence: (n_seq * T, k) -> (T, n_seq, k)
        return flat.reshape(n_seq, -1, flat.shape[-1]).swapaxes(0, 1)

    def batch_first(sequences: th.Tensor) -> th.Tensor:  # and back: (T, n_seq, k) -> (n_seq * T, k), then rows
        return th.flatten(sequences.transpose(0, 1), start_dim=0, end_dim=1)[rows]

    with th.no_grad():
        layer_inputs = time_first(extract_features().detach()).contiguous()
        layers = []
        for layer in range(n_layers):
            layers.append(LSTMLayerTangent(lstm_weights[layer], layer_inputs, (states[0][layer], states[1][layer])))
            layer_inputs = layers[-1].outputs
        lstm_output = batch_first(layer_inputs)
        primal = tuple(t.detach() for t in heads(lstm_output))

    def jacobian_vector(directions: Sequence[th.Tensor]) -> tuple[th.Tensor | None, ...]:
        with PROCESS_STATE_LOCK, th.no_grad(), forward_ad.dual_level():
            duals = {id(p): forward_ad.make_dual(p.detach(), directions[index_of[id(p)]]) for p in others}
            d_inputs = None
            if extractor_moves:
                with parameters_replaced(policy, duals):
                    d_features = forward_ad.unpack_dual(extract_features()).tangent
                d_inputs = None if d_features is None else time_first(d_features)
            for layer, tangent in enumerate(layers):
                d_weights = [directions[index_of[id(w)]] if id(w) in index_of else None for w in lstm_weights[layer]]
                d_inputs = tangent(d_weights, d_inputs)
            assert d_inputs is not None  # an LSTM layer always returns its tangent
            with parameters_replaced(policy, duals):
                outputs = heads(forward_ad.make_dual(lstm_output, batch_first(d_inputs)))
            return tuple(forward_ad.unpack_dual(out).tangent for out in outputs)

    return primal, jacobian_vector
