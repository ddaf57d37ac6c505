"""Registry of trainers, so a config picks its trainer by name (cfg.NST_DET.TRAINER)."""

from fvcore.common.registry import Registry

TRAINER_REGISTRY = Registry("NST_TRAINER")
TRAINER_REGISTRY.__doc__ = """
Trainers (nst_det.engine.reliable.ReliableTrainer subclasses) selectable by `cfg.NST_DET.TRAINER`.
"""
