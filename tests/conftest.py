import os

import pytest
import torch as th

# Small tensor ops dominate these tests: one thread is faster and keeps results reproducible on shared machines.
th.set_num_threads(1)
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    th.manual_seed(0)
