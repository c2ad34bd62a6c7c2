"""The fast paths give the results of SB3's generic code: the lean rollout path fills the buffer bit-identically,
and the hand-written critic regression computes the autograd gradients and follows torch's Adam."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecNormalize
from torch.nn import functional as F

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.critic import FastMlpCritic, FusedAdam
from sb3_trpo_ext.common.lean_policy import make_lean_policy_step
from sb3_trpo_ext.common.mlp_fisher import MlpFisher
from tests.helpers import MultiActionEnv
from tests.test_invariants import ConfusinglyNamedPolicy

FIELDS = ["observations", "actions", "log_probs", "values", "rewards", "episode_starts", "advantages", "returns"]


class KeysRecorder(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    def _on_step(self) -> bool:
        self.keys |= set(self.locals)
        return True


MULTI_ACTION_ENVS = {
    "multidiscrete": lambda: MultiActionEnv(gym.spaces.MultiDiscrete([3, 2, 4])),
    "multibinary": lambda: MultiActionEnv(gym.spaces.MultiBinary(3)),
}


def collect(
    env_id: str, generic: bool, normalize: bool, use_sde: bool = False, numpy_elementwise: bool = True
) -> tuple[TRPO, set[str]]:
    # Short time limit: many truncations, so the bootstrapped rewards are compared too
    env = make_vec_env(
        MULTI_ACTION_ENVS.get(env_id, env_id),
        n_envs=2,
        seed=7,
        wrapper_class=gym.wrappers.TimeLimit,
        wrapper_kwargs={"max_episode_steps": 30},
    )
    if normalize:
        env = VecNormalize(env)
    model = TRPO("MlpPolicy", env, n_steps=100, batch_size=100, seed=7, use_sde=use_sde, sde_sample_freq=4)
    if generic:
        model._lean_policy_step = lambda: None  # type: ignore[method-assign]
    elif not numpy_elementwise:  # the all-torch variant used on other devices than the CPU
        model._lean_policy_step = lambda: make_lean_policy_step(  # type: ignore[method-assign]
            model.policy, model.action_space, model.use_sde, numpy_elementwise=False
        )
    recorder = KeysRecorder()
    _, callback = model._setup_learn(200, callback=recorder)
    callback = CallbackList([recorder]) if callback is None else callback
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model, recorder.keys


@pytest.mark.parametrize("numpy_elementwise", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "env_id,use_sde",
    [
        ("Pendulum-v1", False),
        ("Pendulum-v1", True),
        ("CartPole-v1", False),
        ("HalfCheetah-v5", False),  # six action dimensions: the sum over them in SB3's order
        ("HalfCheetah-v5", True),
        ("Humanoid-v5", False),  # 17 action dimensions, 348 observation dimensions
        ("multidiscrete", False),  # one categorical draw per component, in order
        ("multibinary", False),
    ],
)
def test_lean_rollout_fills_the_buffer_identically_to_sb3(
    env_id: str, use_sde: bool, normalize: bool, numpy_elementwise: bool
) -> None:
    lean, lean_keys = collect(env_id, generic=False, normalize=normalize, use_sde=use_sde, numpy_elementwise=numpy_elementwise)
    generic, generic_keys = collect(env_id, generic=True, normalize=normalize, use_sde=use_sde)
    assert lean._lean_policy_step() is not None
    for field in FIELDS:
        np.testing.assert_array_equal(
            getattr(lean.rollout_buffer, field), getattr(generic.rollout_buffer, field), err_msg=field
        )
    assert generic_keys <= lean_keys  # callbacks see every local variable they see in SB3
    assert lean.rollout_buffer.episode_starts.sum() > 2


@pytest.mark.parametrize("use_sde,log_std", [(False, -60.0), (True, 60.0)])
def test_numpy_step_is_silent_on_overflow_and_gives_torchs_bits(use_sde: bool, log_std: float) -> None:
    """An extreme standard deviation (vanishing; for gSDE, overflowing) makes the log-probability non-finite: torch
    returns inf/NaN silently, so must the NumPy variant, even when the user has made NumPy raise on floating-point
    errors; the bits are still torch's."""
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, use_sde=use_sde, seed=0)
    with th.no_grad():
        model.policy.log_std.fill_(log_std)
    if use_sde:
        model.policy.reset_noise(1)
    obs = model.policy.obs_to_tensor(model.env.reset())[0]  # type: ignore[union-attr]
    step = make_lean_policy_step(model.policy, model.action_space, use_sde)
    assert step is not None
    old = np.seterr(all="raise")
    try:
        with th.no_grad():
            th.manual_seed(0)
            actions, values, log_probs = step(obs)
            th.manual_seed(0)
            expected = model.policy(obs)
    finally:
        np.seterr(**old)
    assert not np.isfinite(log_probs.numpy()).all()
    np.testing.assert_array_equal(actions, expected[0].numpy())
    np.testing.assert_array_equal(values.numpy(), expected[1].numpy())
    np.testing.assert_array_equal(log_probs.numpy(), expected[2].numpy())


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_lean_rollout_falls_back_to_sb3_where_it_does_not_apply(env_id: str) -> None:
    squashed = TRPO("MlpPolicy", "Pendulum-v1", use_sde=True, policy_kwargs={"squash_output": True}, n_steps=32, batch_size=32)
    assert squashed._lean_policy_step() is None
    custom = TRPO(ConfusinglyNamedPolicy, env_id, n_steps=32, batch_size=32)
    assert custom._lean_policy_step() is None
    custom.learn(64)


