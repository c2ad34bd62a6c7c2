"""The invariants that make TRPO what it is: the trust region holds, rejected and skipped steps change nothing,
the critic never moves the policy, and the policy's parameters are found by structure, not by name."""

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.preprocessing import get_flattened_obs_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, FlattenExtractor
from stable_baselines3.common.vec_env import VecEnvWrapper

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.policy_utils import distribution_params
from tests.helpers import (
    TINY,
    bit_identical,
    detached_copy,
    make_identity_env,
    mean_kl_to,
    parameters_snapshot,
    torch_distribution,
)


def collected_model(kind: str = "box", **kwargs: object) -> TRPO:
    """A tiny model with a freshly collected rollout buffer, ready for ``train()``."""
    kwargs.setdefault("policy_kwargs", TINY)
    model = TRPO("MlpPolicy", make_identity_env(kind), n_steps=64, batch_size=32, seed=0, **kwargs)  # type: ignore[arg-type]
    model.learn(64)  # one rollout and one update; the next train() call re-uses this buffer
    return model


def buffer_batch(model: TRPO) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
    data = next(model.rollout_buffer.get(batch_size=None))
    actions = data.actions.long().flatten() if isinstance(model.action_space, gym.spaces.Discrete) else data.actions
    advantages = (data.advantages - data.advantages.mean()) / (data.advantages.std() + 1e-8)
    return data.observations, actions, data.old_log_prob, advantages


@pytest.mark.parametrize("kind", ["box", "discrete", "multidiscrete", "multibinary"])
@pytest.mark.parametrize("target_kl", [0.001, 0.05])
def test_accepted_step_satisfies_the_trust_region(kind: str, target_kl: float) -> None:
    model = collected_model(kind, target_kl=target_kl, cg_damping=0.01)
    observations, *_ = buffer_batch(model)
    accepted = 0
    for _ in range(4):
        old = [detached_copy(d) for d in torch_distribution(model, observations)]
        model.logger.dump()
        model.train()
        values = model.logger.name_to_value
        if values["train/line_search_success"] == 1.0:
            accepted += 1
            # KL(old || new) by torch's own kl_divergence, independent of the package's formulas
            kl = mean_kl_to(model, old, observations)
            assert kl <= target_kl * (1 + 1e-5)
            assert values["train/kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
            assert values["train/surrogate_after"] > values["train/surrogate_before"]
        model.logger.dump()
    assert accepted > 0


def line_search_case() -> tuple[TRPO, list[th.nn.Parameter], list[th.Tensor], tuple]:
    """A collected Box model, its actor parameters and their snapshot, and the arguments of ``_line_search`` after the
    step: the batch (observations, actions, old log-probabilities, advantages) and the old distribution."""
    model = collected_model("box")
    observations, actions, old_log_prob, advantages = buffer_batch(model)
    params, _ = model._split_parameters(observations)
    old = distribution_params(model.policy.get_distribution(observations)).detach()
    return model, params, parameters_snapshot(params), (observations, actions, old_log_prob, advantages, old)


def test_rejected_line_search_restores_parameters_bit_identically() -> None:
    model, params, snapshot, batch = line_search_case()
    from sb3_trpo_ext.trpo.trpo import PolicyStepStats

    stats = PolicyStepStats(surrogate_before=0.0)
    huge_step = 1e3 * th.ones(sum(p.numel() for p in params))  # far outside any trust region
    model.line_search_max_iter = 3
    model._line_search(params, huge_step, *batch, 0.0, stats)
    assert not stats.accepted
    assert stats.kl is None
    assert stats.backtracks == 3
    assert bit_identical(params, snapshot)


def test_line_search_rejects_candidates_whose_distributions_overflow() -> None:
    # a huge target_kl allows a huge step: here the candidates' standard deviations underflow to 0 and their means
    # overflow, which torch.distributions' argument checks would reject with a ValueError in the middle of the search
    model, params, snapshot, batch = line_search_case()
    from sb3_trpo_ext.trpo.trpo import PolicyStepStats

    stats = PolicyStepStats(surrogate_before=0.0)
    model.target_kl = 1e30
    overflowing_step = -1e30 * th.ones(sum(p.numel() for p in params))
    model._line_search(params, overflowing_step, *batch, 0.0, stats)
    assert not stats.accepted
    assert bit_identical(params, snapshot)
    assert th.distributions.Distribution._validate_args  # the checks are on again


def test_line_search_restores_the_parameters_when_evaluating_a_candidate_raises() -> None:
    model, params, snapshot, batch = line_search_case()
    from sb3_trpo_ext.trpo.trpo import PolicyStepStats

    def interrupted(*args: th.Tensor) -> tuple[th.Tensor, object]:
        raise KeyboardInterrupt

    model._surrogate = interrupted  # type: ignore[method-assign]
    step = 1e-3 * th.ones(sum(p.numel() for p in params))
    with pytest.raises(KeyboardInterrupt):
        model._line_search(params, step, *batch, 0.0, PolicyStepStats())
    assert bit_identical(params, snapshot)


def test_huge_target_kl_trains_without_error_and_keeps_finite_weights() -> None:
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), n_steps=64, batch_size=64, target_kl=1e30)
    model.learn(256)
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


