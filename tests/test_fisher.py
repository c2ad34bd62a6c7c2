"""The Fisher-vector product of the trust-region step against an explicitly formed Fisher matrix."""

import pytest
import torch as th

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.policy_utils import distribution_params
from tests.helpers import TINY, detached_copy, make_identity_env, sample_observations, summed_kl, torch_distribution

CASES = {
    "diag_gaussian": ("box", False),
    "gsde": ("box", True),
    "categorical": ("discrete", False),
    "multicategorical": ("multidiscrete", False),
    "bernoulli": ("multibinary", False),
}


def explicit_fisher(model: TRPO, params: list[th.nn.Parameter], observations: th.Tensor) -> th.Tensor:
    """Hessian of the mean KL(old || new) at new = old, formed column by column by double backpropagation
    through torch's own ``kl_divergence`` (independent of the package's KL formulas)."""
    old = [detached_copy(d) for d in torch_distribution(model, observations)]
    mean_kl = summed_kl(old, torch_distribution(model, observations)).mean()
    grads = th.autograd.grad(mean_kl, params, create_graph=True)
    flat = th.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = th.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(th.cat([(th.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(row, params)]))
    return th.stack(rows)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fisher_vector_product_matches_explicit_fisher(case: str) -> None:
    kind, use_sde = CASES[case]
    env = make_identity_env(kind)
    model = TRPO("MlpPolicy", env, n_steps=16, policy_kwargs=TINY, use_sde=use_sde, cg_damping=0.1, seed=1)
    if use_sde:
        model.policy.reset_noise()
    observations = th.as_tensor(sample_observations(env.observation_space, 32), dtype=th.float32)
    params, _ = model._split_parameters(observations)

    fisher = explicit_fisher(model, params, observations)
    scale = fisher.abs().max().item()
    assert th.allclose(fisher, fisher.T, atol=1e-5 * scale)
    # a Fisher matrix is positive semi-definite
    assert th.linalg.eigvalsh(fisher.double()).min() > -1e-5 * scale

    new = distribution_params(model.policy.get_distribution(observations))
    fvp = model._fisher_vector_product_fn(params, new, new.detach())
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(fisher.shape[0], generator=generator)
        expected = fisher.double() @ v.double() + model.cg_damping * v.double()
        error = th.linalg.norm(fvp(v).double() - expected) / th.linalg.norm(expected)
        assert error < 1e-5
