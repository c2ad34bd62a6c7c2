"""TRPO with invalid-action masking (:class:`MaskableTRPO`), built on sb3-contrib's maskable policies and buffers."""

from sb3_trpo_ext.maskable.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo_ext.maskable.trpo import MaskableTRPO

__all__ = ["CnnPolicy", "MaskableTRPO", "MlpPolicy", "MultiInputPolicy"]
