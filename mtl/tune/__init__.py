"""Population-based search over the scalarization weights (DESIGN.md §4.2).

``space`` is pure (the simplex, its bounds, explore steps, fitness, policy files) and imports
neither Ray nor MLflow. The Ray Tune driver that runs one ``TorchTrainer`` per trial is not
on main yet (work in progress on the ``wip/tune-pbt`` branch).
"""
