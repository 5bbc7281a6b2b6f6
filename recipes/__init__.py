"""Training recipes for localopt on CIFAR-10: ``python -m recipes.train`` (one run) and
``python -m recipes.benchmark`` (several rules, one table).  Configs in ``recipes/configs``."""
