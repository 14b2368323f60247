"""Ray Tune sweeps over the platform's own training: the `tune:` section -> trials that are Ray Train runs
of the one training loop -> results, leaderboard, MLflow runs and the best model in the registry."""

__all__ = ["results", "space", "sweep", "tracking", "trainable"]
