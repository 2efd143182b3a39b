"""``hd.diagnose``: what :func:`hyperdiff.diagnose.check` reports and which method to use.

- :class:`CheckReport`: the methods of ``hd.check`` side by side (values, hypergradients,
  agreement with a reference, time and memory) and its verdict;
- :func:`recommend` / :class:`Advice`: the method to use for a problem's size, with reasons.
"""

from hyperdiff.diagnose.advice import Advice, recommend
from hyperdiff.diagnose.check import CheckReport

__all__ = ["Advice", "CheckReport", "recommend"]
