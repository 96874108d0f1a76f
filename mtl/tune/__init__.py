"""Population-based search over the scalarization weights (DESIGN.md §4.2).

``space`` is pure (the simplex, its bounds, explore steps, fitness, policy files) and imports
neither Ray nor MLflow; ``driver`` is the only ``ray.tune`` user; ``report`` turns a finished
sweep into tables and figures. Import the driver explicitly: ``from mtl.tune.driver import
tune_weights``.
"""
