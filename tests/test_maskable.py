"""MaskableTRPO: invalid actions are never sampled and carry no probability, the trust-region step works on the masked
distributions (surrogate, KL, Fisher-vector product, line search), and it learns sb3-contrib's masking test tasks."""

import json
import os
import zipfile
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiBinary, InvalidActionEnvMultiDiscrete
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from sb3_contrib.common.maskable.utils import get_action_masks
from sb3_contrib.common.wrappers import ActionMasker
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvBox
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize

from sb3_trpo_ext.common.numerics import DistParams
from sb3_trpo_ext.common.policy_utils import distribution_params
from sb3_trpo_ext.maskable import MaskableTRPO
from sb3_trpo_ext.maskable.masks import make_mask_getter
from sb3_trpo_ext.trpo.trpo import TRPO
from tests.helpers import TINY

KINDS = ["discrete", "multidiscrete", "multibinary"]


def make_masked_env(kind: str, n_invalid: int | None = None) -> gym.Env:
    """sb3-contrib's masking test environments, with many invalid actions by default."""
    if kind == "discrete":
        return InvalidActionEnvDiscrete(dim=10, n_invalid_actions=7 if n_invalid is None else n_invalid)
    if kind == "multidiscrete":
        return InvalidActionEnvMultiDiscrete(dims=[3, 4], n_invalid_actions=4 if n_invalid is None else n_invalid)
    if kind == "multibinary":
        return InvalidActionEnvMultiBinary(dims=3, n_invalid_actions=2 if n_invalid is None else n_invalid)
    raise ValueError(kind)


def component_masks(model: MaskableTRPO, masks: th.Tensor) -> list[th.Tensor]:
    """Split flat masks into one boolean tensor per categorical component of the action space."""
    space = model.action_space
    if isinstance(space, gym.spaces.Discrete):
        sizes = [int(space.n)]
    elif isinstance(space, gym.spaces.MultiDiscrete):
        sizes = [int(n) for n in space.nvec]
    else:
        sizes = [2] * int(space.n)  # type: ignore[arg-type]
    return list(th.split(masks.bool(), sizes, dim=1))


def masked_torch_distributions(
    model: MaskableTRPO, observations: th.Tensor, masks: th.Tensor
) -> list[th.distributions.Categorical]:
    """The masked policy as plain torch Categoricals, invalid outcomes at probability exactly 0 (torch's own KL then)."""
    distribution = model.policy.get_distribution(observations, action_masks=masks)
    logits = distribution_params(distribution).tensors
    out = []
    for component_logits, component_mask in zip(logits, component_masks(model, masks)):
        probs = th.where(component_mask, component_logits.exp(), th.zeros_like(component_logits))
        out.append(th.distributions.Categorical(probs=probs))
    return out


def collected(kind: str, **kwargs: object) -> MaskableTRPO:
    kwargs.setdefault("policy_kwargs", TINY)
    model = MaskableTRPO("MlpPolicy", make_masked_env(kind), n_steps=64, batch_size=32, seed=0, **kwargs)  # type: ignore[arg-type]
    model.learn(64)
    return model


def buffer_batch(model: MaskableTRPO) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
    data = next(model.rollout_buffer.get(batch_size=None))
    actions = data.actions.long().flatten() if isinstance(model.action_space, gym.spaces.Discrete) else data.actions
    advantages = (data.advantages - data.advantages.mean()) / (data.advantages.std() + 1e-8)
    return data.observations, actions, data.old_log_prob, advantages, data.action_masks