@pytest.mark.parametrize("activation_fn", [th.nn.Tanh, th.nn.ReLU])
def test_fast_critic_gradients_equal_autograd(activation_fn: type[th.nn.Module]) -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, seed=0, policy_kwargs={"activation_fn": activation_fn})
    policy = model.policy
    observations = th.randn(64, 3)
    returns = th.randn(64)
    _, critic_params = model._split_parameters(observations)
    critic = FastMlpCritic.build(policy.mlp_extractor, policy.value_net, critic_params, policy.optimizer)
    assert critic is not None
    expected_loss = th.nn.functional.mse_loss(policy.predict_values(observations).flatten(), returns)
    expected = th.autograd.grad(expected_loss, critic.params)
    # the torch version (any device)
    loss, grads = critic.loss_and_gradients(observations, returns)
    th.testing.assert_close(loss, expected_loss.detach())
    for grad, reference in zip(grads, expected):
        th.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
    # the NumPy version (CPU), on arrays sharing memory with the parameters
    weights = [layer.weight.detach().numpy() for layer in critic.layers]
    biases = [layer.bias.detach().numpy() for layer in critic.layers]
    errors, numpy_grads = critic.numpy_loss_and_gradients(observations.numpy(), returns.numpy(), weights, biases)
    assert errors.dtype == np.float32 and all(grad.dtype == np.float32 for grad in numpy_grads)
    assert float(np.mean(np.square(errors))) == pytest.approx(expected_loss.item(), rel=1e-5)
    for grad, reference in zip(numpy_grads, expected):
        assert grad.shape == reference.shape
        th.testing.assert_close(th.from_numpy(grad), reference, rtol=1e-5, atol=1e-6)


