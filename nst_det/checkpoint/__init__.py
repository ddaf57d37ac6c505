"""Weights files below the models: reading and checking them (weights_file), downloads and their
cache (remote). Conversion to detectron2 names lives beside the backbones: nst_det.modeling.convert.
"""
