import os

import pytest
import torch as th

# Small tensor ops dominate these tests: one thread is faster and keeps results reproducible on shared machines.
th.set_num_threads(1)
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    th.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_unless_named(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The suite's expectations are the CPU's (bit-identity with SB3's CPU code, float32 tolerances, NumPy paths), so on
    a machine with a GPU ``device="auto"`` means the CPU here; ``tests/test_cuda.py`` asks for the GPU by name.
    """
    if th.cuda.is_available() and request.node.path.name != "test_cuda.py":
        from stable_baselines3.common import base_class, buffers, policies, save_util, utils

        get_device = utils.get_device
        for module in (base_class, buffers, policies, save_util):
            monkeypatch.setattr(module, "get_device", lambda device="auto": get_device("cpu" if device == "auto" else device))
