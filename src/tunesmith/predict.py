"""Use a finished run: load its model and predict labels with probabilities."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.runlock import check_not_failed


@dataclass
class Prediction:
    label: str | list[str]
    probabilities: dict[str, float]


class TextClassifier:
    """A fine-tuned text classifier loaded from a run directory (or its model/ folder)."""

    def __init__(self, run_dir: str | Path, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(run_dir)
        model_dir = path / "model" if (path / "model").is_dir() else path
        if not (model_dir / "config.json").exists():
            raise UserError(f"{run_dir} is not a finished tunesmith run (no model/config.json)")
        self.model_dir = model_dir
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            from tunesmith.models.heads import restore_custom_head

            # an MLP or mean-pooled head from feature-extraction is rebuilt from config.json
            self.model = restore_custom_head(AutoModelForSequenceClassification.from_pretrained(model_dir), model_dir).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        cfg = self.model.config
        self.labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
        self.multi_label = cfg.problem_type == "multi_label_classification"
        run_cfg = path / "config.yaml"
        self.max_length = 128
        if run_cfg.exists():
            import yaml

            self.max_length = yaml.safe_load(run_cfg.read_text())["train"]["max_length"]

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        from tunesmith.data.batching import make_batches, pad_batch

        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for b in make_batches([len(x) for x in ids], batch_size, seed=0, epoch=0, shuffle=False):
            batch = pad_batch([ids[i] for i in b], self.tokenizer.pad_token_id or 0)
            out[b] = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float().cpu().numpy()
        return out

    def predict(self, texts: str | list[str], batch_size: int = 64) -> list[Prediction]:
        if isinstance(texts, str):
            texts = [texts]
        logits = self.logits(list(texts), batch_size)
        preds = []
        for row in logits:
            if self.multi_label:
                p = 1 / (1 + np.exp(-row))
                label: Any = [self.labels[i] for i in np.flatnonzero(p > 0.5)]
            else:
                e = np.exp(row - row.max())
                p = e / e.sum()
                label = self.labels[int(p.argmax())]
            preds.append(Prediction(label, {l: float(v) for l, v in zip(self.labels, p)}))
        return preds

    __call__ = predict


class ImageClassifier:
    """A fine-tuned timm image classifier loaded from a run directory (or its model/ folder).

    Preprocessing is the run's own (model/config.json's pretrained_cfg): timm's eval transform,
    the same code the run evaluated with."""

    def __init__(self, run_dir: str | Path, device: str | None = None):
        import timm

        from tunesmith.data.images import Preprocess

        path = Path(run_dir)
        model_dir = path / "model" if (path / "model").is_dir() else path
        cfg_file = model_dir / "config.json"
        if not cfg_file.exists():
            raise UserError(f"{run_dir} is not a finished tunesmith run (no model/config.json)")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        self.model_dir = model_dir
        self.model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device, memory_format=torch.channels_last)
        self.labels = list(cfg.get("label_names") or [str(i) for i in range(cfg["num_classes"])])
        self.multi_label = False
        self.pre = Preprocess.from_timm(timm.data.resolve_data_config(pretrained_cfg=cfg["pretrained_cfg"]))

    def preprocess(self, paths: list[Path]) -> torch.Tensor:
        from tunesmith.data.images import center_crop, decode, normalize

        imgs = []
        for p in paths:
            try:
                imgs.append(center_crop(decode(Path(p), self.pre), self.pre.size))
            except ValueError as e:
                raise UserError(f"{p}: {e}") from None
        return normalize(torch.stack(imgs), self.pre)

    @torch.no_grad()
    def logits(self, paths: list[str | Path], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(paths), len(self.labels)), dtype=np.float32)
        for i in range(0, len(paths), batch_size):
            x = self.preprocess([Path(p) for p in paths[i : i + batch_size]]).to(self.device)
            out[i : i + len(x)] = self.model(x).float().cpu().numpy()
        return out

    def predict(self, paths: str | Path | list[str | Path], batch_size: int = 64) -> list[Prediction]:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        preds = []
        for row in self.logits(list(paths), batch_size):
            e = np.exp(row - row.max())
            p = e / e.sum()
            preds.append(Prediction(self.labels[int(p.argmax())], {l: float(v) for l, v in zip(self.labels, p)}))
        return preds

    __call__ = predict


def load(run_dir: str | Path, device: str | None = None) -> TextClassifier | ImageClassifier:
    """Load a finished run (or a model directory it wrote) as a predictor."""
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"run directory {path} does not exist")
    check_not_failed(path)
    model_dir = path / "model" if (path / "model").is_dir() else path
    cfg = model_dir / "config.json"
    info = json.loads(cfg.read_text(encoding="utf-8")) if cfg.exists() else {}
    if "architecture" in info:
        return ImageClassifier(path, device)
    if any(a.endswith("ForCausalLM") for a in info.get("architectures") or []):
        raise UserError(f"{run_dir} holds a language model; use `tunesmith generate {run_dir} \"prompt\"` or "
                        f"`tunesmith chat {run_dir}` (predict is for classifiers)")
    return TextClassifier(path, device)
