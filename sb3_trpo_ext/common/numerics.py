"""
Small, pure numerical building blocks of TRPO.

Every function here is free of SB3 state: it takes tensors (or callables on tensors) and returns tensors,
so each can be tested against a direct computation (``torch.linalg.solve``, an explicit Fisher matrix).

Notation follows Schulman et al. (2015), "Trust Region Policy Optimization", https://arxiv.org/abs/1502.05477:
``g`` is the gradient of the surrogate, ``F`` the Fisher information matrix (the Hessian of the mean KL at the
old parameters), ``delta`` the trust-region radius (``target_kl``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch as th


# --------------------------------------------------------------------------------------------------------------
# Flat parameter helpers
# --------------------------------------------------------------------------------------------------------------
def flat_parameters(params: Sequence[th.Tensor]) -> th.Tensor:
    """
    Concatenate parameters into one detached flat vector (a copy: later changes to ``params`` do not affect it).

    :param params: Tensors to flatten, in a fixed order
    :return: Flat vector of all their elements
    """
    return th.nn.utils.parameters_to_vector([p.detach() for p in params]).clone()


@th.no_grad()
def assign_flat_parameters(params: Sequence[th.Tensor], flat: th.Tensor) -> None:
    """
    Write a flat vector back into parameters, in place (``copy_`` under ``no_grad``: no ``param.data`` swap,
    so optimizers and hooks keep referring to the same tensors).

    :param params: Parameters to overwrite, in the order used by :func:`flat_parameters`
    :param flat: Flat vector with as many elements as all ``params`` together
    """
    n_total = sum(p.numel() for p in params)
    if flat.numel() != n_total:
        raise ValueError(f"flat vector has {flat.numel()} elements, the parameters have {n_total}")
    offset = 0
    for param in params:
        n = param.numel()
        param.copy_(flat[offset : offset + n].view_as(param))
        offset += n


def flat_grad(
    output: th.Tensor,
    params: Sequence[th.Tensor],
    retain_graph: bool = False,
    create_graph: bool = False,
) -> th.Tensor:
    """
    Gradient of a scalar with respect to ``params``, flattened. Parameters the output does not depend on get zeros.

    :param output: Scalar to differentiate
    :param params: Parameters to differentiate with respect to
    :param retain_graph: Keep the graph for further differentiation
    :param create_graph: Build a graph of the gradient itself (for higher-order derivatives)
    :return: Flat gradient vector
    """
    grads = th.autograd.grad(output, params, retain_graph=retain_graph, create_graph=create_graph, allow_unused=True)
    return th.cat([(th.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def tracked_tensors(tensors: Sequence[th.Tensor]) -> list[int]:
    """
    Indices of the tensors attached to the autograd graph. A distribution tensor that no trainable parameter moves
    (a frozen ``log_std``) is not; its Jacobian is zero, and autograd refuses to differentiate it.
    """
    return [k for k, t in enumerate(tensors) if t.requires_grad]


def jacobian_transpose_vector(new: DistParams, params: Sequence[th.Tensor], weights: Sequence[th.Tensor]) -> th.Tensor:
    """
    ``J^T w``, flat: one backward pass from the distribution tensors of ``new`` (kept for further passes), the
    tensors outside the graph (:func:`tracked_tensors`) left out. Parameters they do not depend on get zeros.

    :param new: Distribution parameters attached to the graph
    :param params: Parameters ``J`` is taken with respect to
    :param weights: One ``w`` per tensor of ``new``
    """
    tracked = tracked_tensors(new.tensors)
    if not tracked:
        return th.cat([th.zeros_like(p).reshape(-1) for p in params])
    grads = th.autograd.grad(
        [new.tensors[k] for k in tracked],
        params,
        grad_outputs=[weights[k] for k in tracked],
        retain_graph=True,
        allow_unused=True,
    )
    return th.cat([(th.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


# --------------------------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CGResult:
    """
    Outcome of :func:`conjugate_gradient`.

    :param x: Approximate solution of ``A x = b``
    :param iterations: Number of matrix-vector products used
    :param residual_norm: Euclidean norm of the final residual ``b - A x``
    :param curvature_failure: True if a search direction with ``p^T A p <= 0`` (or non-finite) was met;
        ``x`` is then the last iterate before that direction
    """

    x: th.Tensor
    iterations: int
    residual_norm: float
    curvature_failure: bool


def conjugate_gradient(
    matvec: Callable[[th.Tensor], th.Tensor],
    b: th.Tensor,
    max_iter: int,
    residual_tol: float = 1e-10,
) -> CGResult:
    """
    Solve ``A x = b`` for a symmetric positive definite ``A`` known only through ``matvec(v) = A v``
    (Hestenes and Stiefel, 1952; Nocedal and Wright, Numerical Optimization, Algorithm 5.2).

    Starts at ``x0 = 0`` (so the first residual is ``b`` itself and no random numbers are drawn), and stops after
    ``max_iter`` products, when the squared residual norm drops below ``residual_tol``, or on a direction of
    non-positive curvature.

    :param matvec: Function computing ``A v``
    :param b: Right-hand side
    :param max_iter: Maximal number of iterations (matrix-vector products), at least 1
    :param residual_tol: Early-stopping threshold on the squared residual norm ``||b - A x||^2``
    :return: The solution and how it was reached
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    x = th.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = th.dot(residual, residual).item()
    iterations = 0
    curvature_failure = False
    while iterations < max_iter and residual_sq >= residual_tol:
        a_dir = matvec(direction)
        iterations += 1
        curvature = th.dot(direction, a_dir).item()
        if not math.isfinite(curvature) or curvature <= 0.0:
            curvature_failure = True
            break
        alpha = residual_sq / curvature
        x.add_(direction, alpha=alpha)
        residual.sub_(a_dir, alpha=alpha)
        new_residual_sq = th.dot(residual, residual).item()
        # Fletcher-Reeves update of the conjugate direction
        direction.mul_(new_residual_sq / residual_sq).add_(residual)
        residual_sq = new_residual_sq
    return CGResult(x=x, iterations=iterations, residual_norm=math.sqrt(residual_sq), curvature_failure=curvature_failure)


