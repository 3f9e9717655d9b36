"""Training learned segmenters: typed config, datasets, samplers, loop, pseudo-labels."""

from agriseg.train.config import TrainConfig, build_train_config, load_train_config
from agriseg.train.loop import EpochResult, TrainResult, evaluate, train

__all__ = [
    "EpochResult",
    "TrainConfig",
    "TrainResult",
    "build_train_config",
    "evaluate",
    "load_train_config",
    "train",
]
