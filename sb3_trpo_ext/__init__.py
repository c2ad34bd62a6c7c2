"""sb3_trpo_ext: Trust Region Policy Optimization for Stable-Baselines3."""

from sb3_trpo_ext.maskable import MaskableTRPO
from sb3_trpo_ext.recurrent import RecurrentTRPO
from sb3_trpo_ext.trpo import TRPO, CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo_ext.version import __version__

__all__ = ["TRPO", "CnnPolicy", "MaskableTRPO", "MlpPolicy", "MultiInputPolicy", "RecurrentTRPO", "__version__"]
