"""On a CUDA device the three algorithms take the fast paths they take on the CPU and make the policy step they make
there: the same rollout, handed to a CPU model and a CUDA model with the same weights, gives the same step (the
critic's minibatches are drawn from the device's own random stream, so its fit is compared by its loss only). They
learn, predict, save and load on every action space and policy kind, and bad input gets the CPU's clear error rather
than a device-side assertion. Skipped without a GPU (the rest of the suite runs on the CPU: see conftest.py)."""

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv, SimpleMultiObsEnv
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo_ext import TRPO, MaskableTRPO, RecurrentTRPO
from sb3_trpo_ext.common.critic import FastMlpCritic
from sb3_trpo_ext.common.mlp_fisher import MlpFisher
from tests.helpers import make_identity_env
from tests.test_bad_input import NaNObservation

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")

LSTM = {"lstm_hidden_size": 16, "net_arch": [16]}


def _masked_env() -> Any:
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    return InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10)


def _vec(make_env: Any, n_envs: int = 2) -> Any:
    return make_vec_env(make_env, n_envs=n_envs, seed=0)


def _identity(kind: str) -> Callable[[], Any]:
    return lambda: make_identity_env(kind)


#: Model constructors by case, taking the device; the update of each is compared with the CPU's.
CASES: dict[str, Callable[[str], BaseAlgorithm]] = {
    "TRPO-Pendulum": lambda device: TRPO("MlpPolicy", _vec("Pendulum-v1"), n_steps=128, batch_size=64, seed=0, device=device),
    "TRPO-CartPole": lambda device: TRPO("MlpPolicy", _vec("CartPole-v1"), n_steps=128, batch_size=64, seed=0, device=device),
    "TRPO-MultiDiscrete": lambda device: TRPO(
        "MlpPolicy", _vec(_identity("multidiscrete")), n_steps=64, batch_size=64, seed=0, device=device
    ),
    "TRPO-MultiBinary": lambda device: TRPO(
        "MlpPolicy", _vec(_identity("multibinary")), n_steps=64, batch_size=64, seed=0, device=device
    ),
    "TRPO-gSDE-VecNormalize": lambda device: TRPO(
        "MlpPolicy",
        VecNormalize(_vec("Pendulum-v1")),
        n_steps=64,
        batch_size=64,
        use_sde=True,
        sde_sample_freq=4,
        seed=0,
        device=device,
    ),
    "TRPO-Dict": lambda device: TRPO(
        "MultiInputPolicy", _vec(SimpleMultiObsEnv), n_steps=64, batch_size=64, seed=0, device=device
    ),
    "TRPO-Cnn": lambda device: TRPO(
        "CnnPolicy",
        _vec(lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)),
        n_steps=32,
        batch_size=32,
        seed=0,
        device=device,
    ),
    "MaskableTRPO": lambda device: MaskableTRPO(
        "MlpPolicy", _vec(_masked_env), n_steps=128, batch_size=64, seed=0, device=device
    ),
    "RecurrentTRPO-CartPole": lambda device: RecurrentTRPO(
        "MlpLstmPolicy", _vec("CartPole-v1"), n_steps=64, batch_size=64, seed=0, device=device, policy_kwargs=LSTM
    ),
    "RecurrentTRPO-Pendulum": lambda device: RecurrentTRPO(
        "MlpLstmPolicy", _vec("Pendulum-v1"), n_steps=64, batch_size=64, seed=0, device=device, policy_kwargs=LSTM
    ),
    "RecurrentTRPO-gSDE": lambda device: RecurrentTRPO(
        "MlpLstmPolicy",
        _vec("Pendulum-v1"),
        n_steps=64,
        batch_size=64,
        use_sde=True,
        seed=0,
        device=device,
        policy_kwargs=LSTM,
    ),
    "RecurrentTRPO-shared-lstm": lambda device: RecurrentTRPO(
        "MlpLstmPolicy",
        _vec(_identity("discrete")),
        n_steps=32,
        batch_size=64,
        seed=0,
        device=device,
        policy_kwargs={**LSTM, "shared_lstm": True, "enable_critic_lstm": False},
    ),
}

#: Parameter names of the critic in SB3's and sb3-contrib's actor-critic policies.
CRITIC_PREFIXES = ("value_net.", "mlp_extractor.value_net.", "lstm_critic.", "vf_features_extractor.")
LOGGED = ("train/kl_divergence_loss", "train/line_search_success", "train/surrogate_after", "train/value_loss")


