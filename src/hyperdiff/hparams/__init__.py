"""What is tuned: hyperparameter kinds, constraints, schedules, discrete kinds (layer 1).
"""