def test_fast_critic_fit_follows_torch_adam(monkeypatch: pytest.MonkeyPatch) -> None:
    def fit(fast: bool, numpy_on_cpu: bool = True) -> tuple[list[th.Tensor], list[float]]:
        model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=256, batch_size=32, n_critic_updates=3, seed=0)
        th.manual_seed(1)
        observations, returns = th.randn(256, 3), 10 * th.randn(256)
        if not fast:
            model._fast_critic = False
        with monkeypatch.context() as patch:
            patch.setattr(FastMlpCritic, "numpy_on_cpu", numpy_on_cpu)
            losses = model._critic_regression(observations, returns)
        assert isinstance(model._fast_critic, FastMlpCritic) == fast
        return [p.detach().clone() for p in model.policy.parameters()], losses

    fast_numpy, numpy_losses = fit(True)
    fast_torch, torch_losses = fit(True, numpy_on_cpu=False)
    generic_fused, _ = fit(False)  # autograd gradients, the fused Adam kernel
    with monkeypatch.context() as patch:
        patch.setattr(FusedAdam, "build", staticmethod(lambda *args: None))
        reference, reference_losses = fit(False)  # autograd gradients, torch.optim.Adam.step()
    assert len(numpy_losses) == len(torch_losses) == len(reference_losses) == 3 * 256 // 32
    np.testing.assert_allclose(numpy_losses, reference_losses, rtol=1e-4)
    np.testing.assert_allclose(torch_losses, reference_losses, rtol=1e-4)
    for numpy_param, torch_param, fused_param, reference_param in zip(fast_numpy, fast_torch, generic_fused, reference):
        th.testing.assert_close(numpy_param, reference_param, rtol=1e-4, atol=1e-5)
        th.testing.assert_close(torch_param, reference_param, rtol=1e-4, atol=1e-5)
        th.testing.assert_close(fused_param, reference_param, rtol=1e-5, atol=1e-6)


def test_numpy_critic_runs_blas_on_one_thread_and_leaves_large_products_to_multithreaded_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    # NumPy's own BLAS: what `import numpy` loads in a fresh interpreter (other packages, such as SciPy, may load
    # BLAS libraries of their own into this process; those do not run NumPy's products)
    script = (
        "import json, numpy, threadpoolctl; "
        "print(json.dumps([p['filepath'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas']))"
    )
    numpy_blas = set(
        json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    )
    assert numpy_blas, "NumPy loaded no BLAS library that threadpoolctl can see"
    seen: list[dict[str, int]] = []
    original = FastMlpCritic.numpy_loss_and_gradients

    def spy(self: FastMlpCritic, *args: object) -> object:
        threads = {pool["filepath"]: pool["num_threads"] for pool in threadpoolctl.threadpool_info()}
        seen.append({path: threads[path] for path in numpy_blas})
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FastMlpCritic, "numpy_loss_and_gradients", spy)
    threads = th.get_num_threads()
    try:
        for torch_threads, max_products, numpy_expected in [(2, 1 << 22, True), (1, 0, True), (2, 0, False)]:
            th.set_num_threads(torch_threads)
            monkeypatch.setattr(FastMlpCritic, "numpy_max_products", max_products)
            seen.clear()
            model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, n_critic_updates=1, seed=0)
            model._critic_regression(th.randn(64, 3), th.randn(64))
            assert isinstance(model._fast_critic, FastMlpCritic)
            assert len(seen) == (2 if numpy_expected else 0), (torch_threads, max_products)
            assert all(set(pools.values()) == {1} for pools in seen)
    finally:
        th.set_num_threads(threads)


def test_fused_adam_step_is_torch_adam_step_and_keeps_its_state() -> None:
    generator = th.Generator().manual_seed(0)
    params = [th.nn.Parameter(th.randn(5, 3, generator=generator)), th.nn.Parameter(th.randn(3, generator=generator))]
    twins = [th.nn.Parameter(p.detach().clone()) for p in params]
    fused_optimizer, torch_optimizer = th.optim.Adam(params, lr=3e-3), th.optim.Adam(twins, lr=3e-3)
    adam = FusedAdam.build(fused_optimizer, params)
    assert adam is not None
    for _ in range(5):
        grads = [th.randn(p.shape, generator=generator) for p in params]
        adam.step(grads)
        for twin, grad in zip(twins, grads):
            twin.grad = grad.clone()
        torch_optimizer.step()
    for param, twin in zip(params, twins):
        th.testing.assert_close(param, twin, rtol=1e-6, atol=1e-7)
    # the state lives in the optimizer: torch's own Adam continues from it
    assert fused_optimizer.state_dict()["state"].keys() == torch_optimizer.state_dict()["state"].keys()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        th.testing.assert_close(fused_optimizer.state[params[0]][key], torch_optimizer.state[twins[0]][key])
    assert FusedAdam.build(th.optim.Adam(params, weight_decay=0.1), params) is None
    assert FusedAdam.build(th.optim.SGD(params, lr=0.1), params) is None


