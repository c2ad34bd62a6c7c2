"""sb3_trpo_ext: Trust Region Policy Optimization for Stable-Baselines3."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sb3_trpo_ext.common.contrib_compat import from_sb3_contrib, kl_dimension_factor
from sb3_trpo_ext.trpo import TRPO, CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo_ext.version import __version__

if TYPE_CHECKING:
    from sb3_trpo_ext.maskable import MaskableTRPO
    from sb3_trpo_ext.recurrent import RecurrentTRPO

__all__ = [
    "TRPO",
    "CnnPolicy",
    "MaskableTRPO",
    "MlpPolicy",
    "MultiInputPolicy",
    "RecurrentTRPO",
    "__version__",
    "from_sb3_contrib",
    "kl_dimension_factor",
]

# MaskableTRPO and RecurrentTRPO build on sb3-contrib's policies and buffers (the `contrib` extra): they are imported
# on first use, so that TRPO itself needs only stable-baselines3.
_LAZY = {"MaskableTRPO": "sb3_trpo_ext.maskable", "RecurrentTRPO": "sb3_trpo_ext.recurrent"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as error:
            if error.name is not None and error.name.startswith("sb3_contrib"):
                raise ImportError(f"sb3_trpo_ext.{name} needs sb3-contrib: pip install 'sb3_trpo_ext[contrib]'") from error
            raise
        return getattr(module, name)
    raise AttributeError(f"module 'sb3_trpo_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazily imported classes are listed too (tab completion, introspection)
    return sorted({*globals(), *_LAZY})
