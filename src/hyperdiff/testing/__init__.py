"""Test oracles: problems with closed-form hypergradients (layer 3, beside methods).
"""
