"""nst_det: Neuron Selectivity Transfer and related knowledge transfer for detectron2."""

__version__ = "0.1.0"
