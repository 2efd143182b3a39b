"""The plans of the one outer loop, the ``hd.plans`` namespace: ``OfflinePlan`` (retrain every
outer step), ``OnlinePlan`` (a window of one training per outer step), ``MetaPlan`` (a
batch of tasks of a distribution per outer step), their contract
(:class:`~hyperdiff.tuner.plan.Plan`, :class:`~hyperdiff.tuner.plan.Outcome`) and the online
result.

>>> import hyperdiff as hd
>>> hd.plans.OnlinePlan(window=10).window
10
"""

from hyperdiff.tuner.meta_plan import MetaPlan
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.online_plan import OnlinePlan, OnlineResult
from hyperdiff.tuner.plan import Outcome, Plan

__all__ = ["MetaPlan", "OfflinePlan", "OnlinePlan", "OnlineResult", "Outcome", "Plan"]
