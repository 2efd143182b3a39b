"""Outer loops: driver, sampler, guard, stopping, history, online tuning, discrete hooks,
distribution over ranks (layer 4); knows no config, files or CLI.
"""