class ValidityChecker(gym.Wrapper):
    """Counts actions that the wrapped environment's own mask declared invalid at the time they were taken."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.violations = 0
        self.steps = 0

    def step(self, action: object) -> tuple:
        valid = np.asarray(self.env.unwrapped.action_masks(), dtype=bool)  # type: ignore[attr-defined]
        flat = np.atleast_1d(np.asarray(action))
        space = self.env.action_space
        if isinstance(space, gym.spaces.Discrete):
            chosen = [int(flat[0])]
        elif isinstance(space, gym.spaces.MultiDiscrete):
            chosen = list(np.concatenate([[0], np.cumsum(space.nvec)[:-1]]) + flat)
        else:
            chosen = list(2 * np.arange(len(flat)) + flat)
        self.violations += int(not valid[np.asarray(chosen, dtype=int)].all())
        self.steps += 1
        return self.env.step(action)

    def action_masks(self) -> list[bool]:
        return self.env.unwrapped.action_masks()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------------
# Invalid actions: never sampled, no probability mass
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_actions_are_never_sampled_during_training_with_several_envs(kind: str) -> None:
    env = make_vec_env(lambda: make_masked_env(kind), n_envs=2, wrapper_class=ValidityChecker)
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, policy_kwargs=TINY, target_kl=0.1, seed=0)
    model.learn(1536)  # 12 updates: the policy moves, and the masks still hold
    checkers = [e for e in env.envs]  # type: ignore[attr-defined]
    assert sum(c.steps for c in checkers) == 1536
    assert sum(c.violations for c in checkers) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_predict_never_returns_a_masked_action(kind: str) -> None:
    env = ValidityChecker(make_masked_env(kind))
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, policy_kwargs=TINY, seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(500):
        action, _ = model.predict(obs, action_masks=get_action_masks(env), deterministic=False)
        obs, *_ = env.step(action)
    assert env.violations == 0


@pytest.mark.parametrize("kind", KINDS)
def test_predict_rejects_masks_for_another_number_of_observations(kind: str) -> None:
    env = make_masked_env(kind)
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, policy_kwargs=TINY, seed=0)
    obs, _ = env.reset(seed=0)
    mask = np.asarray(get_action_masks(env))
    batch = np.stack([obs] * 3)
    model.predict(obs, action_masks=mask)  # one observation, one mask
    model.predict(batch, action_masks=np.stack([mask] * 3))  # a batch, a mask per observation
    with pytest.raises(ValueError, match=r"Action masks of shape .* entries per observation for 3 observations"):
        model.predict(batch, action_masks=mask)  # sb3-contrib's MaskablePPO: a RuntimeError from a reshape
    with pytest.raises(ValueError, match=r"Action masks of shape .* entries per observation for 1 observation$"):
        model.predict(obs, action_masks=np.stack([mask, mask]))


def test_predict_with_masks_takes_observations_as_lists_and_python_numbers_as_sb3_does() -> None:
    # SB3's predict turns lists, tuples and numbers into arrays; counting the observations must do so too
    env = InvalidActionEnvDiscrete(dim=10, n_invalid_actions=3)
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, policy_kwargs=TINY, seed=0)
    obs, _ = env.reset(seed=0)
    mask = np.asarray(get_action_masks(env))
    expected, _ = model.predict(obs, action_masks=mask, deterministic=True)
    assert model.predict(obs.tolist(), action_masks=mask, deterministic=True)[0] == expected
    batch, _ = model.predict([obs.tolist()] * 2, action_masks=np.stack([mask] * 2), deterministic=True)
    assert batch.tolist() == [expected] * 2
    dict_model = MaskableTRPO("MultiInputPolicy", DiscreteDictMaskedEnv(), n_steps=64, batch_size=64, policy_kwargs=TINY)
    dict_action, _ = dict_model.predict({"position": 2, "goal": [1.0]}, action_masks=np.array([True, False, True]))
    assert dict_action in (0, 2)


class DiscreteDictMaskedEnv(gym.Env):
    """Dict observations with a Discrete entry, which a raw env returns as a Python int."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Dict(
            {"position": gym.spaces.Discrete(4), "goal": gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)}
        )
        self.action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        return {"position": 0, "goal": np.zeros(1, dtype=np.float32)}, {}

    def step(self, action: int) -> tuple[dict, float, bool, bool, dict]:
        return {"position": 0, "goal": np.zeros(1, dtype=np.float32)}, 0.0, True, False, {}

    def action_masks(self) -> np.ndarray:
        return np.array([True, False, True])


@pytest.mark.parametrize("kind", KINDS)
def test_masked_actions_have_exactly_zero_probability_after_updates(kind: str) -> None:
    model = collected(kind, target_kl=0.1)
    for _ in range(3):
        model.train()
    observations, actions, _, _, masks = buffer_batch(model)
    with th.no_grad():
        for dist, mask in zip(masked_torch_distributions(model, observations, masks), component_masks(model, masks)):
            assert th.all(dist.probs[~mask] == 0.0)
            assert th.all(dist.probs[mask] > 0.0)
        log_prob = model.policy.get_distribution(observations, action_masks=masks).log_prob(actions)
    assert th.isfinite(log_prob).all()  # every action taken during the rollout was a valid one


