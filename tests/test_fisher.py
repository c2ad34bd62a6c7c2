"""The Fisher-vector product of the trust-region step against an explicitly formed Fisher matrix."""

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.envs import IdentityEnvBox

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


def tiny_model_and_observations(kind: str, use_sde: bool) -> tuple[TRPO, th.Tensor]:
    """A tiny TRPO on an identity environment of ``kind`` and 32 sampled observations."""
    env = make_identity_env(kind)
    model = TRPO("MlpPolicy", env, n_steps=16, policy_kwargs=TINY, use_sde=use_sde, cg_damping=0.1, seed=1)
    if use_sde:
        model.policy.reset_noise()
    return model, th.as_tensor(sample_observations(env.observation_space, 32), dtype=th.float32)


def assert_product_matches(fvp: Any, fisher: th.Tensor, damping: float) -> None:
    """``fvp(v)`` equals ``(fisher + damping I) v`` to 1e-5 relative error on three random vectors."""
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(fisher.shape[0], generator=generator)
        expected = fisher.double() @ v.double() + damping * v.double()
        error = th.linalg.norm(fvp(v).double() - expected) / th.linalg.norm(expected)
        assert error < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_fisher_vector_product_matches_explicit_fisher(case: str) -> None:
    model, observations = tiny_model_and_observations(*CASES[case])
    params, _ = model._split_parameters(observations)

    fisher = explicit_fisher(model, params, observations)
    scale = fisher.abs().max().item()
    assert th.allclose(fisher, fisher.T, atol=1e-5 * scale)
    # a Fisher matrix is positive semi-definite
    assert th.linalg.eigvalsh(fisher.double()).min() > -1e-5 * scale

    new = distribution_params(model.policy.get_distribution(observations))
    assert_product_matches(model._fisher_vector_product_fn(params, new, new.detach()), fisher, model.cg_damping)


@pytest.mark.parametrize(
    "policy_kwargs",
    [{"net_arch": [8, 8]}, {"net_arch": [8], "activation_fn": th.nn.ReLU}, {"net_arch": []}, {"net_arch": [64, 64]}],
    ids=["tanh", "relu", "linear", "default-size"],
)
@pytest.mark.parametrize("kind", ["box", "discrete"])
def test_written_out_mlp_fisher_product_matches_generic_and_explicit_fisher(policy_kwargs: dict, kind: str) -> None:
    from sb3_trpo_ext.common.mlp_fisher import MlpFisher

    env = IdentityEnvBox(ep_length=20) if kind == "box" else BoxObsDiscreteActionEnv()
    model = TRPO("MlpPolicy", env, n_steps=16, batch_size=16, policy_kwargs=policy_kwargs, seed=2)
    model.learn(32)  # move away from the initialisation
    observations = th.as_tensor(sample_observations(env.observation_space, 64), dtype=th.float32)
    params, _ = model._split_parameters(observations)
    new = distribution_params(model.policy.get_distribution(observations))
    generic = model._fisher_vector_product_fn(params, new, new.detach())
    fast = model._fisher_vector_product_fn(params, new, new.detach(), observations)
    assert isinstance(fast, MlpFisher)
    fisher = explicit_fisher(model, params, observations).double() if policy_kwargs["net_arch"] != [64, 64] else None
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(sum(p.numel() for p in params), generator=generator)
        reference = generic(v).double()
        assert (th.linalg.norm(fast(v).double() - reference) / th.linalg.norm(reference)).item() < 1e-5
        if fisher is not None:
            expected = fisher @ v.double() + model.cg_damping * v.double()
            assert (th.linalg.norm(fast(v).double() - expected) / th.linalg.norm(expected)).item() < 1e-5


def test_written_out_mlp_fisher_product_is_not_used_for_other_actors() -> None:
    from sb3_trpo_ext.common.mlp_fisher import MlpFisher

    for kind, use_sde in [("box", True), ("multidiscrete", False), ("multibinary", False), ("discrete", False)]:
        env = make_identity_env(kind)  # "discrete" has Discrete observations: one-hot preprocessing, not a flat Box
        model = TRPO("MlpPolicy", env, n_steps=16, batch_size=16, policy_kwargs=TINY, use_sde=use_sde)
        observations = th.as_tensor(sample_observations(env.observation_space, 8), dtype=th.float32)
        params, _ = model._split_parameters(observations)
        assert MlpFisher.build(model.policy, env.observation_space, use_sde, params) is None


class BoxObsDiscreteActionEnv(gym.Env):
    """Box observations and Discrete actions (CartPole's kind of spaces), tiny and fast."""

    observation_space = spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
    action_space = spaces.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: object) -> tuple:
        return self.observation_space.sample(), float(action == 0), False, False, {}


def _freeze_log_std(policy: th.nn.Module) -> None:
    policy.log_std.requires_grad_(False)


def _freeze_mean(policy: th.nn.Module) -> None:
    for p in [*policy.mlp_extractor.policy_net.parameters(), *policy.action_net.parameters()]:
        p.requires_grad_(False)


@pytest.mark.parametrize("freeze", [_freeze_log_std, _freeze_mean], ids=["log_std", "mean"])
@pytest.mark.parametrize("use_sde", [False, True], ids=["gaussian", "gsde"])
def test_fisher_product_with_a_frozen_distribution_tensor_is_the_block_of_the_trainable_parameters(
    freeze: object, use_sde: bool
) -> None:
    # Frozen log_std: one distribution tensor (the std) no trainable parameter moves; autograd cannot differentiate it
    model, observations = tiny_model_and_observations("box", use_sde)
    all_params, _ = model._split_parameters(observations)
    fisher = explicit_fisher(model, all_params, observations)

    freeze(model.policy)  # type: ignore[operator]
    model._reset_parameter_caches()
    params, _ = model._split_parameters(observations)
    assert 0 < len(params) < len(all_params)
    keep = th.cat([th.full((p.numel(),), any(p is q for q in params)) for p in all_params])
    new = distribution_params(model.policy.get_distribution(observations))
    assert not all(t.requires_grad for t in new.tensors)
    fvp = model._fisher_vector_product_fn(params, new, new.detach())
    assert_product_matches(fvp, fisher[keep][:, keep], model.cg_damping)