# --------------------------------------------------------------------------------------------------------------
# Trust-region step
# --------------------------------------------------------------------------------------------------------------
def maximal_step_size(x: th.Tensor, fisher_x: th.Tensor, max_kl: float) -> float:
    """
    Largest multiple ``beta`` of the search direction ``x`` that stays on the quadratic trust region
    ``1/2 (beta x)^T F (beta x) = delta``, i.e. ``beta = sqrt(2 delta / x^T F x)`` (TRPO paper, Appendix C).

    :param x: Search direction (approximately ``F^-1 g``)
    :param fisher_x: ``F x``
    :param max_kl: Trust-region radius ``delta``
    :return: ``beta``, or ``nan`` when ``x^T F x`` is not a positive finite number (a degenerate direction)
    """
    shs = th.dot(x, fisher_x).item()
    if not math.isfinite(shs) or shs <= 0.0:
        return math.nan
    return math.sqrt(2.0 * max_kl / shs)


# --------------------------------------------------------------------------------------------------------------
# Distributions in a canonical parametrisation
# --------------------------------------------------------------------------------------------------------------
# TRPO only needs three things from the action distribution: log-probabilities (from SB3's own distribution),
# KL(old || new), and the Fisher information of the distribution parameters. We represent each SB3 distribution by
# a tuple of tensors of shape (batch, k) in a parametrisation where the Fisher information is analytic:
#   "gaussian":    (mean, log_std)                        Fisher: diag(1 / std^2) for mean, 2 for log_std
#   "categorical": (normalised logits of each component)  Fisher: diag(p) - p p^T per component
#   "bernoulli":   (logits,)                              Fisher: p (1 - p)
GAUSSIAN = "gaussian"
CATEGORICAL = "categorical"
BERNOULLI = "bernoulli"


@dataclass(frozen=True)
class DistParams:
    """
    Parameters of a batch of action distributions in the canonical parametrisation described above.

    :param kind: One of ``"gaussian"``, ``"categorical"``, ``"bernoulli"``
    :param tensors: The parameter tensors, each of shape ``(batch, k)``; for ``"categorical"`` one tensor of
        normalised logits per action component
    """

    kind: str
    tensors: tuple[th.Tensor, ...]

    def detach(self) -> DistParams:
        """:return: The same parameters cut from the autograd graph."""
        return DistParams(self.kind, tuple(t.detach() for t in self.tensors))


