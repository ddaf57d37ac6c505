"""The GPU check behind tools/gpu_check.py: bundle (prepare/install), runner (parts in child
processes under time limits), parts and paper_shapes (what is measured), check (the CLI).

Importable by a bare interpreter (stdlib and tabulate only at import time): it runs on the GPU
machine before detectron2 is installed there.
"""
