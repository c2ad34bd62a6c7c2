"""RecurrentTRPO: LSTM states carried across steps and reset at episode starts, padded sequences replayed exactly, the
trust-region step (surrogate, KL, Fisher-vector product, line search) over real steps only, and a task that needs
memory, where feed-forward TRPO fails."""

import os
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvBox, IdentityEnvMultiBinary
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.recurrent import RecurrentTRPO
from tests.helpers import MultiActionEnv, bit_identical, detached_copy, parameters_snapshot, summed_kl

TINY_LSTM = {"net_arch": [8], "lstm_hidden_size": 8}


def make_env(kind: str) -> gym.Env:
    """Short episodes, so that a rollout holds many episode starts and sequences of different lengths."""
    if kind == "discrete":
        return IdentityEnv(dim=3, ep_length=7)
    if kind == "box":
        return IdentityEnvBox(ep_length=7)
    if kind == "multibinary":
        return IdentityEnvMultiBinary(dim=3, ep_length=7)
    if kind == "multidiscrete":  # Box observations (an LSTM cannot take MultiDiscrete ones: sb3-contrib's sizes)
        return gym.wrappers.TimeLimit(MultiActionEnv(gym.spaces.MultiDiscrete([3, 2, 4])), max_episode_steps=7)
    if kind == "cartpole":  # Box observations, Discrete actions
        return gym.make("CartPole-v1", max_episode_steps=7)
    raise ValueError(kind)


def only_collected(kind: str, n_envs: int = 3, **kwargs: object) -> RecurrentTRPO:
    """A tiny model whose buffer holds one rollout collected by the current parameters (no update yet)."""
    kwargs.setdefault("policy_kwargs", TINY_LSTM)
    env = make_vec_env(lambda: make_env(kind), n_envs=n_envs, seed=0)
    model = RecurrentTRPO("MlpLstmPolicy", env, n_steps=20, batch_size=20, seed=0, **kwargs)  # type: ignore[arg-type]
    _, callback = model._setup_learn(20 * n_envs, None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, 20)  # type: ignore[arg-type]
    return model