def kl_old_new(old: DistParams, new: DistParams) -> th.Tensor:
    """
    KL(old || new) for each sample of the batch, summed over action dimensions.

    This is the direction of the TRPO paper's constraint, ``E_s[KL(pi_old(.|s) || pi_new(.|s))] <= delta``:
    the expectation over the data-collecting policy of how much information is lost by replacing it.
    (sb3-contrib computes KL(new || old); both have the same Hessian at ``new == old``, but only this one is
    the paper's constraint when the line search checks a finite step.)

    :param old: Distribution parameters of the policy that collected the data (detached)
    :param new: Distribution parameters of the candidate policy
    :return: Tensor of shape ``(batch,)``
    """
    if old.kind == GAUSSIAN:
        mean_o, log_std_o = old.tensors
        mean_n, log_std_n = new.tensors
        var_ratio = th.exp(2.0 * (log_std_o - log_std_n))
        mahalanobis = ((mean_o - mean_n) * th.exp(-log_std_n)) ** 2
        return 0.5 * (var_ratio + mahalanobis - 1.0).sum(dim=1) - (log_std_o - log_std_n).sum(dim=1)
    if old.kind == CATEGORICAL:
        total = th.zeros(old.tensors[0].shape[0], dtype=old.tensors[0].dtype, device=old.tensors[0].device)
        for logits_o, logits_n in zip(old.tensors, new.tensors):
            # Zero-probability actions contribute 0 (p log p -> 0), even where the log is -inf (masked actions).
            p_o = logits_o.exp()
            diff = th.where(p_o > 0, logits_o - logits_n, th.zeros_like(logits_o))
            total = total + (p_o * diff).sum(dim=1)
        return total
    if old.kind == BERNOULLI:
        (logits_o,) = old.tensors
        (logits_n,) = new.tensors
        p_o = th.sigmoid(logits_o)
        log_p_o, log_q_o = th.nn.functional.logsigmoid(logits_o), th.nn.functional.logsigmoid(-logits_o)
        log_p_n, log_q_n = th.nn.functional.logsigmoid(logits_n), th.nn.functional.logsigmoid(-logits_n)
        return (p_o * (log_p_o - log_p_n) + (1.0 - p_o) * (log_q_o - log_q_n)).sum(dim=1)
    raise ValueError(f"unknown distribution kind {old.kind!r}")


def fisher_weight_operator(old: DistParams) -> Callable[[Sequence[th.Tensor]], tuple[th.Tensor, ...]]:
    """
    ``u -> M u``: the analytic Fisher information ``M`` of each sample's distribution, evaluated at ``old``, the
    middle factor of the Gauss-Newton form ``F = J^T M J / N``. Its per-sample weights (the probabilities, the
    inverse variances) are computed once, here, and reused by every conjugate-gradient iteration: ``old`` does not
    move during an update. (Masked categorical logits make this worth it: ``exp`` of ``-1e8`` takes a slow path.)

    :param old: Distribution parameters at which ``M`` is evaluated
    :return: The function mapping a tangent ``u`` (one tensor per tensor of ``old``) to ``M u``
    """
    if old.kind == GAUSSIAN:
        _, log_std = old.tensors
        inverse_variance = th.exp(-2.0 * log_std)

        def gaussian(u: Sequence[th.Tensor]) -> tuple[th.Tensor, ...]:
            u_mean, u_log_std = u
            return (u_mean * inverse_variance, 2.0 * u_log_std)

        return gaussian
    if old.kind == CATEGORICAL:
        probabilities = [logits.exp() for logits in old.tensors]

        def categorical(u: Sequence[th.Tensor]) -> tuple[th.Tensor, ...]:
            # (diag(p) - p p^T) u for each component
            return tuple(p * u_i - p * (p * u_i).sum(dim=1, keepdim=True) for p, u_i in zip(probabilities, u))

        return categorical
    if old.kind == BERNOULLI:
        (logits,) = old.tensors
        p = th.sigmoid(logits)
        variance = p * (1.0 - p)

        def bernoulli(u: Sequence[th.Tensor]) -> tuple[th.Tensor, ...]:
            (u_logits,) = u
            return (variance * u_logits,)

        return bernoulli
    raise ValueError(f"unknown distribution kind {old.kind!r}")


def fisher_weight_product(old: DistParams, u: Sequence[th.Tensor]) -> tuple[th.Tensor, ...]:
    """
    Multiply a tangent ``u`` of the distribution parameters by the analytic Fisher information ``M`` of each
    sample's distribution, evaluated at ``old`` (:func:`fisher_weight_operator`, for a single product).

    :param old: Distribution parameters at which ``M`` is evaluated
    :param u: Tangent, one tensor per tensor of ``old``
    :return: ``M u``, one tensor per tensor of ``old``
    """
    return fisher_weight_operator(old)(u)