def test_a_dump_shows_only_what_the_last_update_recorded() -> None:
    # the logger keeps values until it dumps (every log_interval rollouts): the KL of an accepted step must not be
    # shown beside a later rejected one
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import KVWriter, Logger

    class Dumps(KVWriter):
        def __init__(self) -> None:
            self.dumps: list[dict] = []

        def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
            self.dumps.append(dict(key_values))

    class RejectFromThirdUpdate(BaseCallback):
        def _on_rollout_start(self) -> None:
            if self.model._n_updates == 2:
                self.model.target_kl = 1e-30  # every candidate step is outside the trust region

        def _on_step(self) -> bool:
            return True

    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), n_steps=64, seed=0)
    writer = Dumps()
    model.set_logger(Logger(folder=None, output_formats=[writer]))
    model.learn(128 * 4, log_interval=2, callback=RejectFromThirdUpdate())
    # dumps come before the updates of rollouts 2 and 4: after update 1 (accepted), then after update 3 (rejected),
    # which followed the accepted update 2 in the same window
    accepted, rejected = (dump for dump in writer.dumps if "train/n_updates" in dump)
    assert accepted["train/line_search_success"] == 1.0 and "train/kl" in accepted
    assert rejected["train/n_updates"] == 3 and rejected["train/line_search_success"] == 0.0
    assert "train/kl" not in rejected and "train/kl_divergence_loss" not in rejected


def test_failed_line_search_is_logged_as_a_failure_not_as_zero_kl() -> None:
    model = collected_model("box", line_search_max_iter=1)
    # A surrogate that cannot improve: zero advantages after normalisation are impossible, so flip their sign
    # at evaluation time by making every candidate look worse than the old policy.
    original = model._surrogate

    def worse_surrogate(*args: th.Tensor) -> tuple[th.Tensor, object]:
        surrogate, params = original(*args)
        if not th.is_grad_enabled():
            surrogate = surrogate - 1e6
        return surrogate, params

    model._surrogate = worse_surrogate  # type: ignore[method-assign]
    params, _ = model._split_parameters(buffer_batch(model)[0])
    snapshot = parameters_snapshot(params)
    model.logger.dump()  # forget what the update inside learn() recorded
    model.train()
    values = model.logger.name_to_value
    assert values["train/line_search_success"] == 0.0
    assert "train/kl" not in values
    assert values["train/is_line_search_success"] == 0.0 and "train/kl_divergence_loss" not in values  # sb3-contrib's keys
    assert values["train/surrogate_after"] == values["train/surrogate_before"]
    assert bit_identical(params, snapshot)


