"""Policy aliases of :class:`sb3_trpo_ext.TRPO`: SB3's actor-critic policies, the same classes sb3-contrib's TRPO uses,
so that saved models load in either package."""

from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy

MlpPolicy = ActorCriticPolicy
CnnPolicy = ActorCriticCnnPolicy
MultiInputPolicy = MultiInputActorCriticPolicy

__all__ = ["CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
