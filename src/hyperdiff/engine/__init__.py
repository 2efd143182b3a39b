"""One training at one value: data, models, optimizers, problem, training, solvers, device (layer
2).
"""