@pytest.mark.parametrize("share_features_extractor", [True, False])
def test_critic_update_leaves_every_policy_parameter_bit_identical(share_features_extractor: bool) -> None:
    policy_kwargs = {
        "net_arch": [8],
        "features_extractor_class": LinearExtractor,
        "share_features_extractor": share_features_extractor,
    }
    model = collected_model("box", policy_kwargs=policy_kwargs)
    data = next(model.rollout_buffer.get(batch_size=None))
    actor, critic = model._split_parameters(data.observations)
    actor_snapshot, critic_snapshot = parameters_snapshot(actor), parameters_snapshot(critic)
    losses = model._critic_regression(data.observations, data.returns)
    assert len(losses) == model.n_critic_updates * 2  # 64 samples in minibatches of 32
    assert bit_identical(actor, actor_snapshot)
    assert not bit_identical(critic, critic_snapshot)
    extractor_params = set(map(id, model.policy.pi_features_extractor.parameters()))
    assert extractor_params <= set(map(id, actor))  # the extractor feeds the actor: it is the actor's


class LinearExtractor(BaseFeaturesExtractor):
    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=4)
        self.layer = th.nn.Linear(int(np.prod(observation_space.shape)), 4)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.tanh(self.layer(observations))


class ConfusinglyNamedExtractor(th.nn.Module):
    """An mlp_extractor whose actor branch is called 'value_stream' and critic branch 'policy_stream'."""

    def __init__(self, features_dim: int) -> None:
        super().__init__()
        self.value_stream = th.nn.Sequential(th.nn.Linear(features_dim, 8), th.nn.Tanh())
        self.policy_stream = th.nn.Sequential(th.nn.Linear(features_dim, 6), th.nn.Tanh())
        self.latent_dim_pi, self.latent_dim_vf = 8, 6

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return self.value_stream(features)

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        return self.policy_stream(features)


from stable_baselines3.common.policies import ActorCriticPolicy  # noqa: E402


class ConfusinglyNamedPolicy(ActorCriticPolicy):
    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = ConfusinglyNamedExtractor(self.features_dim)  # type: ignore[assignment]


def test_actor_parameters_are_chosen_by_structure_not_by_name() -> None:
    env = make_identity_env("box")
    model = TRPO(ConfusinglyNamedPolicy, env, n_steps=64, batch_size=32, seed=0)
    observations = th.zeros((1, *env.observation_space.shape))
    actor, critic = model._split_parameters(observations)
    policy = model.policy
    expected_actor = {*map(id, policy.mlp_extractor.value_stream.parameters()), *map(id, policy.action_net.parameters())}
    expected_actor.add(id(policy.log_std))
    expected_critic = {*map(id, policy.mlp_extractor.policy_stream.parameters()), *map(id, policy.value_net.parameters())}
    assert set(map(id, actor)) == expected_actor
    assert set(map(id, critic)) == expected_critic
    model.learn(128)  # and it trains


class BatchNormDropoutExtractor(BaseFeaturesExtractor):
    """A features extractor whose forward pass in training mode changes state (BatchNorm) and draws random numbers."""

    def __init__(self, observation_space: gym.Space) -> None:
        super().__init__(observation_space, get_flattened_obs_dim(observation_space))
        self.flatten = th.nn.Flatten()
        self.batch_norm = th.nn.BatchNorm1d(self.features_dim)
        self.dropout = th.nn.Dropout(0.5)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.dropout(self.batch_norm(self.flatten(observations)))


def batch_norm_model(algorithm: str, device: str = "auto") -> TRPO:
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    from sb3_trpo_ext import MaskableTRPO, RecurrentTRPO

    kwargs: dict = {
        "device": device,
        "n_steps": 64,
        "batch_size": 32,
        "seed": 0,
        "policy_kwargs": {"net_arch": [16], "features_extractor_class": BatchNormDropoutExtractor},
    }
    if algorithm == "MaskableTRPO":
        return MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10), **kwargs)
    if algorithm == "RecurrentTRPO":
        return RecurrentTRPO("MlpLstmPolicy", "CartPole-v1", **kwargs)
    return TRPO("MlpPolicy", "Pendulum-v1", **kwargs)