def test_fast_critic_is_not_used_for_other_architectures() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", policy_kwargs={"activation_fn": th.nn.ELU}, n_steps=64, batch_size=64)
    _, critic_params = model._split_parameters(th.zeros(1, 3))
    policy = model.policy
    assert FastMlpCritic.build(policy.mlp_extractor, policy.value_net, critic_params, policy.optimizer) is None
    model.learn(128)  # and the generic path trains


def test_lean_paths_respect_image_normalisation_with_mlp_policy() -> None:
    from stable_baselines3.common.envs import FakeImageEnv

    from sb3_trpo_ext.common.mlp_fisher import MlpFisher

    def rollout(generic: bool) -> TRPO:
        env = FakeImageEnv(screen_height=8, screen_width=8, n_channels=1, discrete=True)
        env.observation_space.seed(0)  # the fake images come from the space's own random generator
        model = TRPO("MlpPolicy", env, n_steps=40, batch_size=40, policy_kwargs={"net_arch": [8]}, seed=3)
        if generic:
            model._lean_policy_step = lambda: None  # type: ignore[method-assign]
        model.learn(40)  # one rollout (observations in [0, 255], divided by 255 by SB3's preprocessing) and one update
        return model

    lean, generic = rollout(False), rollout(True)
    for field in FIELDS:
        np.testing.assert_array_equal(
            getattr(lean.rollout_buffer, field), getattr(generic.rollout_buffer, field), err_msg=field
        )
    for name, value in lean.policy.state_dict().items():
        assert th.equal(value, generic.policy.state_dict()[name]), name
    assert lean._mlp_fisher is False  # the written-out product assumes float-cast observations only
    assert MlpFisher.build(lean.policy, lean.observation_space, False, lean._split_parameters(th.zeros(1, 8, 8, 1))[0]) is None


class ScaledValuePolicy(ActorCriticPolicy):
    """A user subclass whose value and action distribution differ from what its modules alone compute."""

    def predict_values(self, obs: th.Tensor) -> th.Tensor:  # type: ignore[override]
        return 10.0 * super().predict_values(obs)

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor) -> Distribution:
        distribution = super()._get_action_dist_from_latent(latent_pi)
        distribution.distribution = th.distributions.Normal(
            distribution.distribution.mean * 3.0, distribution.distribution.stddev
        )
        return distribution


def test_policy_subclasses_take_the_generic_fisher_product_and_critic_fit() -> None:
    # The specialised paths write out the forward pass of SB3's own classes; a subclass may override it
    model = TRPO(ScaledValuePolicy, "Pendulum-v1", n_steps=256, batch_size=64, n_critic_updates=30, seed=0)
    model.learn(256)
    assert model._mlp_fisher is False and model._fast_critic is False
    # The critic regression fits the values the subclass predicts
    data = next(model.rollout_buffer.get(batch_size=None))
    with th.no_grad():
        before = F.mse_loss(model.policy.predict_values(data.observations).flatten(), data.returns).item()
    model._critic_regression(data.observations, data.returns)
    with th.no_grad():
        after = F.mse_loss(model.policy.predict_values(data.observations).flatten(), data.returns).item()
    assert after < 0.8 * before  # (the written-out fit, which ignores the override, makes it about 10x worse)
    standard = TRPO("MlpPolicy", "Pendulum-v1", n_steps=256, batch_size=64)
    standard.learn(256)
    assert isinstance(standard._mlp_fisher, MlpFisher) and isinstance(standard._fast_critic, FastMlpCritic)


