"""TRPO with recurrent (LSTM) policies (:class:`RecurrentTRPO`), built on sb3-contrib's recurrent policies and buffers."""

from sb3_trpo_ext.recurrent.policies import CnnLstmPolicy, MlpLstmPolicy, MultiInputLstmPolicy
from sb3_trpo_ext.recurrent.trpo import RecurrentTRPO

__all__ = ["CnnLstmPolicy", "MlpLstmPolicy", "MultiInputLstmPolicy", "RecurrentTRPO"]
