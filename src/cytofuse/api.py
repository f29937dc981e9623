"""The Python entry points of the pipeline in one place (the ``cytofuse`` command calls the same functions).

    from cytofuse.api import load_config, run_cv, write_report, train_final, predict_images
"""

from cytofuse.config import load_config, validate_config
from cytofuse.evaluation.explain import explain_run
from cytofuse.evaluation.report import write_report
from cytofuse.export import export_model_folder
from cytofuse.inference.modelfolder import load_models
from cytofuse.inference.predict import predict_images
from cytofuse.models import create_model, register_encoder, register_fusion
from cytofuse.io.readers import read_image, register_reader
from cytofuse.workflows.cv import run_cv, run_sweep
from cytofuse.workflows.demo import run_demo
from cytofuse.workflows.final import train_final
from cytofuse.workflows.patching import run_patches

__all__ = [
    "create_model", "explain_run", "export_model_folder", "load_config", "load_models", "predict_images", "read_image",
    "register_encoder", "register_fusion", "register_reader", "run_cv", "run_demo", "run_patches", "run_sweep",
    "train_final", "validate_config", "write_report",
]
