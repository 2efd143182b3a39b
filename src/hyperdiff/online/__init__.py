"""Online tuning during one training run (see :mod:`hyperdiff.online.loop`)."""

from .loop import METHODS, OnlineResult, OnlineTuner
from .windows import Window, forward_window, implicit_window, reverse_window

__all__ = ["METHODS", "OnlineResult", "OnlineTuner", "Window", "forward_window",
           "implicit_window", "reverse_window"]
