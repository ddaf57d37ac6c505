"""The end-to-end reproduction pipeline (tools/run_pipeline.py): plan, run, report."""

from .plan import PAPER_CONFIGS, TOY_CONFIGS, TOY_SCALES, Scale, Stage, build_plan
from .records import stage_result
from .run import PipelineRunner

__all__ = ["PAPER_CONFIGS", "TOY_CONFIGS", "TOY_SCALES", "PipelineRunner", "Scale", "Stage",
           "build_plan", "stage_result"]