def _policy_params(policy: th.nn.Module) -> list[th.Tensor]:
    return [p.detach().clone() for p in policy.parameters()]


def test_a_policy_replaced_between_learn_calls_is_the_one_trained() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=128, batch_size=64, seed=0)
    model.learn(128)
    old_policy = model.policy
    model.policy = model.policy_class(model.observation_space, model.action_space, model.lr_schedule, **model.policy_kwargs)
    old_before, new_before = _policy_params(old_policy), _policy_params(model.policy)
    model.learn(128, reset_num_timesteps=False)
    assert all(th.equal(a, b) for a, b in zip(old_before, old_policy.parameters()))
    critic = model.policy.value_net.weight
    assert not th.equal(critic.detach(), new_before[[p is critic for p in model.policy.parameters()].index(True)])


def test_a_replaced_optimizer_is_the_one_the_critic_uses() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=128, batch_size=64, seed=0)
    model.learn(128)
    model.policy.optimizer = th.optim.Adam(model.policy.parameters(), lr=0.0)
    model.learning_rate = 0.0
    model._setup_lr_schedule()
    value_net = [p.detach().clone() for p in model.policy.mlp_extractor.value_net.parameters()]
    model.learn(128, reset_num_timesteps=False)
    assert all(th.equal(a, b) for a, b in zip(value_net, model.policy.mlp_extractor.value_net.parameters()))


def test_layers_frozen_between_learn_calls_stay_frozen_and_the_rest_trains() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=128, batch_size=64, seed=0)
    model.learn(128)
    frozen = list(model.policy.mlp_extractor.policy_net.parameters())
    for p in frozen:
        p.requires_grad_(False)
    before = [p.clone() for p in frozen]
    critic_before = model.policy.value_net.weight.detach().clone()
    model.learn(256, reset_num_timesteps=False)
    assert all(th.equal(a, b) for a, b in zip(before, frozen))
    assert not th.equal(critic_before, model.policy.value_net.weight.detach())
    assert not any(p is q for p in frozen for q in model._actor_params or [])


@pytest.mark.parametrize("algorithm", ["TRPO", "TRPO-gSDE", "RecurrentTRPO"])
def test_a_frozen_log_std_stays_fixed_and_the_mean_still_takes_trust_region_steps(algorithm: str) -> None:
    from sb3_trpo_ext import RecurrentTRPO

    if algorithm == "RecurrentTRPO":
        model: TRPO = RecurrentTRPO("MlpLstmPolicy", "Pendulum-v1", n_steps=128, batch_size=64, seed=0)
    else:
        model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=128, batch_size=64, seed=0, use_sde=algorithm == "TRPO-gSDE")
    model.policy.log_std.requires_grad_(False)  # a fixed exploration noise
    log_std = model.policy.log_std.detach().clone()
    action_net = model.policy.action_net.weight.detach().clone()
    successes = []

    class Record(BaseCallback):
        def _on_rollout_start(self) -> None:
            successes.append(self.logger.name_to_value.get("train/line_search_success"))

        def _on_step(self) -> bool:
            return True

    model.learn(512, callback=Record())
    successes.append(model.logger.name_to_value.get("train/line_search_success"))
    assert th.equal(log_std, model.policy.log_std)
    assert 1.0 in successes
    assert not th.equal(action_net, model.policy.action_net.weight.detach())


class DeterministicHeadAtRolloutStart(BaseCallback):
    """At each rollout start, a new action head that all but always chooses action 0 (as a user might swap it)."""

    def _on_rollout_start(self) -> None:
        policy = self.model.policy
        head = th.nn.Linear(policy.action_net.in_features, 2)
        with th.no_grad():
            head.weight.zero_()
            head.bias.copy_(th.tensor([30.0, -30.0]))
        policy.action_net = head

    def _on_step(self) -> bool:
        return True


