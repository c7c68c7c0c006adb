"""Training: ``pretrain(config)``, ``sft(config)`` and their shared parts (config, data, checkpoints, metrics, plots).

``from k2.train import TrainConfig, build_config, pretrain`` (and ``SFTConfig``, ``sft``); the ``k2 pretrain`` and
``k2 sft`` commands are thin wrappers.
"""

from k2.train.config import SFTConfig, TrainConfig, build_config, load_run_config
from k2.train.loop import TrainingDiverged, pretrain
from k2.train.plot import plot_run
from k2.train.sft import sft

__all__ = [
    "SFTConfig",
    "TrainConfig",
    "TrainingDiverged",
    "build_config",
    "load_run_config",
    "plot_run",
    "pretrain",
    "sft",
]