def reference_distributions(model: RecurrentTRPO, data: object) -> list[th.distributions.Distribution]:
    """The policy on the buffer's real steps through sb3-contrib's own step-by-step LSTM loop (stored states, episode
    starts applied inside the sequences), as plain torch distributions: independent of RecurrentTRPO's batching."""
    distribution, _ = model.policy.get_distribution(data.observations, data.lstm_states.pi, data.episode_starts)  # type: ignore[attr-defined]
    real = data.mask > 0.5  # type: ignore[attr-defined]
    inner = distribution.distribution
    parts = list(inner) if isinstance(inner, list) else [inner]
    out: list[th.distributions.Distribution] = []
    for d in parts:
        if isinstance(d, th.distributions.Normal):
            out.append(th.distributions.Normal(d.loc[real], d.scale[real]))
        elif isinstance(d, th.distributions.Categorical):
            out.append(th.distributions.Categorical(logits=d.logits[real]))
        else:
            out.append(th.distributions.Bernoulli(logits=d.logits[real]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Sequences: hidden states carried and reset, padding ignored
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["discrete", "box", "multibinary"])
def test_replayed_sequences_reproduce_the_rollout_log_probabilities(kind: str) -> None:
    # The rollout carried the LSTM state step to step and reset it at episode starts; the update replays the padded
    # sequences in one LSTM call from the stored states. Same parameters, so every real step must get back exactly its
    # rollout log-probability: ratio 1, and the surrogate equals the advantage mean.
    model = only_collected(kind)
    data = next(model.rollout_buffer.get(batch_size=None))
    batch = model._prepare_sequences(data)
    assert batch.real.numel() == 60 and bool(th.all(data.episode_starts[batch.real].sum() > 3))
    assert batch.real.numel() < batch.n_seq * batch.max_length  # there is padding
    actions = data.actions.float()
    if kind == "discrete":
        actions = actions.long().flatten()
    model._sequences = batch
    advantages = th.randn(60)
    surrogate, params = model._surrogate(data.observations, actions, data.old_log_prob[batch.real], advantages)
    assert surrogate.item() == pytest.approx(advantages.mean().item(), abs=1e-5)
    assert params.tensors[0].shape[0] == 60  # padding rows are dropped before KL and Fisher
    distribution, _ = model.policy.get_distribution(data.observations, batch.states_pi, batch.episode_starts)
    np.testing.assert_allclose(
        distribution.log_prob(actions)[batch.real].detach().numpy(), data.old_log_prob[batch.real].numpy(), atol=1e-5
    )


def test_predict_carries_the_state_and_resets_it_at_episode_start() -> None:
    model = RecurrentTRPO("MlpLstmPolicy", make_env("box"), n_steps=16, batch_size=16, policy_kwargs=TINY_LSTM, seed=0)
    obs = np.array([[0.3]], dtype=np.float32)
    action0, state = model.predict(obs, deterministic=True)
    assert state is not None and state[0].shape == (1, 1, 8)
    action1, state1 = model.predict(obs, state=state, episode_start=np.array([False]), deterministic=True)
    assert not np.allclose(state1[0], state[0])  # the state moved on
    assert not np.allclose(action1, action0)  # and the action depends on it
    action_reset, _ = model.predict(obs, state=state1, episode_start=np.array([True]), deterministic=True)
    np.testing.assert_allclose(action_reset, action0)  # episode start: as from a zero state


# --------------------------------------------------------------------------------------------------------------
# The trust-region step over real steps
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["discrete", "box", "multibinary"])
def test_accepted_step_satisfies_the_trust_region_on_real_steps(kind: str) -> None:
    target_kl = 0.01
    model = only_collected(kind, target_kl=target_kl, cg_damping=0.01)
    data = next(model.rollout_buffer.get(batch_size=None))
    old = [detached_copy(d) for d in reference_distributions(model, data)]
    model.train()
    values = model.logger.name_to_value
    assert values["train/line_search_success"] == 1.0
    with th.no_grad():
        kl = summed_kl(old, reference_distributions(model, data)).mean().item()
    assert kl <= target_kl * (1 + 1e-5)
    assert values["train/kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert values["train/surrogate_after"] > values["train/surrogate_before"]


def explicit_fisher(model: RecurrentTRPO, data: object, params: list) -> th.Tensor:
    """The Hessian of the mean KL(old || new) over the buffer's real steps at the current parameters, row by row
    (independent of RecurrentTRPO's batching: sb3-contrib's step-by-step LSTM loop)."""
    old = [detached_copy(d) for d in reference_distributions(model, data)]
    mean_kl = summed_kl(old, reference_distributions(model, data)).mean()
    flat = th.cat([g.reshape(-1) for g in th.autograd.grad(mean_kl, params, create_graph=True)])
    rows = []
    for i in range(flat.numel()):
        row = th.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(th.cat([(th.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(row, params)]))
    return th.stack(rows).double()


@pytest.mark.parametrize(
    "layout",
    [{}, {"n_lstm_layers": 2}, {"shared_lstm": True, "enable_critic_lstm": False}],
    ids=["default", "two-layers", "shared-lstm"],
)
@pytest.mark.parametrize("jvp", ["recurrence", "forward_mode", "double_backward"])
@pytest.mark.parametrize("kind", ["discrete", "box"])
def test_fisher_vector_product_matches_explicit_fisher_over_sequences(kind: str, jvp: str, layout: dict) -> None:
    model = only_collected(kind, n_envs=2, policy_kwargs={"net_arch": [3], "lstm_hidden_size": 3, **layout})
    if jvp == "forward_mode":
        model._lstm_tangent = False  # as for a policy the recurrence does not apply to
    data = next(model.rollout_buffer.get(batch_size=None))
    batch = model._prepare_sequences(data)
    params, _ = model._split_parameters(data.observations)
    fisher = explicit_fisher(model, data, params)

    model._sequences = batch
    actions = data.actions.float().long().flatten() if kind == "discrete" else data.actions.float()
    _, new = model._surrogate(data.observations, actions, data.old_log_prob[batch.real], th.zeros(batch.real.numel()))
    # With the observations, J v by the LSTM's tangent recurrence or by forward mode; without, TRPO's double backward
    fvp = model._fisher_vector_product_fn(params, new, new.detach(), None if jvp == "double_backward" else data.observations)
    assert model._lstm_tangent is {"recurrence": True, "forward_mode": False, "double_backward": None}[jvp]
    assert model._forward_mode_jvp is (True if jvp == "forward_mode" else None)
    assert th.backends.mkldnn.enabled  # the native kernels were only borrowed for J v
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(fisher.shape[0], generator=generator)
        expected = fisher @ v.double() + model.cg_damping * v.double()
        assert th.linalg.norm(fvp(v).double() - expected) / th.linalg.norm(expected) < 1e-4


def test_fisher_vector_product_with_gsde_matches_the_double_backward_form() -> None:
    """gSDE: the action noise's scale depends on the latent features too; the tangent recurrence's forward-mode heads
    carry that dependence. Compared with TRPO's double-backward form, an independent derivation (the float32 explicit
    Hessian of the KL is only good to about 1e-4 here, for all three forms alike)."""
    model = only_collected("box", n_envs=2, use_sde=True, policy_kwargs={"net_arch": [3], "lstm_hidden_size": 3})
    params, new, observations = fisher_product_parts(model)
    fvp = model._fisher_vector_product_fn(params, new, new.detach(), observations)
    assert model._lstm_tangent is True
    double_backward = model._fisher_vector_product_fn(params, new, new.detach(), None)
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(sum(p.numel() for p in params), generator=generator)
        expected = double_backward(v).double()
        assert th.linalg.norm(fvp(v).double() - expected) / th.linalg.norm(expected) < 1e-6


def test_critic_regression_never_moves_the_policy() -> None:
    model = only_collected("box")
    data = next(model.rollout_buffer.get(batch_size=None))
    actor, critic = model._split_parameters(data.observations)
    assert any(p is model.policy.lstm_critic.weight_hh_l0 for p in critic)  # type: ignore[union-attr]
    assert any(p is model.policy.lstm_actor.weight_hh_l0 for p in actor)
    actor_snapshot, critic_snapshot = parameters_snapshot(actor), parameters_snapshot(critic)
    model._sequences = model._prepare_sequences(data)
    losses = model._critic_regression(data.observations, data.returns)
    assert len(losses) > 0 and losses[-1] < losses[0]
    assert bit_identical(actor, actor_snapshot)
    assert not bit_identical(critic, critic_snapshot)


@pytest.mark.parametrize("policy_kwargs", [TINY_LSTM, {**TINY_LSTM, "shared_lstm": True, "enable_critic_lstm": False}])
def test_lean_critic_loss_equals_the_loss_through_predict_values(policy_kwargs: dict) -> None:
    """The critic's minibatch loss from features prepared once per update (time first, real steps weighted) is the mean
    squared error of predict_values over the minibatch's real steps, with the same gradients; the lean form applies to a
    critic LSTM of its own only (the shared LSTM's critic has no LSTM to train)."""
    model = only_collected("box", policy_kwargs=policy_kwargs)
    data = next(model.rollout_buffer.get(batch_size=None))
    model._sequences = model._prepare_sequences(data)
    _, critic = model._split_parameters(data.observations)
    returns = data.returns + th.randn(data.returns.shape, generator=th.Generator().manual_seed(0))  # a sizeable loss
    lean = model._lean_critic_loss_fn(
        data.observations,
        returns.view(model._sequences.n_seq, -1),
        (data.mask > 0.5).view(model._sequences.n_seq, -1),
        critic,
    )
    assert (lean is None) == ("shared_lstm" in policy_kwargs)
    if lean is None:
        return
    generic = model._critic_loss_fn(data.observations, returns, critic, lean=False)
    for seqs in (th.arange(model._sequences.n_seq), th.tensor([2, 0]), th.tensor([model._sequences.n_seq - 1])):
        expected, got = generic(seqs), lean(seqs)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        for g_got, g_expected in zip(th.autograd.grad(got, critic), th.autograd.grad(expected, critic)):
            th.testing.assert_close(g_got, g_expected, rtol=1e-4, atol=1e-6)


def test_critic_lstm_runs_only_to_the_longest_sequence_of_its_minibatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A minibatch of short sequences does not walk the padding that the buffer's longest sequence puts after them."""
    model = only_collected("box")
    data = next(model.rollout_buffer.get(batch_size=None))
    batch = model._sequences = model._prepare_sequences(data)
    _, critic = model._split_parameters(data.observations)
    real = (data.mask > 0.5).view(batch.n_seq, batch.max_length)
    lean = model._lean_critic_loss_fn(data.observations, data.returns.view(batch.n_seq, -1), real, critic)
    assert lean is not None
    lengths = real.sum(dim=1)
    short = th.nonzero(lengths < batch.max_length).flatten()[:2]
    assert len(short) > 0, "the rollout should hold sequences shorter than the longest"
    walked: list[int] = []
    forward = th.nn.LSTM.forward

    def recording_forward(self: th.nn.LSTM, inputs: th.Tensor, *args: object) -> object:
        walked.append(inputs.shape[0])  # time first
        return forward(self, inputs, *args)

    monkeypatch.setattr(th.nn.LSTM, "forward", recording_forward)
    lean(short)
    lean(th.arange(batch.n_seq))
    assert walked == [int(lengths[short].max()), batch.max_length]


# --------------------------------------------------------------------------------------------------------------
# Spaces, options, save/load
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy_kwargs",
    [TINY_LSTM, {**TINY_LSTM, "shared_lstm": True, "enable_critic_lstm": False}, {**TINY_LSTM, "enable_critic_lstm": False}],
    ids=["separate_lstms", "shared_lstm", "mlp_critic"],
)
@pytest.mark.parametrize("kind", ["discrete", "box", "multibinary"])
def test_runs_on_every_action_space_and_lstm_layout(kind: str, policy_kwargs: dict) -> None:
    env = make_vec_env(lambda: make_env(kind), n_envs=2, seed=0)
    model = RecurrentTRPO("MlpLstmPolicy", env, n_steps=16, batch_size=16, policy_kwargs=policy_kwargs, seed=0)
    model.learn(64)
    assert model.logger.name_to_value["train/line_search_success"] == 1.0


def test_dict_observations_with_multi_input_lstm_policy() -> None:
    class ToDict(gym.ObservationWrapper):
        def __init__(self, env: gym.Env) -> None:
            super().__init__(env)
            self.observation_space = gym.spaces.Dict({"obs": env.observation_space})

        def observation(self, observation: object) -> dict:
            return {"obs": observation}

    model = RecurrentTRPO("MultiInputLstmPolicy", ToDict(make_env("box")), n_steps=16, batch_size=16, policy_kwargs=TINY_LSTM)
    model.learn(32)
    assert model.logger.name_to_value["train/line_search_success"] == 1.0


def test_rejects_a_feed_forward_policy() -> None:
    from stable_baselines3.common.policies import ActorCriticPolicy

    with pytest.raises(ValueError, match="RecurrentActorCriticPolicy"):
        RecurrentTRPO(ActorCriticPolicy, make_env("box"), n_steps=16, batch_size=16)


def test_rejects_a_rollout_buffer_it_would_not_use() -> None:
    from stable_baselines3.common.buffers import RolloutBuffer

    with pytest.raises(ValueError, match=r"rollout_buffer_class=.*RecurrentRolloutBuffer"):
        RecurrentTRPO("MlpLstmPolicy", make_env("box"), n_steps=16, batch_size=16, rollout_buffer_class=RolloutBuffer)
    with pytest.raises(ValueError, match="rollout_buffer_kwargs="):
        RecurrentTRPO("MlpLstmPolicy", make_env("box"), n_steps=16, batch_size=16, rollout_buffer_kwargs={})


def test_save_load_round_trip_and_load_in_recurrent_ppo(tmp_path: os.PathLike) -> None:
    model = only_collected("box", n_envs=1)
    model.train()
    path = os.path.join(tmp_path, "model.zip")
    model.save(path)
    observations = np.linspace(-1, 1, 6, dtype=np.float32).reshape(6, 1, 1)

    def rollout(agent: RecurrentTRPO | RecurrentPPO) -> np.ndarray:
        state, actions = None, []
        for i, obs in enumerate(observations):
            action, state = agent.predict(obs, state=state, episode_start=np.array([i == 3]), deterministic=True)
            actions.append(action)
        return np.concatenate(actions)

    expected = rollout(model)
    loaded = RecurrentTRPO.load(path, env=make_env("box"))
    assert loaded.target_kl == model.target_kl and loaded.n_steps == model.n_steps
    np.testing.assert_array_equal(rollout(loaded), expected)
    loaded.learn(40)  # it trains on after loading
    np.testing.assert_array_equal(rollout(RecurrentPPO.load(path, env=make_env("box"))), expected)


# --------------------------------------------------------------------------------------------------------------
# A task that needs memory: CartPole without velocities
# --------------------------------------------------------------------------------------------------------------
class NoVelocityObservation(gym.ObservationWrapper):
    """CartPole with the cart position and the pole angle only: the velocities must be inferred from the past."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high  # type: ignore[attr-defined]
        self.observation_space = gym.spaces.Box(low[[0, 2]], high[[0, 2]], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[[0, 2]]


def make_cartpole_no_velocity() -> gym.Env:
    return NoVelocityObservation(gym.make("CartPole-v1"))


# Same trust-region settings for both; the LSTM policy has one 32-unit LSTM and a 32-unit layer, the feed-forward one
# two 32-unit layers. 20480 steps: the LSTM policy scores 157-467 over seeds 0-2, the feed-forward one stays under 50
# (it sees no velocity, so it cannot balance the pole for long). 100 separates the two with a wide margin.
MEMORY_SETTINGS = {"n_steps": 64, "batch_size": 128, "target_kl": 0.02, "gamma": 0.98, "seed": 0}
MEMORY_THRESHOLD = 100.0


@pytest.mark.slow
def test_lstm_policy_learns_cartpole_without_velocities_where_feed_forward_trpo_fails() -> None:
    eval_env = make_vec_env(make_cartpole_no_velocity, n_envs=1, seed=123)

    feed_forward = TRPO(
        "MlpPolicy",
        make_vec_env(make_cartpole_no_velocity, n_envs=8, seed=0),
        policy_kwargs={"net_arch": [32, 32]},
        **MEMORY_SETTINGS,  # type: ignore[arg-type]
    )
    feed_forward.learn(20480)
    feed_forward_return, _ = evaluate_policy(feed_forward, eval_env, n_eval_episodes=10, deterministic=True)

    recurrent = RecurrentTRPO(
        "MlpLstmPolicy",
        make_vec_env(make_cartpole_no_velocity, n_envs=8, seed=0),
        policy_kwargs={"net_arch": [32], "lstm_hidden_size": 32},
        **MEMORY_SETTINGS,  # type: ignore[arg-type]
    )
    recurrent.learn(20480)
    recurrent_return, _ = evaluate_policy(recurrent, eval_env, n_eval_episodes=10, deterministic=True)

    assert feed_forward_return < MEMORY_THRESHOLD < recurrent_return, (feed_forward_return, recurrent_return)


def test_gsde_and_cnn_lstm_policy() -> None:
    from stable_baselines3.common.envs import FakeImageEnv

    model = RecurrentTRPO(
        "MlpLstmPolicy", make_env("box"), n_steps=16, batch_size=16, use_sde=True, sde_sample_freq=4, policy_kwargs=TINY_LSTM
    )
    model.learn(48)
    assert model.logger.name_to_value["train/line_search_success"] == 1.0
    image_env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)
    image_env.observation_space.seed(0)  # FakeImageEnv samples its images from the space: seeded, the same every run
    cnn_kwargs = {**TINY_LSTM, "features_extractor_kwargs": {"features_dim": 16}}
    model = RecurrentTRPO("CnnLstmPolicy", image_env, n_steps=16, batch_size=16, policy_kwargs=cnn_kwargs, seed=0)
    model.learn(32)
    assert model.logger.name_to_value["train/line_search_success"] == 1.0


@pytest.mark.parametrize("jvp", ["recurrence", "forward_mode"])
def test_fisher_product_leaves_every_parameter_object_in_place(jvp: str) -> None:
    """J v runs the heads (and, in forward mode, the LSTM) with tangent-carrying copies of the actor's parameters;
    afterwards every module must hold its original parameter objects again (the optimizer and the saved state refer
    to them), shared features extractor included."""
    from stable_baselines3.common.envs import FakeImageEnv

    image_env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)
    image_env.observation_space.seed(0)  # FakeImageEnv samples its images from the space: seeded, the same every run
    cnn_kwargs = {**TINY_LSTM, "features_extractor_kwargs": {"features_dim": 16}}
    model = RecurrentTRPO("CnnLstmPolicy", image_env, n_steps=16, batch_size=16, policy_kwargs=cnn_kwargs, seed=0)
    before = dict(model.policy.named_parameters(remove_duplicate=False))
    if jvp == "forward_mode":
        model._refresh_parameter_caches()
        model._lstm_tangent = False
    model.learn(48)
    assert (model._lstm_tangent, model._forward_mode_jvp) == ((True, None) if jvp == "recurrence" else (False, True))
    after = dict(model.policy.named_parameters(remove_duplicate=False))
    assert before.keys() == after.keys() and all(before[name] is after[name] for name in before)
    optimized = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert optimized <= {id(p) for p in after.values()}


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags says it
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_lstm_tangent_recurrence_equals_forward_mode_through_nn_lstm(backend: str) -> None:
    """One LSTM layer: the recurrence's outputs are nn.LSTM's, and its tangent along random directions of the four
    weights and of the inputs is forward-mode differentiation through nn.LSTM (both walks: NumPy on the CPU, and the
    tensor walk other devices use). A missing direction (``None``) counts as zero."""
    from torch.autograd import forward_ad

    from sb3_trpo_ext.recurrent.lean_step import LSTM_WEIGHTS
    from sb3_trpo_ext.recurrent.lstm_tangent import LSTMLayerTangent

    th.manual_seed(0)
    lstm = th.nn.LSTM(3, 5)
    inputs, h0, c0 = th.randn(7, 4, 3), th.randn(1, 4, 5), th.randn(1, 4, 5)
    names = [f"{name}_l0" for name in LSTM_WEIGHTS]
    weights = [getattr(lstm, name) for name in names]
    directions = [th.randn_like(w) for w in weights]
    d_inputs = th.randn_like(inputs)
    tangent = LSTMLayerTangent(weights, inputs, (h0[0], c0[0]))
    if backend == "torch":
        tangent._numpy = None
    with th.no_grad(), th.backends.mkldnn.flags(enabled=False), forward_ad.dual_level():
        expected_out, _ = lstm(inputs, (h0, c0))
        for name, weight, direction in zip(names, weights, directions):
            lstm._parameters[name] = forward_ad.make_dual(weight.detach(), direction)  # type: ignore[assignment]
        dual_out, _ = lstm(forward_ad.make_dual(inputs, d_inputs), (h0, c0))
        expected_tangent = forward_ad.unpack_dual(dual_out).tangent
    th.testing.assert_close(tangent.outputs, expected_out, rtol=1e-5, atol=1e-6)
    th.testing.assert_close(tangent(directions, d_inputs), expected_tangent, rtol=1e-4, atol=1e-5)
    partial = [directions[0], None, directions[2], None]
    zeros = [directions[0], th.zeros_like(directions[1]), directions[2], th.zeros_like(directions[3])]
    th.testing.assert_close(tangent(partial, None), tangent(zeros, th.zeros_like(inputs)))


def fisher_product_parts(model: RecurrentTRPO) -> tuple:
    """Everything _fisher_vector_product_fn needs, from the model's collected buffer."""
    data = next(model.rollout_buffer.get(batch_size=None))
    model._sequences = model._prepare_sequences(data)
    params, _ = model._split_parameters(data.observations)
    real = model._sequences.real
    actions = data.actions.float()
    _, new = model._surrogate(data.observations, actions, data.old_log_prob[real], th.zeros(real.numel()))
    return params, new, data.observations


def test_tangent_recurrence_is_checked_against_forward_mode_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recurrence whose forward pass is right but whose J v is not (here: twice the true one) is caught on first use
    by the comparison with forward mode, and forward mode is used instead, for good; a correct one passes."""
    import sb3_trpo_ext.recurrent.trpo as recurrent_module

    correct = recurrent_module.make_lstm_jacobian_vector

    def doubled(*args: object, **kwargs: object) -> object:
        built = correct(*args, **kwargs)  # type: ignore[arg-type]
        assert built is not None
        primal, jacobian_vector = built
        return primal, lambda directions: tuple(2 * t for t in jacobian_vector(directions))

    model = only_collected("box")
    params, new, observations = fisher_product_parts(model)
    model._fisher_vector_product_fn(params, new, new.detach(), observations)
    assert model._lstm_tangent is True and model._forward_mode_jvp is None
    model._lstm_tangent = None
    monkeypatch.setattr(recurrent_module, "make_lstm_jacobian_vector", doubled)
    model._fisher_vector_product_fn(params, new, new.detach(), observations)
    assert model._lstm_tangent is False and model._forward_mode_jvp is True


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.nn.utils.weight_norm is deprecated
def test_tangent_recurrence_steps_aside_for_a_reparametrised_lstm() -> None:
    """With weight normalisation on the actor's LSTM, its trainable parameters are not the LSTM's flat weights (which
    the recurrence differentiates): the recurrence does not apply, and the Fisher product of the path taken instead
    is the explicit Fisher matrix's."""
    model = only_collected("box", n_envs=2, policy_kwargs={"net_arch": [3], "lstm_hidden_size": 3})
    th.nn.utils.weight_norm(model.policy.lstm_actor, "weight_hh_l0")
    model._refresh_parameter_caches()
    params, new, observations = fisher_product_parts(model)
    assert any(p is model.policy.lstm_actor.weight_hh_l0_v for p in params)
    fvp = model._fisher_vector_product_fn(params, new, new.detach(), observations)
    assert model._lstm_tangent is False
    fisher = explicit_fisher(model, next(model.rollout_buffer.get(batch_size=None)), params)
    v = th.randn(fisher.shape[0], generator=th.Generator().manual_seed(0))
    expected = fisher @ v.double() + model.cg_damping * v.double()
    assert th.linalg.norm(fvp(v).double() - expected) / th.linalg.norm(expected) < 1e-4


def test_tangent_recurrence_follows_the_features_extractor() -> None:
    """With a CNN features extractor among the actor's parameters, the recurrence takes the features' tangents as
    LSTM input tangents: its Fisher-vector product equals the forward-mode one (checked against an explicit Fisher
    matrix above) on random directions."""
    from stable_baselines3.common.envs import FakeImageEnv

    image_env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)
    image_env.observation_space.seed(0)  # FakeImageEnv samples its images from the space: seeded, the same every run
    cnn_kwargs = {**TINY_LSTM, "features_extractor_kwargs": {"features_dim": 16}}
    model = RecurrentTRPO("CnnLstmPolicy", image_env, n_steps=16, batch_size=16, policy_kwargs=cnn_kwargs, seed=0)
    _, callback = model._setup_learn(16, None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, 16)  # type: ignore[arg-type]
    data = next(model.rollout_buffer.get(batch_size=None))
    model._sequences = model._prepare_sequences(data)
    params, _ = model._split_parameters(data.observations)
    extractor = {id(p) for p in model.policy.pi_features_extractor.parameters()}
    assert any(id(p) in extractor for p in params)
    real = model._sequences.real
    actions = data.actions.long().flatten()
    _, new = model._surrogate(data.observations, actions, data.old_log_prob[real], th.zeros(real.numel()))
    products = {}
    for lstm_tangent in (None, False):
        model._lstm_tangent = lstm_tangent
        products[lstm_tangent] = model._fisher_vector_product_fn(params, new, new.detach(), data.observations)
        assert model._lstm_tangent is (lstm_tangent is None)  # the recurrence applied, then forward mode was forced
    assert model._forward_mode_jvp is True
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(sum(p.numel() for p in params), generator=generator)
        expected, got = products[False](v).double(), products[None](v).double()
        assert th.linalg.norm(got - expected) / th.linalg.norm(expected) < 1e-4


