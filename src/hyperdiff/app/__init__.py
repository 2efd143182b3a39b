"""The application: config, experiments, tasks, run directory, CLI, loggers, plots, search, export
(layer 5).
"""