@pytest.mark.parametrize("algorithm", ["TRPO", "MaskableTRPO", "RecurrentTRPO"])
def test_policy_with_batch_norm_and_dropout_runs_its_updates(algorithm: str) -> None:
    # finding the actor's parameters passes one observation through the policy: never through a training-mode
    # BatchNorm, which rejects a batch of one (sb3-contrib's test_train_eval_mode uses such a policy)
    model = batch_norm_model(algorithm)
    model.learn(128)
    assert model.logger.name_to_value["train/n_updates"] == 2
    batch_norm = model.policy.features_extractor.batch_norm  # type: ignore[union-attr]
    assert {id(batch_norm.weight), id(batch_norm.bias)} <= set(map(id, model._actor_params))  # shared: the actor's


@pytest.mark.parametrize("algorithm", ["TRPO", "RecurrentTRPO"])
def test_finding_the_actor_parameters_leaves_no_trace(algorithm: str) -> None:
    model = batch_norm_model(algorithm)
    model.policy.set_training_mode(True)
    model.policy.value_net.eval()  # a mixed state is restored as it was, module by module
    extractor = model.policy.features_extractor
    train_calls: list[bool] = []
    extractor.train = lambda mode=True: train_calls.append(mode) or BatchNormDropoutExtractor.train(extractor, mode)  # type: ignore[method-assign]
    modes = {name: module.training for name, module in model.policy.named_modules()}
    batch_norm = model.policy.features_extractor.batch_norm  # type: ignore[union-attr]
    statistics = [t.clone() for t in (batch_norm.running_mean, batch_norm.running_var, batch_norm.num_batches_tracked)]
    random_state = th.get_rng_state()
    observations = th.as_tensor(np.stack([model.observation_space.sample() for _ in range(4)]))
    model._split_parameters(observations)
    assert {name: module.training for name, module in model.policy.named_modules()} == modes
    assert train_calls[-1] is True  # restored through the module's own train(), which a subclass may extend
    after = (batch_norm.running_mean, batch_norm.running_var, batch_norm.num_batches_tracked)
    assert all(th.equal(a, b) for a, b in zip(after, statistics))
    assert th.equal(th.get_rng_state(), random_state)  # no Dropout mask drawn


class TrainingNoiseExtractor(BaseFeaturesExtractor):
    """Adds learned noise in training mode only (a NoisyNet-style scale): its parameter feeds the policy step."""

    def __init__(self, observation_space: gym.Space) -> None:
        super().__init__(observation_space, get_flattened_obs_dim(observation_space))
        self.scale = th.nn.Parameter(th.full((self.features_dim,), 0.1))

    def forward(self, observations: th.Tensor) -> th.Tensor:
        features = th.flatten(observations, start_dim=1)
        return features + self.scale * th.randn_like(features) if self.training else features


def test_a_parameter_used_only_in_training_mode_is_an_actor_parameter() -> None:
    policy_kwargs = {"net_arch": [16], "features_extractor_class": TrainingNoiseExtractor}
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0, policy_kwargs=policy_kwargs)
    scale = model.policy.features_extractor.scale  # type: ignore[union-attr]
    actor, critic = model._split_parameters(th.zeros((1, 3)))
    assert any(p is scale for p in actor) and not any(p is scale for p in critic)


class CorruptRewards(VecEnvWrapper):
    """Makes the rewards (or observations) of one step non-finite."""

    def __init__(self, venv: object, field: str, at_step: int) -> None:
        super().__init__(venv)  # type: ignore[arg-type]
        self.field, self.at_step, self.count = field, at_step, 0

    def reset(self) -> np.ndarray:
        return self.venv.reset()  # type: ignore[return-value]

    def step_wait(self) -> tuple:
        obs, rewards, dones, infos = self.venv.step_wait()
        self.count += 1
        if self.count == self.at_step:
            if self.field == "reward":
                rewards = rewards.copy()
                rewards[0] = np.nan
            else:
                obs = obs.copy()
                obs[0] = np.inf
        return obs, rewards, dones, infos


