"""Training: the TrainState, the pure sharded train step, checkpoints, and the loop of train.py."""

from t2i_jax.training.state import OptimConfig, TrainState, make_optimizer  # noqa: F401
from t2i_jax.training.step import make_train_step  # noqa: F401