# --------------------------------------------------------------------------------------------------------------
# Lean rollout step: torch.lstm_cell instead of nn.LSTM, the same numbers
# --------------------------------------------------------------------------------------------------------------
def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


LSTM_LAYOUTS = [
    TINY_LSTM,
    {**TINY_LSTM, "shared_lstm": True, "enable_critic_lstm": False},
    {**TINY_LSTM, "enable_critic_lstm": False},
    {"net_arch": dict(pi=[8, 8], vf=[4]), "lstm_hidden_size": 8, "activation_fn": th.nn.ReLU},
]
LSTM_LAYOUT_IDS = ["separate_lstms", "shared_lstm", "mlp_critic", "relu_two_layers"]


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags says it
@pytest.mark.parametrize("policy_kwargs", LSTM_LAYOUTS, ids=LSTM_LAYOUT_IDS)
@pytest.mark.parametrize("kind", ["discrete", "box", "cartpole", "multibinary", "multidiscrete"])
def test_lean_recurrent_step_reproduces_the_policy_forward_pass(kind: str, policy_kwargs: dict) -> None:
    from sb3_contrib.common.recurrent.type_aliases import RNNStates

    from sb3_trpo_ext.recurrent.lean_step import make_lean_recurrent_step

    model = only_collected(kind, n_envs=4, policy_kwargs=policy_kwargs)
    policy = model.policy
    step = make_lean_recurrent_step(policy, model.action_space, use_sde=False)
    assert step is not None
    rng = np.random.default_rng(0)
    shape = (1, 4, 8)
    states = RNNStates(*(tuple(th.randn(shape) for _ in range(2)) for _ in range(2)))
    lean_states = states
    for t in range(30):
        obs = model.policy.obs_to_tensor(np.stack([model.observation_space.sample() for _ in range(4)]))[0]
        starts = rng.random(4) < (0.0 if t % 3 == 0 else 0.4)  # steps without and with episode starts
        seed = 1000 + t
        th.manual_seed(seed)
        with th.no_grad(), th.backends.mkldnn.flags(enabled=False):  # PyTorch's native LSTM kernel, as lstm_cell
            actions, values, log_probs, states = policy(obs, states, th.tensor(starts, dtype=th.float32))
        th.manual_seed(seed)
        with th.no_grad():
            lean_actions, lean_values, lean_log_probs, lean_states = step(
                obs, lean_states, th.tensor(starts, dtype=th.float32)
            )
        assert same_bits(actions.numpy(), lean_actions)
        assert same_bits(values.numpy(), lean_values.numpy())
        assert same_bits(log_probs.numpy(), lean_log_probs.numpy())
        for ref, lean in zip((*states.pi, *states.vf), (*lean_states.pi, *lean_states.vf)):
            assert same_bits(ref.numpy(), lean.numpy())


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags says it
@pytest.mark.parametrize("kind", ["discrete", "box", "cartpole", "multibinary", "multidiscrete"])
def test_lean_recurrent_rollout_fills_the_buffer_as_the_policy_forward_pass(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sb3_trpo_ext.recurrent.trpo as recurrent_module

    make_step, built = recurrent_module.make_lean_recurrent_step, []

    def recording(*args: object) -> object:
        built.append(make_step(*args))  # type: ignore[arg-type]
        return built[-1]

    with th.backends.mkldnn.flags(enabled=False):
        monkeypatch.setattr(recurrent_module, "make_lean_recurrent_step", recording)
        lean = only_collected(kind)
        assert built and all(step is not None for step in built)  # the lean step ran
        monkeypatch.setattr(recurrent_module, "make_lean_recurrent_step", lambda *args: None)
        generic = only_collected(kind)
    for name in ("observations", "actions", "rewards", "episode_starts", "values", "log_probs", "advantages", "returns"):
        assert same_bits(getattr(lean.rollout_buffer, name), getattr(generic.rollout_buffer, name)), name
    for name in ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf"):
        assert same_bits(getattr(lean.rollout_buffer, name), getattr(generic.rollout_buffer, name)), name
    assert lean.rollout_buffer.episode_starts[1:].any()  # the rollout crossed episode starts


def test_lean_recurrent_step_falls_back_where_it_does_not_apply() -> None:
    from sb3_trpo_ext.recurrent.lean_step import make_lean_recurrent_step

    two_layers = only_collected("box", policy_kwargs={**TINY_LSTM, "n_lstm_layers": 2})
    assert make_lean_recurrent_step(two_layers.policy, two_layers.action_space, use_sde=False) is None
    box = only_collected("box")
    assert make_lean_recurrent_step(box.policy, box.action_space, use_sde=True) is None
    # an LSTM without biases (the kernel call passes four weight tensors)
    no_bias = only_collected("box", policy_kwargs={**TINY_LSTM, "lstm_kwargs": {"bias": False}})
    assert make_lean_recurrent_step(no_bias.policy, no_bias.action_space, use_sde=False) is None
    unshared = only_collected("box", policy_kwargs={**TINY_LSTM, "share_features_extractor": False})
    assert make_lean_recurrent_step(unshared.policy, unshared.action_space, use_sde=False) is None


def test_callbacks_see_recurrent_ppos_rollout_locals() -> None:
    from stable_baselines3.common.callbacks import CallbackList

    from tests.test_fast_paths import KeysRecorder

    keys = {}
    for algo in (RecurrentTRPO, RecurrentPPO):
        env = make_vec_env(lambda: make_env("cartpole"), n_envs=2, seed=0)
        model = algo("MlpLstmPolicy", env, n_steps=16, batch_size=16, policy_kwargs=TINY_LSTM, seed=0)
        recorder = KeysRecorder()
        _, callback = model._setup_learn(32, callback=recorder)
        callback = CallbackList([recorder]) if callback is None else callback
        callback.on_training_start({}, {})
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, 16)
        keys[algo] = recorder.keys
    assert "episode_starts" in keys[RecurrentPPO]
    assert keys[RecurrentPPO] <= keys[RecurrentTRPO], keys[RecurrentPPO] - keys[RecurrentTRPO]


