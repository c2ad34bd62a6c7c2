"""Conjugate gradient, the trust-region step size and the flat-parameter helpers against direct computations."""

import math

import pytest
import torch as th

from sb3_trpo_ext.common.numerics import (
    assign_flat_parameters,
    conjugate_gradient,
    flat_parameters,
    maximal_step_size,
)


def random_spd(n: int, condition: float, generator: th.Generator) -> th.Tensor:
    q, _ = th.linalg.qr(th.randn(n, n, dtype=th.float64, generator=generator))
    eigenvalues = th.logspace(0, math.log10(condition), n, dtype=th.float64)
    return q @ th.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("n", [1, 5, 30])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conjugate_gradient_matches_direct_solve(n: int, seed: int) -> None:
    generator = th.Generator().manual_seed(seed)
    a = random_spd(n, condition=50.0, generator=generator)
    b = th.randn(n, dtype=th.float64, generator=generator)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=10 * n, residual_tol=1e-20)
    expected = th.linalg.solve(a, b)
    th.testing.assert_close(result.x, expected, rtol=1e-8, atol=1e-10)
    assert result.residual_norm == pytest.approx(th.linalg.norm(b - a @ result.x).item(), abs=1e-9)
    assert not result.curvature_failure


def test_conjugate_gradient_converges_in_at_most_n_steps_and_stops_early() -> None:
    generator = th.Generator().manual_seed(3)
    n = 8
    a = random_spd(n, condition=10.0, generator=generator)
    b = th.randn(n, dtype=th.float64, generator=generator)
    calls = []

    def matvec(v: th.Tensor) -> th.Tensor:
        calls.append(1)
        return a @ v

    result = conjugate_gradient(matvec, b, max_iter=100, residual_tol=1e-16)
    # In exact arithmetic CG terminates in n steps; the tolerance stops it long before max_iter
    assert result.iterations <= n + 2
    assert len(calls) == result.iterations
    assert result.residual_norm**2 < 1e-16


def test_conjugate_gradient_respects_max_iter() -> None:
    generator = th.Generator().manual_seed(4)
    a = random_spd(20, condition=1e4, generator=generator)
    b = th.randn(20, dtype=th.float64, generator=generator)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=3, residual_tol=0.0)
    assert result.iterations == 3
    # Three steps of CG minimise the A-norm of the error over a Krylov space: better than x0 = 0, short of x*
    solution = th.linalg.solve(a, b)

    def a_norm(e: th.Tensor) -> float:
        return (e @ a @ e).item()

    assert 0 < a_norm(result.x - solution) < a_norm(solution)
    assert result.residual_norm > 0


def test_conjugate_gradient_starts_at_zero_and_draws_no_random_numbers() -> None:
    a = th.eye(4, dtype=th.float64) * 2.0
    b = th.zeros(4, dtype=th.float64)
    state = th.random.get_rng_state()
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=5)
    assert th.equal(th.random.get_rng_state(), state)
    # b = 0: the residual of x0 = 0 is already zero, no product is needed
    assert result.iterations == 0
    assert th.equal(result.x, th.zeros(4, dtype=th.float64))


def test_conjugate_gradient_reports_non_positive_curvature() -> None:
    a = -th.eye(3, dtype=th.float64)
    b = th.ones(3, dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=5)
    assert result.curvature_failure
    assert th.all(th.isfinite(result.x))
    assert th.equal(result.x, th.zeros(3, dtype=th.float64))


def test_maximal_step_size_puts_the_step_on_the_quadratic_trust_region() -> None:
    generator = th.Generator().manual_seed(5)
    f = random_spd(6, condition=20.0, generator=generator)
    x = th.randn(6, dtype=th.float64, generator=generator)
    delta = 0.01
    beta = maximal_step_size(x, f @ x, delta)
    step = beta * x
    assert 0.5 * (step @ f @ step).item() == pytest.approx(delta, rel=1e-12)


@pytest.mark.parametrize("bad_curvature", [0.0, -1.0, math.nan, math.inf])
def test_maximal_step_size_is_nan_for_degenerate_directions(bad_curvature: float) -> None:
    x = th.ones(1, dtype=th.float64)
    assert math.isnan(maximal_step_size(x, th.tensor([bad_curvature], dtype=th.float64), 0.01))


def test_flat_parameter_round_trip_is_bit_exact_and_in_place() -> None:
    module = th.nn.Sequential(th.nn.Linear(3, 4), th.nn.Tanh(), th.nn.Linear(4, 2))
    params = list(module.parameters())
    storages = [p.data_ptr() for p in params]
    saved = flat_parameters(params)
    assign_flat_parameters(params, saved + 1.0)
    assert not th.equal(flat_parameters(params), saved)
    assign_flat_parameters(params, saved)
    assert th.equal(flat_parameters(params), saved)
    assert [p.data_ptr() for p in params] == storages  # same tensors: optimizers keep tracking them
    with pytest.raises(ValueError, match="elements"):
        assign_flat_parameters(params, saved[:-1])
