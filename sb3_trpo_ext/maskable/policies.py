"""Policy aliases of :class:`sb3_trpo_ext.MaskableTRPO`: sb3-contrib's maskable actor-critic policies, the same classes
``MaskablePPO`` uses, so that saved policies load in either package."""

from sb3_contrib.common.maskable.policies import (
    MaskableActorCriticCnnPolicy,
    MaskableActorCriticPolicy,
    MaskableMultiInputActorCriticPolicy,
)

MlpPolicy = MaskableActorCriticPolicy
CnnPolicy = MaskableActorCriticCnnPolicy
MultiInputPolicy = MaskableMultiInputActorCriticPolicy

__all__ = ["CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
