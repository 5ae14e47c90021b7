"""After training: flatness measures, run reports and their figures.

Kept apart from training so that reading and comparing finished runs never pulls in the training loop,
the launchers or the sweep driver.
"""