def _maskable_cartpole() -> gym.Env:
    from sb3_contrib.common.wrappers import ActionMasker

    return ActionMasker(gym.make("CartPole-v1"), lambda _: np.ones(2, dtype=bool))


@pytest.mark.parametrize("algorithm", ["TRPO", "MaskableTRPO", "RecurrentTRPO"])
def test_rollout_acts_with_the_policy_as_callbacks_leave_it_at_rollout_start(algorithm: str) -> None:
    from sb3_trpo_ext import MaskableTRPO, RecurrentTRPO

    if algorithm == "TRPO":
        model: TRPO = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), n_steps=64, seed=0)
    elif algorithm == "MaskableTRPO":
        model = MaskableTRPO("MlpPolicy", make_vec_env(_maskable_cartpole, n_envs=2, seed=0), n_steps=64, seed=0)
    else:
        model = RecurrentTRPO("MlpLstmPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), n_steps=64, seed=0)
    model.learn(128, callback=DeterministicHeadAtRolloutStart())
    assert (model.rollout_buffer.actions == 0).all()


class CollapseStdAtRolloutStart(BaseCallback):
    """Exploration annealed from a callback: log_std set at rollout start; each step's stored log-probabilities
    compared with the policy's own for the step's actions, and the actions' distance to the policy's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[float] = []
        self.noise: list[float] = []

    def _on_rollout_start(self) -> None:
        with th.no_grad():
            self.model.policy.log_std.fill_(-8.0)

    def _on_step(self) -> bool:
        with th.no_grad():
            actions = th.as_tensor(self.locals["actions"])
            distribution = self.model.policy.get_distribution(self.locals["obs_tensor"])
            log_prob = distribution.log_prob(actions)
            mean = distribution.distribution.mean
        self.gaps.append(float((log_prob - self.locals["log_probs"]).abs().max()))
        self.noise.append(float((actions - mean).abs().max()))
        return True


@pytest.mark.parametrize("use_sde", [False, True])
def test_rollout_samples_with_the_log_std_a_callback_sets_at_rollout_start(use_sde: bool) -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = TRPO("MlpPolicy", env, n_steps=64, seed=0, use_sde=use_sde, sde_sample_freq=4 if use_sde else -1)
    callback = CollapseStdAtRolloutStart()
    model.learn(128, callback=callback)
    assert len(callback.gaps) == 128 // 2
    assert max(callback.gaps) <= 1e-3  # the stored log-probabilities are those of the new std
    assert max(callback.noise) <= 0.05  # and the actions were drawn with it (std exp(-8) = 3e-4, the old one 1 or more)


def test_an_optimizer_holding_part_of_the_critic_updates_only_that_part(tmp_path) -> None:
    # Fine-tuning the value head alone: the written-out critic fit must not update (or add Adam state for) the
    # critic's hidden layers, which the optimizer does not hold; the model still saves
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), n_steps=64, batch_size=64, seed=0)
    head = list(model.policy.value_net.parameters())
    model.policy.optimizer = th.optim.Adam(head, lr=1e-3)
    hidden = list(model.policy.mlp_extractor.value_net.parameters())
    hidden_before, head_before = [p.detach().clone() for p in hidden], [p.detach().clone() for p in head]
    model.learn(128)
    assert all(th.equal(a, b) for a, b in zip(hidden_before, hidden))
    assert not all(th.equal(a, b) for a, b in zip(head_before, head))
    assert set(model.policy.optimizer.state) == set(head)
    assert all(p.grad is None for p in model.policy.parameters())  # none left behind on the parameters it omits
    model.save(tmp_path / "model")  # (the optimizer's state_dict holds only its own parameters' state)
    assert (tmp_path / "model.zip").exists()


class HookCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: th.nn.Module, args: tuple, output: th.Tensor) -> None:
        self.calls += 1


def _model_with_hooked_heads(algorithm: str) -> tuple[TRPO, HookCounter, HookCounter]:
    from sb3_trpo_ext import MaskableTRPO, RecurrentTRPO

    env = make_vec_env(_maskable_cartpole if algorithm == "MaskableTRPO" else "CartPole-v1", n_envs=2, seed=0)
    cls = {"TRPO": TRPO, "MaskableTRPO": MaskableTRPO, "RecurrentTRPO": RecurrentTRPO}[algorithm]
    policy = "MlpLstmPolicy" if algorithm == "RecurrentTRPO" else "MlpPolicy"
    model = cls(policy, env, n_steps=32, batch_size=32, n_critic_updates=3, seed=0)
    actor_calls, critic_calls = HookCounter(), HookCounter()
    model.policy.action_net.register_forward_hook(actor_calls)
    model.policy.value_net.register_forward_hook(critic_calls)
    return model, actor_calls, critic_calls


@pytest.mark.parametrize("algorithm", ["TRPO", "MaskableTRPO", "RecurrentTRPO"])
def test_module_hooks_run_at_every_rollout_step_and_critic_minibatch(algorithm: str) -> None:
    # Activation logging by forward hooks: the written-out passes would skip them, so a hooked policy takes the
    # generic path, which calls its modules (two rollouts of 32 steps, each followed by an update: 3 critic epochs
    # of 2 minibatches)
    model, actor_calls, critic_calls = _model_with_hooked_heads(algorithm)
    model.learn(128)
    assert actor_calls.calls >= 2 * 32
    assert critic_calls.calls >= 2 * 32 + 2 * 3 * 2


class StoredLogProbGap(BaseCallback):
    """At each rollout's end (before the update): the stored log-probabilities against the policy's own."""

    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[float] = []

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        n = buffer.buffer_size * buffer.n_envs
        with th.no_grad():
            _, log_prob, _ = self.model.policy.evaluate_actions(
                th.as_tensor(buffer.observations.reshape(n, -1)), th.as_tensor(buffer.actions.reshape(n, -1))
            )
        self.gaps.append(float(np.abs(log_prob.numpy() - buffer.log_probs.reshape(n)).max()))

    def _on_step(self) -> bool:
        return True


def test_a_pre_hook_that_rewrites_observations_is_what_the_rollout_acts_on() -> None:
    # The stored log-probabilities are those of the policy the update differentiates (which calls the hook)
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), n_steps=32, batch_size=64, seed=0)
    model.policy.mlp_extractor.register_forward_pre_hook(lambda module, args: (args[0] * 0.0,))
    gaps = StoredLogProbGap()
    model.learn(128, callback=gaps)  # two rollouts, the second after an update
    assert len(gaps.gaps) == 2 and max(gaps.gaps) < 1e-5


@pytest.mark.parametrize("hook", ["module", "optimizer"])
def test_hooks_added_between_learn_calls_switch_to_the_generic_fisher_product_and_critic_fit(hook: str) -> None:
    # The same policy and parameter objects: only the hooks tell that the written-out passes no longer apply
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=128, batch_size=64, n_critic_updates=3, seed=0)
    model.learn(128)
    assert isinstance(model._mlp_fisher, MlpFisher) and isinstance(model._fast_critic, FastMlpCritic)
    calls = HookCounter()
    if hook == "module":
        model.policy.action_net.register_forward_hook(calls)
    else:
        model.policy.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: calls(optimizer, args, None))
    model.learn(128, reset_num_timesteps=False)
    if hook == "module":
        assert model._mlp_fisher is False and model._fast_critic is False
        assert make_lean_policy_step(model.policy, model.action_space, False) is None
    else:
        assert isinstance(model._mlp_fisher, MlpFisher) and model._fast_critic is False
        assert calls.calls == 3 * 2  # every critic step: 3 epochs of 2 minibatches


class ShiftedLinear(th.nn.Linear):
    """A head whose forward adds 1 to the ordinary Linear's output."""

    def forward(self, x: th.Tensor) -> th.Tensor:
        return super().forward(x) + 1.0


@pytest.mark.parametrize("change", ["linear_subclass_head", "instance_forward_actor", "instance_predict_values"])
def test_replaced_methods_and_layer_subclasses_take_the_generic_path(change: str) -> None:
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), n_steps=32, batch_size=64, seed=0)
    policy = model.policy
    calls = HookCounter()
    if change == "linear_subclass_head":
        head = ShiftedLinear(policy.action_net.in_features, policy.action_net.out_features)
        head.load_state_dict(policy.action_net.state_dict())
        policy.action_net = head
        policy.optimizer = policy.optimizer_class(policy.parameters(), lr=1e-3)
    elif change == "instance_forward_actor":
        forward_actor = policy.mlp_extractor.forward_actor
        policy.mlp_extractor.forward_actor = lambda features: forward_actor(features) * 0.5  # type: ignore[method-assign]
    else:
        predict_values = policy.predict_values

        def counted(obs: th.Tensor) -> th.Tensor:
            calls(policy, (obs,), None)
            return predict_values(obs)

        policy.predict_values = counted  # type: ignore[method-assign]
    gaps = StoredLogProbGap()
    model.learn(128, callback=gaps)  # two rollouts and two updates
    assert max(gaps.gaps) < 1e-5
    assert model._mlp_fisher is False
    assert model._fast_critic is False or change == "linear_subclass_head"  # (the critic is unchanged there)
    if change == "instance_predict_values":
        assert calls.calls >= 2 * 10 * 1  # the generic fit predicts every minibatch (10 epochs of 1)