@pytest.mark.parametrize("field", ["reward", "observation"])
def test_non_finite_batch_skips_the_update_and_leaves_parameters_bit_identical(field: str) -> None:
    venv = CorruptRewards(make_vec_env(lambda: make_identity_env("box"), n_envs=1), field, at_step=70)
    model = TRPO("MlpPolicy", venv, n_steps=64, batch_size=32, policy_kwargs=TINY, seed=0)
    model.learn(64)  # a clean first update
    snapshot = parameters_snapshot(list(model.policy.parameters()))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        model.learn(64, reset_num_timesteps=False)  # the second rollout holds the corrupt step
    assert bit_identical(list(model.policy.parameters()), snapshot)
    assert model.logger.name_to_value["train/skipped_update"] == 1.0


class HugeRewardOnce(gym.Wrapper):
    """One finite reward far beyond float32's squared range at the given step, ordinary rewards otherwise."""

    def __init__(self, env: gym.Env, at_step: int) -> None:
        super().__init__(env)
        self.at_step, self.count = at_step, 0

    def step(self, action: object) -> tuple:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.count += 1
        return obs, 1e25 if self.count == self.at_step else reward, terminated, truncated, info


def _optimizer_state(model: TRPO) -> list[th.Tensor]:
    return [v.clone() for state in model.policy.optimizer.state.values() for v in state.values() if isinstance(v, th.Tensor)]


@pytest.mark.parametrize("algorithm", ["TRPO", "TRPO-RMSprop", "MaskableTRPO", "RecurrentTRPO"])
def test_a_critic_regression_that_overflows_is_undone_and_the_critic_learns_again(algorithm: str) -> None:
    from sb3_contrib.common.wrappers import ActionMasker

    from sb3_trpo_ext import MaskableTRPO, RecurrentTRPO

    def make_env() -> gym.Env:
        env = HugeRewardOnce(gym.make("CartPole-v1"), at_step=70)  # in the second rollout
        return ActionMasker(env, lambda _: np.ones(2, dtype=bool)) if algorithm == "MaskableTRPO" else env

    kwargs: dict = {"n_steps": 64, "batch_size": 32, "seed": 0}
    if algorithm == "RecurrentTRPO":
        model: TRPO = RecurrentTRPO("MlpLstmPolicy", make_vec_env(make_env, n_envs=1), **kwargs)
    elif algorithm == "MaskableTRPO":
        model = MaskableTRPO("MlpPolicy", make_vec_env(make_env, n_envs=1), **kwargs)
    else:
        policy_kwargs = {"optimizer_class": th.optim.RMSprop} if algorithm == "TRPO-RMSprop" else {}
        model = TRPO("MlpPolicy", make_vec_env(make_env, n_envs=1), policy_kwargs=policy_kwargs, **kwargs)
    model.learn(64)  # a clean first update: the optimizer has a state
    critic = model._critic_params
    assert critic
    weights, state = parameters_snapshot(critic), _optimizer_state(model)
    with pytest.warns(RuntimeWarning, match="critic regression overflowed"):
        model.learn(64, reset_num_timesteps=False)
    assert model.logger.name_to_value["train/critic_update_skipped"] == 1.0
    assert bit_identical(critic, weights)
    after = _optimizer_state(model)
    assert len(after) == len(state) and all(th.equal(a, b) for a, b in zip(after, state))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # ordinary rewards: no overflow, nothing undone
        model.learn(128, reset_num_timesteps=False)
    assert "train/critic_update_skipped" not in model.logger.name_to_value
    assert not bit_identical(critic, weights)
    assert all(bool(th.isfinite(t).all()) for t in _optimizer_state(model))