# --------------------------------------------------------------------------------------------------------------
# The trust-region step on the masked distributions
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_accepted_step_satisfies_the_trust_region_of_the_masked_policy(kind: str) -> None:
    target_kl = 0.02
    model = collected(kind, target_kl=target_kl, cg_damping=0.01)
    observations, _, _, _, masks = buffer_batch(model)
    accepted = 0
    for _ in range(3):
        old = [
            th.distributions.Categorical(probs=d.probs.detach())
            for d in masked_torch_distributions(model, observations, masks)
        ]
        model.logger.dump()
        model.train()
        values = model.logger.name_to_value
        if values["train/line_search_success"] == 1.0:
            accepted += 1
            with th.no_grad():
                new = masked_torch_distributions(model, observations, masks)
                # torch's kl_divergence: masked outcomes have p_old = 0 and contribute 0
                kl = sum(th.distributions.kl_divergence(o, n) for o, n in zip(old, new)).mean().item()  # type: ignore[union-attr]
            assert kl <= target_kl * (1 + 1e-5)
            assert values["train/kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
            assert values["train/surrogate_after"] > values["train/surrogate_before"]
    assert accepted > 0


def test_unmasked_kl_would_differ_so_the_masks_reach_the_line_search() -> None:
    model = MaskableTRPO("MlpPolicy", make_masked_env("discrete"), n_steps=64, batch_size=64, policy_kwargs=TINY, seed=0)
    _, callback = model._setup_learn(64, None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, 64)  # type: ignore[arg-type]
    observations, actions, old_log_prob, advantages, masks = buffer_batch(model)
    model._action_masks = masks
    masked_surrogate, masked_params = model._surrogate(observations, actions, old_log_prob, advantages)
    model._action_masks = None
    plain_surrogate, plain_params = model._surrogate(observations, actions, old_log_prob, advantages)
    # The log-probabilities stored by the rollout are the masked policy's: at the same parameters, its ratio is 1
    assert masked_surrogate.item() == pytest.approx(advantages.mean().item(), abs=1e-6)
    plain_log_prob = model.policy.get_distribution(observations).log_prob(actions)
    assert not th.allclose(plain_log_prob, old_log_prob, atol=1e-3)
    assert th.allclose(plain_surrogate, (th.exp(plain_log_prob - old_log_prob) * advantages).mean())
    assert not th.allclose(masked_params.tensors[0].exp(), plain_params.tensors[0].exp())


@pytest.mark.parametrize("through_surrogate", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_fisher_vector_product_matches_explicit_fisher_of_the_masked_policy(kind: str, through_surrogate: bool) -> None:
    """Both products: J through the masking (the generic one), and J of the logits before masking, which the policy
    step uses after its surrogate (the same matrix: M is zero where masking acts, and blind to the normalisations)."""
    model = collected(kind, policy_kwargs={"net_arch": [4]})
    observations, actions, old_log_prob, advantages, masks = buffer_batch(model)
    observations, actions, old_log_prob, advantages, masks = (
        t[:24] for t in (observations, actions, old_log_prob, advantages, masks)
    )
    params, _ = model._split_parameters(observations)
    old = [
        th.distributions.Categorical(probs=d.probs.detach()) for d in masked_torch_distributions(model, observations, masks)
    ]
    mean_kl = sum(
        th.distributions.kl_divergence(o, n) for o, n in zip(old, masked_torch_distributions(model, observations, masks))
    )
    grads = th.autograd.grad(mean_kl.mean(), params, create_graph=True)  # type: ignore[union-attr]
    flat = th.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = th.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(th.cat([(th.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(row, params)]))
    fisher = th.stack(rows).double()

    model._action_masks = masks
    if through_surrogate:  # as in the policy step
        _, new = model._surrogate(observations, actions, old_log_prob, advantages)
        assert model._unmasked is not None
    else:
        new = distribution_params(model.policy.get_distribution(observations, action_masks=masks))
    fvp = model._fisher_vector_product_fn(params, new, new.detach())
    assert model._unmasked is None  # consumed by the product
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(fisher.shape[0], generator=generator)
        expected = fisher @ v.double() + model.cg_damping * v.double()
        assert th.linalg.norm(fvp(v).double() - expected) / th.linalg.norm(expected) < 1e-5


def test_fisher_vector_product_ignores_logits_stashed_by_a_surrogate_of_another_batch() -> None:
    """The logits before masking stashed by a surrogate stand in for ``new`` only if they belong to that very ``new``:
    not to another batch of the same shape, whose product would then silently be that batch's."""
    model = collected("discrete", policy_kwargs={"net_arch": [4]})
    observations, actions, old_log_prob, advantages, masks = buffer_batch(model)
    params, _ = model._split_parameters(observations)
    first, second = slice(0, 24), slice(24, 48)
    model._action_masks = masks[first]
    model._surrogate(observations[first], actions[first], old_log_prob[first], advantages[first])
    model._action_masks = masks[second]
    new = distribution_params(model.policy.get_distribution(observations[second], action_masks=masks[second]))
    fvp = model._fisher_vector_product_fn(params, new, new.detach())
    reference = TRPO._fisher_vector_product_fn(model, params, new, new.detach())
    v = th.randn(sum(p.numel() for p in params), generator=th.Generator().manual_seed(0))
    assert th.linalg.norm(fvp(v) - reference(v)) / th.linalg.norm(reference(v)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_the_policy_step_takes_the_jacobian_of_the_logits_before_masking(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[DistParams] = []
    generic = TRPO._fisher_vector_product_fn

    def spy(self: TRPO, params: list, new: DistParams, old: DistParams, observations: object = None) -> object:
        seen.append(new)
        return generic(self, params, new, old, observations)  # type: ignore[arg-type]

    monkeypatch.setattr(TRPO, "_fisher_vector_product_fn", spy)
    model = collected(kind)  # one update
    assert len(seen) == 1 and model._unmasked is None
    *_, masks = buffer_batch(model)
    assert not bool(masks.bool().all())  # masked outcomes: their masked logits are about -1e8
    for logits in seen[0].tensors:  # the product was built on the logits before masking: none at -1e8
        assert logits.requires_grad and bool((logits > -1e4).all())


def test_save_leaves_out_the_stashed_logits(tmp_path: os.PathLike) -> None:
    model = collected("discrete")
    observations, actions, old_log_prob, advantages, masks = buffer_batch(model)
    model._action_masks = masks
    model._surrogate(observations, actions, old_log_prob, advantages)  # stashes graph-attached logits
    model._action_masks = None
    path = os.path.join(tmp_path, "model.zip")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    assert "_unmasked" not in data and "_action_masks" not in data
    assert MaskableTRPO.load(path)._unmasked is None


def test_sub_sampling_keeps_masks_aligned_with_their_samples() -> None:
    env = make_vec_env(lambda: make_masked_env("discrete"), n_envs=2, wrapper_class=ValidityChecker)
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, sub_sampling_factor=3, policy_kwargs=TINY, seed=0)
    model.learn(512)
    assert model.logger.name_to_value["train/line_search_success"] == 1.0
    assert sum(c.violations for c in env.envs) == 0  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------------
# Where masks come from, and bad masks
# --------------------------------------------------------------------------------------------------------------
class NoValidActionInEnvOne(gym.Wrapper):
    def __init__(self, env: gym.Env, broken: bool) -> None:
        super().__init__(env)
        self.broken = broken

    def action_masks(self) -> list[bool]:
        masks = list(self.env.unwrapped.action_masks())  # type: ignore[attr-defined]
        return [False] * len(masks) if self.broken else masks


def test_a_mask_without_valid_action_raises_naming_the_environment_or_observation_index() -> None:
    env = DummyVecEnv([lambda i=i: NoValidActionInEnvOne(make_masked_env("discrete"), broken=i == 1) for i in range(3)])
    model = MaskableTRPO("MlpPolicy", env, n_steps=16, batch_size=16, policy_kwargs=TINY, seed=0)
    with pytest.raises(ValueError, match="environment index 1 has no valid action"):
        model.learn(48)
    obs = env.reset()
    with pytest.raises(ValueError, match="The action mask of observation index 1 has no valid action"):
        model.predict(obs, action_masks=get_action_masks(env))


def test_a_multidiscrete_mask_with_an_empty_component_raises() -> None:
    model = MaskableTRPO("MlpPolicy", make_masked_env("multidiscrete"), n_steps=16, batch_size=16, policy_kwargs=TINY)
    mask = np.ones(7, dtype=bool)
    mask[3:] = False  # the second component (4 outcomes) has none left
    with pytest.raises(ValueError, match=r"observation index 0 has no valid action \(action component 1\)"):
        model.predict(model.observation_space.sample(), action_masks=mask)


class PerComponentMasks(gym.Env):
    """MultiDiscrete([3, 3]) whose ``action_masks()`` has one row per component, a layout sb3-contrib accepts."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 3])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def action_masks(self) -> np.ndarray:
        return np.array([[True, False, True], [False, False, True]])  # first component 0 or 2, second only 2

    def step(self, action: np.ndarray) -> tuple:
        assert action[0] in (0, 2) and action[1] == 2, f"invalid action {action}"
        return self.observation_space.sample(), 1.0, False, False, {}


def test_masks_with_one_row_per_component_are_read_as_sb3_contrib_reads_them() -> None:
    model = MaskableTRPO("MlpPolicy", make_vec_env(PerComponentMasks, n_envs=2), n_steps=32, batch_size=32, seed=0)
    model.learn(256)  # the environment asserts that every action is valid
    env = PerComponentMasks()
    observations = np.stack([env.observation_space.sample() for _ in range(50)])
    actions, _ = model.predict(observations, action_masks=np.stack([env.action_masks()] * 50))
    assert set(actions[:, 0]) <= {0, 2} and set(actions[:, 1]) == {2}


def test_masks_of_the_wrong_size_raise_naming_the_expected_length() -> None:
    model = MaskableTRPO("MlpPolicy", make_masked_env("multidiscrete"), n_steps=16, batch_size=16, policy_kwargs=TINY)
    with pytest.raises(ValueError, match="expected 7 entries per observation"):
        model.predict(model.observation_space.sample(), action_masks=np.ones(6, dtype=bool))


def test_masks_from_the_action_masker_wrapper() -> None:
    def only_action_zero_or_one(env: gym.Env) -> list[bool]:
        return [True, True, False, False, False]

    env = ActionMasker(IdentityEnv(dim=5, ep_length=20), only_action_zero_or_one)
    model = MaskableTRPO("MlpPolicy", env, n_steps=32, batch_size=32, policy_kwargs=TINY)
    model.learn(96)
    actions = model.rollout_buffer.actions.flatten()
    assert set(np.unique(actions)) <= {0.0, 1.0}


class ArrayMaskEnv(InvalidActionEnvDiscrete):
    """Masks as an array the environment keeps and changes in place (the getter must hand out copies)."""

    def __init__(self) -> None:
        super().__init__(dim=6, n_invalid_actions=3)
        self.mask_array = np.ones(6, dtype=bool)

    def action_masks(self) -> np.ndarray:  # type: ignore[override]
        self.mask_array[:] = super().action_masks()
        return self.mask_array


@pytest.mark.parametrize("layout", ["dummy1", "dummy3", "normalize", "masker", "subproc"])
def test_mask_getter_gives_what_get_action_masks_gives(layout: str) -> None:
    def masker_env() -> gym.Env:
        return ActionMasker(IdentityEnv(dim=5, ep_length=20), lambda env: [True, env.state != 1, True, False, True])

    make: Any = {"masker": masker_env, "subproc": lambda: InvalidActionEnvDiscrete(dim=6, n_invalid_actions=3)}.get(
        layout, ArrayMaskEnv
    )
    n_envs = {"dummy1": 1, "masker": 1}.get(layout, 3)
    env: VecEnv = make_vec_env(make, n_envs=n_envs, seed=0, vec_env_cls=SubprocVecEnv if layout == "subproc" else None)
    if layout == "normalize":
        env = VecNormalize(env, norm_obs=False)
    try:
        getter = make_mask_getter(env)
        env.reset()
        for _ in range(30):
            masks = getter()
            expected = get_action_masks(env)
            assert masks.dtype == expected.dtype and masks.shape == expected.shape
            np.testing.assert_array_equal(masks, expected)
            if layout in ("dummy1", "dummy3", "normalize"):  # a copy, not the environment's own array
                assert not np.shares_memory(masks, env.get_attr("mask_array")[0])
            env.step(np.array([env.action_space.sample() for _ in range(n_envs)]))
    finally:
        env.close()


def test_env_without_masks_needs_use_masking_false() -> None:
    model = MaskableTRPO("MlpPolicy", IdentityEnv(dim=3, ep_length=20), n_steps=32, batch_size=32, policy_kwargs=TINY, seed=0)
    with pytest.raises(ValueError, match="does not support action masking"):
        model.learn(32)
    model.learn(64, use_masking=False)


def test_rejects_continuous_actions_and_unmaskable_policies() -> None:
    with pytest.raises(ValueError, match="Unsupported action space") as error:
        MaskableTRPO("MlpPolicy", IdentityEnvBox())
    assert isinstance(error.value, AssertionError)  # as MaskablePPO raises (sb3-contrib's test_invalid_actions)
    with pytest.raises(ValueError, match="MaskableActorCriticPolicy"):
        MaskableTRPO(ActorCriticPolicy, make_masked_env("discrete"))
    with pytest.raises(ValueError, match="use_sde"):
        MaskableTRPO("MlpPolicy", make_masked_env("discrete"), use_sde=True)


# --------------------------------------------------------------------------------------------------------------
# The SB3 / sb3-contrib interface
# --------------------------------------------------------------------------------------------------------------
def test_maskable_eval_callback_with_several_envs(tmp_path: os.PathLike) -> None:
    env = make_vec_env(lambda: make_masked_env("discrete"), n_envs=2)
    eval_env = make_vec_env(lambda: make_masked_env("discrete"), n_envs=2)
    callback = MaskableEvalCallback(eval_env, eval_freq=32, n_eval_episodes=2, log_path=str(tmp_path), warn=False)
    model = MaskableTRPO("MlpPolicy", env, n_steps=32, batch_size=64, policy_kwargs=TINY, seed=0)
    model.learn(128, callback=callback)
    assert callback.n_calls > 0
    assert callback.best_mean_reward > -np.inf


def test_dict_observations_with_multi_input_policy() -> None:
    class ToDict(gym.ObservationWrapper):
        def __init__(self, env: gym.Env) -> None:
            super().__init__(env)
            self.observation_space = gym.spaces.Dict({"obs": env.observation_space})

        def observation(self, observation: object) -> dict:
            return {"obs": observation}

        def action_masks(self) -> list[bool]:
            return self.env.unwrapped.action_masks()  # type: ignore[attr-defined]

    env = ToDict(make_masked_env("multidiscrete"))
    model = MaskableTRPO("MultiInputPolicy", env, n_steps=32, batch_size=32, policy_kwargs=TINY, seed=0)
    model.learn(64)
    evaluate_policy(model, env, n_eval_episodes=1, warn=False)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_and_load_in_maskable_ppo(kind: str, tmp_path: os.PathLike) -> None:
    model = collected(kind)
    path = os.path.join(tmp_path, "model.zip")
    model.save(path)
    env = make_masked_env(kind)
    observations = np.stack([env.observation_space.sample() for _ in range(16)])
    masks = np.stack([env.action_masks() for _ in range(16)])
    expected, _ = model.predict(observations, action_masks=masks, deterministic=True)

    loaded = MaskableTRPO.load(path, env=env)
    assert loaded.target_kl == model.target_kl and loaded.cg_damping == model.cg_damping
    np.testing.assert_array_equal(loaded.predict(observations, action_masks=masks, deterministic=True)[0], expected)
    loaded.learn(64)  # and it trains on after loading

    theirs = MaskablePPO.load(path, env=env)  # the policy class is sb3-contrib's own
    np.testing.assert_array_equal(theirs.predict(observations, action_masks=masks, deterministic=True)[0], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_model_is_perfect_when_only_the_right_action_is_valid(kind: str) -> None:
    # sb3-contrib's check for MaskablePPO: with every wrong action masked, any policy scores 100 per episode
    n_invalid = {"discrete": 19, "multidiscrete": 3, "multibinary": 3}[kind]
    env = {
        "discrete": lambda: InvalidActionEnvDiscrete(dim=20, n_invalid_actions=n_invalid),
        "multidiscrete": lambda: InvalidActionEnvMultiDiscrete(dims=[2, 3], n_invalid_actions=n_invalid),
        "multibinary": lambda: InvalidActionEnvMultiBinary(dims=3, n_invalid_actions=n_invalid),
    }[kind]()
    model = MaskableTRPO("MlpPolicy", env, seed=8, policy_kwargs=TINY)
    evaluate_policy(model, env, reward_threshold=99, warn=False)


# --------------------------------------------------------------------------------------------------------------
# Learning (sb3-contrib's thresholds for MaskablePPO)
# --------------------------------------------------------------------------------------------------------------
# Tuned here: a smaller CG damping than TRPO's default (0.01 instead of 0.1) lets the step use the trust region.
LEARNING = {"gamma": 0.4, "n_steps": 128, "batch_size": 64, "target_kl": 0.1, "cg_damping": 0.01, "seed": 32}


@pytest.mark.slow
def test_learns_invalid_action_env_discrete() -> None:
    # sb3-contrib's test_identity for MaskablePPO: 15 valid actions out of 70, reward > 90 of 100 over 20 episodes
    # (MaskablePPO gets there with its default n_steps=2048, i.e. 4096 collected steps for a 3000-step budget)
    env = InvalidActionEnvDiscrete(dim=70, n_invalid_actions=55)
    model = MaskableTRPO("MlpPolicy", env, **LEARNING)  # type: ignore[arg-type]
    model.learn(4096)
    evaluate_policy(model, env, n_eval_episodes=20, reward_threshold=90, warn=False)


@pytest.mark.slow
def test_learns_invalid_action_env_multidiscrete() -> None:
    env = InvalidActionEnvMultiDiscrete(dims=[5, 5], n_invalid_actions=4)
    model = MaskableTRPO("MlpPolicy", env, **LEARNING)  # type: ignore[arg-type]
    model.learn(4096)
    evaluate_policy(model, env, n_eval_episodes=20, reward_threshold=90, warn=False)


@pytest.mark.parametrize("share_features_extractor", [True, False])
def test_cnn_policy_with_random_masks(share_features_extractor: bool) -> None:
    from stable_baselines3.common.envs import FakeImageEnv

    rng = np.random.default_rng(0)

    def one_random_invalid_action(env: gym.Env) -> list[bool]:
        invalid = rng.integers(env.action_space.n)  # type: ignore[attr-defined]
        return [i != invalid for i in range(env.action_space.n)]  # type: ignore[attr-defined]

    image_env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)
    image_env.observation_space.seed(0)  # FakeImageEnv samples its images from the space: seeded, the same every run
    env = ActionMasker(image_env, one_random_invalid_action)
    policy_kwargs = {
        "net_arch": [8],
        "share_features_extractor": share_features_extractor,
        "features_extractor_kwargs": {"features_dim": 16},
    }
    model = MaskableTRPO("CnnPolicy", env, n_steps=16, batch_size=16, policy_kwargs=policy_kwargs, seed=0)
    model.learn(32)
    assert model.logger.name_to_value["train/line_search_success"] == 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_masks", [True, False])
def test_lean_rollout_step_equals_the_policy_forward(kind: str, with_masks: bool) -> None:
    """The rollout's module-free step draws the same actions, values and log-probabilities, bit for bit, as
    ``policy(obs, action_masks=...)`` from the same random state."""
    env = make_vec_env(lambda: make_masked_env(kind), n_envs=3, seed=0)
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, target_kl=0.1, seed=0)
    model.learn(128)  # the weights have moved away from their initialisation
    step = model._lean_masked_step()
    obs = model.policy.obs_to_tensor(env.reset())[0]
    masks = np.asarray(get_action_masks(env)) if with_masks else None
    for draw in range(5):
        with th.no_grad():
            th.manual_seed(draw)
            expected = model.policy(obs, action_masks=masks)
            th.manual_seed(draw)
            got = step(obs, masks)
        assert isinstance(got[0], np.ndarray) and got[0].dtype == expected[0].numpy().dtype
        np.testing.assert_array_equal(got[0], expected[0].numpy())
        for name, a, b in zip(("values", "log_probs"), got[1:], expected[1:]):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert th.equal(a, b), name


@pytest.mark.parametrize("kind", KINDS)
def test_lean_rollout_fills_the_buffer_identically_to_the_policy_forward(kind: str) -> None:
    """Whole rollouts (several envs, episode ends, the buffer's direct writes): every buffer field, the masks
    included, equals what ``policy(obs, action_masks=...)`` and ``MaskableRolloutBuffer.add`` store."""

    def rollout(generic: bool) -> MaskableTRPO:
        env = make_vec_env(lambda: make_masked_env(kind), n_envs=3, seed=3)
        model = MaskableTRPO("MlpPolicy", env, n_steps=40, batch_size=40, target_kl=0.1, seed=3)
        if generic:
            model._lean_masked_step = model._generic_masked_step  # type: ignore[method-assign]
        model.learn(120)  # three rollouts and two updates: the weights have moved
        return model

    lean, generic = rollout(False), rollout(True)
    for field in ["observations", "actions", "log_probs", "values", "rewards", "episode_starts", "advantages", "returns"]:
        np.testing.assert_array_equal(getattr(lean.rollout_buffer, field), getattr(generic.rollout_buffer, field), field)
    np.testing.assert_array_equal(lean.rollout_buffer.action_masks, generic.rollout_buffer.action_masks)
    assert lean.rollout_buffer.action_masks.min() == 0.0  # some actions were masked
    assert lean.rollout_buffer.episode_starts.sum() > 0


class HookLocals(BaseCallback):
    """The ``locals`` keys each hook sees, and the first ``use_masking``, ``callback`` and ``action_masks`` it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[str]] = {}
        self.first: dict[str, dict[str, Any]] = {}

    def _record(self, hook: str) -> None:
        self.seen.setdefault(hook, set()).update(self.locals)
        masks = self.locals.get("action_masks")
        self.first.setdefault(
            hook,
            {
                "use_masking": self.locals.get("use_masking", "missing"),
                "callback": type(self.locals.get("callback")).__name__,
                "action_masks": None if masks is None else (masks.dtype, masks.tolist()),
            },
        )

    def _on_training_start(self) -> None:
        self._record("training_start")

    def _on_rollout_start(self) -> None:
        self._record("rollout_start")

    def _on_step(self) -> bool:
        self._record("step")
        return True

    def _on_rollout_end(self) -> None:
        self._record("rollout_end")


class ComponentRowMasks(gym.Env):
    """MultiDiscrete([3, 3]) actions whose masks come as integers, one row per component (sb3-contrib reads any layout)."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 3])

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(3, np.float32), float(action[0] == 1), False, False, {}

    def action_masks(self) -> np.ndarray:
        return np.array([[0, 1, 1], [1, 0, 1]])


@pytest.mark.parametrize("use_masking", [True, False])
@pytest.mark.parametrize("env_fn", [lambda: make_masked_env("discrete"), ComponentRowMasks], ids=["discrete", "int-rows"])
def test_callbacks_see_maskable_ppos_locals_at_every_hook(use_masking: bool, env_fn: Any) -> None:
    recorded = {}
    for algo in (MaskableTRPO, MaskablePPO):
        model = algo("MlpPolicy", make_vec_env(env_fn, n_envs=2, seed=0), n_steps=16, batch_size=16, seed=0)
        recorder = HookLocals()
        model.learn(32, callback=[recorder], use_masking=use_masking)
        recorded[algo] = recorder
    ours, theirs = recorded[MaskableTRPO], recorded[MaskablePPO]
    assert set(theirs.seen) == set(ours.seen) == {"training_start", "rollout_start", "step", "rollout_end"}
    for hook, keys in theirs.seen.items():
        assert keys <= ours.seen[hook], (hook, keys - ours.seen[hook])
    # the same use_masking from training start on, the same callback object, the masks as the environments return them
    assert ours.first == theirs.first
    assert {hook: first["use_masking"] for hook, first in ours.first.items()} == dict.fromkeys(ours.seen, use_masking)
    assert ours.first["training_start"]["callback"] == "CallbackList"
    assert (ours.first["step"]["action_masks"] is not None) == use_masking


def test_learn_arguments_reach_training_start_once_even_after_a_setup_without_learn() -> None:
    # a training loop of one's own may call _setup_learn without learn: the arguments it installed must not outlive it
    recorder = HookLocals()
    model = MaskableTRPO("MlpPolicy", make_masked_env("discrete"), n_steps=16, batch_size=16, seed=0)
    model._use_masking = True
    model._setup_learn(16, callback=recorder)
    model.learn(16, callback=recorder, use_masking=False)
    assert recorder.first["training_start"]["use_masking"] is False
    assert "on_training_start" not in vars(recorder)  # nothing left on the user's object
