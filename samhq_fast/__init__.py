"""samhq_fast: fast, exact SAM-HQ inference.

Importing this package does not import triton; kernels load lazily when a model is built with the
Triton backend.
"""

from samhq_fast.amg import AutomaticMaskGenerator
from samhq_fast.config import (
    PRESETS,
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
    get_preset,
)
from samhq_fast.contract import Prompts, validate_prompts
from samhq_fast.modeling.sam_hq import (
    SamHQImageSegmentationOutput,
    SamHQModel,
    SamHQVisionEncoderOutput,
    SamHQVisionModel,
)
from samhq_fast.ops.backend import BackendUnavailableError
from samhq_fast.predictor import ImageEmbedding, ImageNotSetError, Predictor
from samhq_fast.weights import CheckpointError, CheckpointNotFoundError, load_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # The processor pulls in PIL; keep it lazy so `import samhq_fast` stays light.
    if name == "SamHQProcessor":
        from samhq_fast.processing import SamHQProcessor

        return SamHQProcessor
    if name == "export_onnx":  # optional extra: onnx / onnxruntime are imported when it runs
        from samhq_fast.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'samhq_fast' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "AutomaticMaskGenerator",
    "BackendUnavailableError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ImageEmbedding",
    "ImageNotSetError",
    "Predictor",
    "Prompts",
    "SamHQConfig",
    "SamHQImageSegmentationOutput",
    "SamHQMaskDecoderConfig",
    "SamHQModel",
    "SamHQProcessor",
    "SamHQPromptEncoderConfig",
    "SamHQVisionConfig",
    "SamHQVisionEncoderOutput",
    "SamHQVisionModel",
    "get_preset",
    "load_model",
    "export_onnx",
    "validate_prompts",
    "__version__",
]
