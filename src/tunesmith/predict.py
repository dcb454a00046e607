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
        hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in our output
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
        self.max_length = _run_max_length(path)

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        from tunesmith.data.batching import make_batches, pad_batch

        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for b in make_batches([len(x) for x in ids], batch_size, seed=0, epoch=0, shuffle=False):
            out[b] = self.forward(pad_batch([ids[i] for i in b], self.tokenizer.pad_token_id or 0))
        return out

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Logits for one padded batch (input_ids, attention_mask)."""
        return self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float().cpu().numpy()

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

    def load_image(self, source: Path | bytes) -> torch.Tensor:
        """One image (a file, or an upload's bytes) decoded, resized and centre-cropped: uint8 (3, H, W)."""
        import io

        from tunesmith.data.images import center_crop, decode

        try:
            return center_crop(decode(io.BytesIO(source) if isinstance(source, bytes) else Path(source), self.pre), self.pre.size)
        except ValueError as e:
            raise UserError(f"{'the uploaded image' if isinstance(source, bytes) else source}: {e}") from None

    def preprocess(self, paths: list[Path]) -> torch.Tensor:
        from tunesmith.data.images import normalize

        return normalize(torch.stack([self.load_image(p) for p in paths]), self.pre)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> np.ndarray:
        """Logits for a normalized float batch (N, 3, H, W)."""
        return self.model(x.to(self.device)).float().cpu().numpy()

    def logits(self, paths: list[str | Path], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(paths), len(self.labels)), dtype=np.float32)
        for i in range(0, len(paths), batch_size):
            x = self.preprocess([Path(p) for p in paths[i : i + batch_size]])
            out[i : i + len(x)] = self.forward(x)
        return out

    def predict_images(self, images: list[torch.Tensor]) -> list[Prediction]:
        """Predictions for images already through `load_image` (one batch)."""
        from tunesmith.data.images import normalize

        return self._predictions(self.forward(normalize(torch.stack(images), self.pre)))

    def predict(self, paths: str | Path | list[str | Path], batch_size: int = 64) -> list[Prediction]:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        return self._predictions(self.logits(list(paths), batch_size))

    def _predictions(self, logits: np.ndarray) -> list[Prediction]:
        preds = []
        for row in logits:
            e = np.exp(row - row.max())
            p = e / e.sum()
            preds.append(Prediction(self.labels[int(p.argmax())], {l: float(v) for l, v in zip(self.labels, p)}))
        return preds

    __call__ = predict


class _OnnxSession:
    """An onnxruntime session on `model.onnx` (or another file) in an ONNX export folder."""

    backend = "onnxruntime"

    def _open(self, onnx_dir: Path, file: str) -> dict[str, Any]:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            raise UserError("running ONNX models needs onnxruntime: pip install 'tunesmith[onnx]'")
        import onnxruntime as ort

        path = onnx_dir / file
        if not path.is_file():
            raise UserError(f"{path} does not exist; write it with `tunesmith export RUN --format onnx"
                            f"{' --quantize int8' if 'quantized' in file else ''}`")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.model_dir = onnx_dir
        return json.loads((onnx_dir / "config.json").read_text(encoding="utf-8"))


class OnnxTextClassifier(_OnnxSession, TextClassifier):
    """A text classifier exported by `tunesmith export --format onnx`, run by onnxruntime; tokenisation,
    batching and probabilities are TextClassifier's own."""

    def __init__(self, onnx_dir: str | Path, file: str = "model.onnx", run_dir: str | Path | None = None):
        from transformers import AutoTokenizer

        cfg = self._open(Path(onnx_dir), file)
        self.tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
        self.labels = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
        self.multi_label = cfg.get("problem_type") == "multi_label_classification"
        self.max_length = _run_max_length(Path(run_dir)) if run_dir else 128

    def forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        feed = {n: (batch[n] if n in batch else torch.zeros_like(batch["input_ids"])).numpy().astype(np.int64)
                for n in self.input_names}
        return self.session.run(["logits"], feed)[0]


class OnnxImageClassifier(_OnnxSession, ImageClassifier):
    """An image classifier exported to ONNX; preprocessing is ImageClassifier's (the run's own)."""

    def __init__(self, onnx_dir: str | Path, file: str = "model.onnx", run_dir: str | Path | None = None):
        import timm

        from tunesmith.data.images import Preprocess

        cfg = self._open(Path(onnx_dir), file)
        self.labels = list(cfg.get("label_names") or [str(i) for i in range(cfg["num_classes"])])
        self.multi_label = False
        self.pre = Preprocess.from_timm(timm.data.resolve_data_config(pretrained_cfg=cfg["pretrained_cfg"]))

    def forward(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(["logits"], {"pixel_values": x.contiguous().numpy()})[0]


def _run_max_length(run_dir: Path) -> int:
    from tunesmith.runfiles import run_settings

    return int((run_settings(run_dir).get("train") or {}).get("max_length", 128))


def load_onnx(run_dir: str | Path, quantized: bool = False) -> OnnxTextClassifier | OnnxImageClassifier:
    """A run's ONNX export (RUN/onnx/, or an export folder itself) as a predictor."""
    path = Path(run_dir)
    onnx_dir = path if (path / "export.json").exists() else path / "onnx"
    if not (onnx_dir / "export.json").exists():
        raise UserError(f"{path} has no ONNX export; write one with `tunesmith export {path} --format onnx`")
    info = json.loads((onnx_dir / "export.json").read_text(encoding="utf-8"))
    file = info["files"].get("int8", "model_quantized.onnx") if quantized else info["files"]["model"]
    cls = OnnxImageClassifier if info.get("task") == "image-classification" else OnnxTextClassifier
    return cls(onnx_dir, file=file, run_dir=path if onnx_dir != path else None)


def load(run_dir: str | Path, device: str | None = None, onnx: bool = False,
         quantized: bool = False) -> TextClassifier | ImageClassifier:
    """Load a finished run (or a model directory it wrote) as a predictor; `onnx` runs its ONNX
    export with onnxruntime instead of PyTorch (`quantized`: the int8 file)."""
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"run directory {path} does not exist")
    check_not_failed(path)
    if onnx or quantized:
        return load_onnx(path, quantized)
    model_dir = path / "model" if (path / "model").is_dir() else path
    cfg = model_dir / "config.json"
    info = json.loads(cfg.read_text(encoding="utf-8")) if cfg.exists() else {}
    if "architecture" in info:
        return ImageClassifier(path, device)
    if any(a.endswith("ForCausalLM") for a in info.get("architectures") or []):
        raise UserError(f"{run_dir} holds a language model; use `tunesmith generate {run_dir} \"prompt\"` or "
                        f"`tunesmith chat {run_dir}` (predict is for classifiers)")
    return TextClassifier(path, device)