def _flat(model: BaseAlgorithm, part: str = "all") -> th.Tensor:
    named = [
        p
        for name, p in model.policy.named_parameters()
        if part == "all" or (part == "critic") == name.startswith(CRITIC_PREFIXES)
    ]
    return th.cat([p.detach().double().cpu().flatten() for p in named])


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_update_equals_the_cpu_update(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(th.backends.cudnn, "allow_tf32", False)  # cuDNN's convolutions in float32, as on the CPU
    cpu, gpu = CASES[case]("cpu"), CASES[case]("cuda")
    gpu.policy.load_state_dict(cpu.policy.state_dict())
    assert all(p.is_cuda for p in gpu.policy.parameters())

    # one rollout on the CPU, then the same buffer for both
    total = cpu.n_steps * cpu.n_envs
    _, callback = cpu._setup_learn(total, None)
    callback.on_training_start(locals(), globals())
    assert cpu.collect_rollouts(cpu.env, callback, cpu.rollout_buffer, cpu.n_steps)
    gpu._setup_learn(total, None)
    buffer = copy.deepcopy(cpu.rollout_buffer)
    buffer.device = th.device("cuda")
    gpu.rollout_buffer = buffer

    actor, critic = _flat(cpu, "actor"), _flat(cpu, "critic")
    for model in (cpu, gpu):  # sb3-contrib's recurrent buffer cuts its sequences at a random point
        np.random.seed(0)
        th.manual_seed(0)
        model.train()
    step_cpu, step_gpu = _flat(cpu, "actor") - actor, _flat(gpu, "actor") - actor
    assert float(step_cpu.norm()) > 0.0, "the CPU update did not move the policy"
    # float32 on both: the devices' kernels round differently, and conjugate gradient carries it into the step
    assert float((step_gpu - step_cpu).norm()) <= 1e-3 * float(step_cpu.norm())
    assert not th.equal(_flat(gpu, "critic"), critic), "the critic was not fitted on the GPU"
    assert all(p.is_cuda for p in gpu.policy.parameters())
    values = {key: (cpu.logger.name_to_value[key], gpu.logger.name_to_value[key]) for key in LOGGED}
    for key in ("train/kl_divergence_loss", "train/line_search_success", "train/surrogate_after"):
        assert np.isclose(*values[key], rtol=1e-2, atol=1e-7), (key, values[key])
    assert np.isclose(*values["train/value_loss"], rtol=0.5), values["train/value_loss"]


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_cuda_takes_the_fast_paths_the_cpu_takes(env_id: str) -> None:
    models = {
        device: TRPO("MlpPolicy", env_id, n_steps=256, batch_size=64, device=device, seed=0) for device in ("cpu", "cuda")
    }
    for model in models.values():
        assert model._lean_policy_step() is not None
        model.learn(512)
        assert isinstance(model._fast_critic, FastMlpCritic)
    assert isinstance(models["cuda"]._mlp_fisher, MlpFisher) == isinstance(models["cpu"]._mlp_fisher, MlpFisher)


class _OnDevice(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def _on_step(self) -> bool:
        self.checked += int(all(p.is_cuda for p in self.model.policy.parameters()))
        return True


@pytest.mark.parametrize("case", sorted(CASES))
def test_learn_predict_save_load_on_cuda(case: str, tmp_path: Path) -> None:
    model = CASES[case]("cuda")
    callback = _OnDevice()
    model.learn(2 * model.n_steps * model.n_envs, callback=callback)
    assert callback.checked == callback.n_calls > 0
    assert model.logger.name_to_value["train/policy_step_skipped"] == 0.0
    env = model.get_env()
    obs = env.reset()
    kwargs = {"action_masks": np.stack(env.env_method("action_masks"))} if case == "MaskableTRPO" else {}
    actions, _ = model.predict(obs, deterministic=True, **kwargs)
    assert model.action_space.contains(actions[0])
    model.save(tmp_path / "model")
    loaded = type(model).load(tmp_path / "model", device="cuda")
    assert th.equal(_flat(loaded), _flat(model))
    loaded_cpu = type(model).load(tmp_path / "model", device="cpu")
    assert all(not p.is_cuda for p in loaded_cpu.policy.parameters())
    assert th.equal(_flat(loaded_cpu), _flat(model))


@pytest.mark.parametrize("cls", [TRPO, MaskableTRPO])
def test_nan_observation_gives_the_cpus_error_and_leaves_the_device_usable(cls: type[TRPO]) -> None:
    # torch.multinomial's own check is a device-side assertion, after which no CUDA call of the process works
    env = make_vec_env("CartPole-v1", n_envs=3, seed=0, wrapper_class=NaNObservation, wrapper_kwargs={"after": 10**9})
    env.envs[1].after = 5  # type: ignore[attr-defined]
    if cls is MaskableTRPO:
        from sb3_contrib.common.wrappers import ActionMasker

        env = make_vec_env(
            "CartPole-v1",
            n_envs=3,
            seed=0,
            wrapper_class=lambda e: ActionMasker(NaNObservation(e, after=5), lambda _: np.ones(2, dtype=bool)),
        )
    model = cls("MlpPolicy", env, n_steps=32, batch_size=16, seed=0, device="cuda")
    with pytest.raises(ValueError, match=r"NaN for environment index"):
        model.learn(64)
    assert float(th.ones(3, device="cuda").sum()) == 3.0


@pytest.mark.parametrize("optimizer_class", [th.optim.RMSprop, th.optim.AdamW], ids=["RMSprop", "AdamW"])
def test_critic_overflow_guard_with_optimizers_keeping_their_step_on_the_cpu(optimizer_class: type) -> None:
    # torch's RMSprop and AdamW keep state["step"] on the CPU beside CUDA parameters: the guard checks per device
    model = TRPO(
        "MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0, device="cuda",
        policy_kwargs={"optimizer_class": optimizer_class},
    )  # fmt: skip
    model.learn(128)
    assert model._critic_params and all(p.device.type == "cuda" for p in model._critic_params)
    assert "train/critic_update_skipped" not in model.logger.name_to_value


@pytest.mark.parametrize("algorithm", ["TRPO", "MaskableTRPO", "RecurrentTRPO"])
def test_policy_with_batch_norm_trains_on_cuda(algorithm: str) -> None:
    # the actor's parameters are found by a forward pass in evaluation mode; for RecurrentTRPO its backward pass
    # through the LSTM must not reach cuDNN's, which refuses a backward pass in evaluation mode
    from tests.test_invariants import batch_norm_model

    model = batch_norm_model(algorithm, device="cuda")
    model.learn(128)
    assert model.logger.name_to_value["train/n_updates"] == 2
    assert all(p.device.type == "cuda" for p in model._actor_params)
