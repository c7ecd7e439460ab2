"""The training loop shared by all pretraining methods: schedules, checkpoints, DDP/FSDP2.

Entry point: :func:`train`; a run killed at any step and started again resumes from
its last save under ``run_dir/checkpoints/`` to the same weights, bit for bit on CPU.
"""
from .checkpoint import latest_path, read_checkpoint, read_pointer
from .config import TrainConfig
from .distributed import DistEnv, init_distributed, is_main, transformer_blocks
from .logging import read_log
from .loop import DataIterFactory, Preempted, TrainResult, train
from .schedules import CosineSchedule

__all__ = [
    "CosineSchedule",
    "DataIterFactory",
    "DistEnv",
    "Preempted",
    "TrainConfig",
    "TrainResult",
    "init_distributed",
    "is_main",
    "latest_path",
    "read_checkpoint",
    "read_log",
    "read_pointer",
    "train",
    "transformer_blocks",
]
