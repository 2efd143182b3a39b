"""The one outer loop and its plans (offline, online), guard, stopping, history, discrete
hooks, distribution over ranks (layer 4); knows no config, files or CLI.
"""
