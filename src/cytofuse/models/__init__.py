"""Model registry, encoders and fusion heads.

``create_model(name, in_channels=..., num_classes=..., encoder=...)`` builds one of
``list_models()`` ("early", "intermediate", "late", "single") over one of
``list_encoders()``. Every model maps (B, C, H, W) patches to (B, K) logits and has
``forward_features``, ``head`` and ``gradcam_layers()``.
"""

from cytofuse.models.encoders import ResNetEncoder, SmallCNN, create_encoder, list_encoders, register_encoder
from cytofuse.models.fusion import (
    CytofuseModel,
    EarlyFusion,
    IntermediateFusion,
    LateFusion,
    LateFusionHead,
    SingleChannel,
    branch_validation_weights,
    channel_slice,
)
from cytofuse.models.registry import (
    apply_pretrained,
    count_parameters,
    create_model,
    list_models,
    load_model,
    register_fusion,
)
from cytofuse.models.weights import (
    LoadReport,
    adapt_first_conv,
    load_encoder_weights,
    load_weights,
    read_model_config,
    read_state_dict,
    save_weights,
)

__all__ = [
    "CytofuseModel",
    "EarlyFusion",
    "IntermediateFusion",
    "LateFusion",
    "LateFusionHead",
    "LoadReport",
    "ResNetEncoder",
    "SingleChannel",
    "SmallCNN",
    "adapt_first_conv",
    "apply_pretrained",
    "branch_validation_weights",
    "channel_slice",
    "count_parameters",
    "create_encoder",
    "create_model",
    "list_encoders",
    "list_models",
    "load_encoder_weights",
    "load_model",
    "load_weights",
    "read_model_config",
    "read_state_dict",
    "register_encoder",
    "register_fusion",
    "save_weights",
]
