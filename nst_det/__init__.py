"""nst_det: Neuron Selectivity Transfer and related knowledge transfer for detectron2.

Importing the package registers its datasets, backbones, meta-architectures and trainers with
detectron2's registries.
"""

from . import data, engine, modeling  # noqa: F401  (registration side effects)
from .config import add_nst_config

__version__ = "0.1.0"
__all__ = ["add_nst_config"]