class OneNaNObservation(gym.Env):
    """Episodes of 10 steps; the 5th observation of the environment's life holds a NaN, once."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self) -> None:
        self.t = self.total = 0

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        self.total += 1
        obs = np.full(3, self.t / 10, np.float32)
        if self.total == 5:
            obs[0] = np.nan
        return obs, 1.0, False, self.t >= 10, {}


def test_a_nan_observation_does_not_outlive_its_episode_in_the_lstm_state() -> None:
    # the reset at an episode start used to be (1 - episode_start) * state, and 0 * NaN is NaN: every later rollout
    # held NaN and every later update was skipped
    model = RecurrentTRPO("MlpLstmPolicy", make_vec_env(OneNaNObservation, n_envs=2), n_steps=16, batch_size=16, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(32 * 6)  # 6 rollouts; the NaNs are in the first one
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    assert all(bool(th.isfinite(t).all()) for t in (*model._last_lstm_states.pi, *model._last_lstm_states.vf))
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


def test_models_trained_in_threads_of_one_process() -> None:
    # as RL Zoo's -optimize --n-jobs 2: PyTorch allows one forward-mode AD level per process, and the line search
    # switches torch.distributions' process-wide argument checks off and on
    import threading

    results: dict[int, object] = {}

    def train(seed: int) -> None:
        try:
            env = make_vec_env("CartPole-v1", n_envs=2, seed=seed)
            model = RecurrentTRPO(
                "MlpLstmPolicy", env, n_steps=64, batch_size=64, seed=seed, policy_kwargs={"lstm_hidden_size": 16}
            )
            model.learn(128 * 3)
            results[seed] = model._lstm_tangent
        except Exception as error:  # reported by the assertion below
            results[seed] = error

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {1: True, 2: True, 3: True}  # no error, and each kept the fast J v of the tangent recurrence
    assert th.distributions.Distribution._validate_args
