"""Multi-stage pipelines: named stages whose outputs feed the next, skipped when done, resumed when cut."""

from posttrain.pipeline.runner import format_plan, plan, run_pipeline
from posttrain.pipeline.spec import Pipeline, Stage, build_pipeline, load_pipeline

__all__ = ["Pipeline", "Stage", "build_pipeline", "format_plan", "load_pipeline", "plan", "run_pipeline"]