def test_degenerate_conjugate_gradient_direction_skips_the_policy_step() -> None:
    model = collected_model("box")
    observations = buffer_batch(model)[0]
    actor, _ = model._split_parameters(observations)
    snapshot = parameters_snapshot(actor)

    def negative_curvature(*args: object) -> object:
        return lambda v: -v  # x^T F x < 0

    model._fisher_vector_product_fn = negative_curvature  # type: ignore[method-assign]
    model.logger.dump()
    with pytest.warns(RuntimeWarning, match="degenerate"):
        model.train()
    assert bit_identical(actor, snapshot)
    values = model.logger.name_to_value
    assert values["train/policy_step_skipped"] == 1.0
    assert values["train/line_search_success"] == 0.0
    assert "train/kl" not in values
    assert values["train/is_line_search_success"] == 0.0 and "train/kl_divergence_loss" not in values  # sb3-contrib's keys
    assert math.isfinite(values["train/value_loss"])  # the critic still learns from a finite batch


def test_zero_gradient_skips_the_policy_step_naming_the_cause() -> None:
    model = collected_model("box")
    observations = buffer_batch(model)[0]
    actor, _ = model._split_parameters(observations)
    snapshot = parameters_snapshot(actor)
    model.rollout_buffer.advantages[:] = 0.0  # nothing to improve
    model.normalize_advantage = False
    model.logger.dump()
    with pytest.warns(RuntimeWarning, match="gradient is zero"):
        model.train()
    assert bit_identical(actor, snapshot)
    assert model.logger.name_to_value["train/cg_iterations"] == 0


def test_non_finite_gradient_skips_the_policy_step() -> None:
    model = collected_model("box")
    actor, _ = model._split_parameters(buffer_batch(model)[0])
    snapshot = parameters_snapshot(actor)
    original = model._surrogate

    def nan_surrogate(*args: th.Tensor) -> tuple[th.Tensor, object]:
        surrogate, params = original(*args)
        return surrogate * th.tensor(float("nan")), params

    model._surrogate = nan_surrogate  # type: ignore[method-assign]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()
    assert any("not finite" in str(w.message) for w in caught)
    assert bit_identical(actor, snapshot)


def test_default_features_extractor_is_parameter_free() -> None:
    model = collected_model("box")
    assert isinstance(model.policy.features_extractor, FlattenExtractor)


def test_a_critic_state_non_finite_before_the_regression_is_not_undone() -> None:
    # A loaded model whose Adam state already holds an inf (trained by an earlier version, or by sb3-contrib's TRPO):
    # undoing every regression would freeze its critic for good
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0)
    model.learn(64)
    critic = model._critic_params
    assert critic
    model.policy.optimizer.state[critic[0]]["exp_avg_sq"].view(-1)[0] = float("inf")
    weights = parameters_snapshot(critic)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.learn(128, reset_num_timesteps=False)
    assert "train/critic_update_skipped" not in model.logger.name_to_value
    assert all(not th.equal(a, b) for a, b in zip(weights, critic))


def test_saved_critic_restores_optimizer_state_of_any_kind() -> None:
    from sb3_trpo_ext.common.critic import SavedCritic

    param = th.nn.Parameter(th.ones(3))
    fresh = th.nn.Parameter(th.ones(2))
    optimizer = th.optim.SGD([param, fresh], lr=0.1, momentum=0.9)
    optimizer.state[param].update({"momentum_buffer": th.zeros(3), "history": [1], "count": 1})
    buffer = optimizer.state[param]["momentum_buffer"]
    saved = SavedCritic(optimizer, [param, fresh])
    with th.no_grad():
        param.add_(1.0)
        buffer.fill_(5.0)
    optimizer.state[param]["history"].append(2)
    optimizer.state[param]["count"] = 2
    optimizer.state[param]["added"] = th.ones(1)
    optimizer.state[fresh]["momentum_buffer"] = th.ones(2)  # created after the save
    saved.restore()
    assert th.equal(param.detach(), th.ones(3))
    assert optimizer.state[param]["momentum_buffer"] is buffer and th.equal(buffer, th.zeros(3))
    assert optimizer.state[param]["history"] == [1] and optimizer.state[param]["count"] == 1
    assert "added" not in optimizer.state[param]
    assert fresh not in optimizer.state
