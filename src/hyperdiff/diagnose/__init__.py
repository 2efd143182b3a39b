"""Diagnostics: ``hd.check`` and its advice (layer 4, beside tuner).
"""