def test_a_hooked_recurrent_policy_does_not_use_the_lstm_tangent_recurrence() -> None:
    from sb3_trpo_ext import RecurrentTRPO

    def trained(hooked: bool) -> RecurrentTRPO:
        # Pendulum's episodes last 200 steps: the rollouts after the first have sequences without episode starts
        model = RecurrentTRPO("MlpLstmPolicy", "Pendulum-v1", n_steps=64, batch_size=64, n_critic_updates=1, seed=0)
        if hooked:
            model.policy.lstm_actor.register_forward_hook(lambda module, args, output: None)
        model.learn(192)
        return model

    assert trained(hooked=False)._lstm_tangent is True
    assert trained(hooked=True)._lstm_tangent is False


@pytest.mark.parametrize(
    "change",
    [
        "forward_hook",
        "forward_pre_hook",
        "full_backward_hook",
        "global_forward_hook",
        "parametrization",
        "instance_forward",
        "grad_hook",
    ],
)
def test_runs_as_defined_detects_what_the_written_out_passes_would_skip(change: str) -> None:
    from sb3_trpo_ext.common.policy_utils import runs_as_defined

    net = th.nn.Sequential(th.nn.Linear(3, 4), th.nn.Tanh(), th.nn.Linear(4, 1))
    assert runs_as_defined(net)
    layer = net[2]
    handle = None
    if change == "forward_hook":
        handle = layer.register_forward_hook(lambda m, a, o: None)
    elif change == "forward_pre_hook":
        handle = layer.register_forward_pre_hook(lambda m, a: None)
    elif change == "full_backward_hook":
        handle = layer.register_full_backward_hook(lambda m, gi, go: None)
    elif change == "global_forward_hook":
        handle = th.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    elif change == "parametrization":
        th.nn.utils.parametrizations.weight_norm(layer)
    elif change == "instance_forward":
        layer.forward = lambda x: x  # type: ignore[method-assign]
    else:
        handle = layer.weight.register_hook(lambda grad: grad * 2)
    try:
        assert not runs_as_defined(net)
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None:
        assert runs_as_defined(net)
