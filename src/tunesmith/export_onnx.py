"""`tunesmith export RUN --format onnx`: a classifier run as ONNX, checked against PyTorch.

Text runs are written in Optimum's layout (`model.onnx` with inputs `input_ids`, `attention_mask`
[, `token_type_ids`] and output `logits`, beside `config.json` and the tokenizer files), so
`optimum.onnxruntime.ORTModelForSequenceClassification.from_pretrained(folder)` loads them. Image
runs take `pixel_values` (N, 3, H, W), normalised as the run's `config.json` says, and give
`logits`. Batch (and sequence) axes are dynamic.

The graph comes from torch.export (`torch.onnx.export(dynamo=True)`, the exporter PyTorch
maintains; the TorchScript one is deprecated and, on transformers 5's attention masks, traced a
graph that disagreed with the model by 0.04 in the logits here). A custom head (an MLP, mean
pooling) is part of the graph. Before anything is kept, the ONNX model runs on held-out rows of
the run's own data and its logits are compared with PyTorch's; an export beyond the tolerance is
an error and nothing is written. `--quantize int8` adds `model_quantized.onnx` (onnxruntime's
dynamic quantization: int8 weights, activations quantized per batch), checked the same way
against looser, stated tolerances.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.runfiles import export_folder, run_settings

# Optimum checks BERT-family exports at atol 1e-4 on the logits; the same here for float32.
FLOAT_ATOL = 1e-4
# int8 dynamic quantization changes the numbers: the labels must agree on nearly every sample and the
# class probabilities may move by INT8_MEAN_PROB_DIFF on average. (A single row near the decision
# boundary can move far: on the MiniLM demo run one of 2,000 test rows moved by 0.83, with test
# accuracy 0.7875 -> 0.7820; see docs/serve.md.)
INT8_MIN_AGREEMENT = 0.95
INT8_MEAN_PROB_DIFF = 0.05
SAMPLES = 64


def _need(module: str, extra: str = "onnx") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"ONNX export needs the '{module}' package: pip install 'tunesmith[{extra}]'")


def sample_texts(run_dir: Path, n: int = SAMPLES) -> list[str]:
    """Up to n texts from the run's test (else validation, else train) file; a few fixed ones otherwise."""
    from tunesmith.config import DataConfig
    from tunesmith.data.text import read_text_set

    data = run_settings(run_dir).get("data") or {}
    for split in ("test", "validation", "train"):
        path = data.get(split)
        if path and Path(path).is_file():
            dcfg = DataConfig.model_validate({**data, "train": path, "validation": None, "test": None, "max_rows": None})
            try:
                texts = read_text_set(path, dcfg, split, labelled=False).texts
            except UserError:
                continue
            if texts:
                return list(texts[:n])
    return ["a gripping, beautifully shot film", "dull", "the plot of this movie was a mess and the actors were bored",
            "", "fine " * 300]


def sample_images(run_dir: Path, clf: Any, n: int = 32) -> list[torch.Tensor]:
    """Up to n images from the run's test or validation folder; seeded noise when there are none."""
    from tunesmith.data.images import IMAGE_SUFFIXES

    found: list[Path] = []
    data = run_settings(run_dir).get("data") or {}
    for split in ("test", "validation", "train"):
        root = Path(data.get(split) or "")
        if data.get(split) and root.is_dir():
            found = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)[:n]
            if found:
                break
    images = []
    for f in found:
        try:
            images.append(clf.load_image(f))
        except UserError:
            continue
    if not images:
        g = torch.Generator().manual_seed(0)
        size = clf.pre.size
        images = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(8)]
    return images


class _TextGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def _export_graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor], dynamic: dict[str, dict[int, Any]],
                  path: Path) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    names = list(inputs)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, input_names=names, output_names=["logits"],
                                        dynamic_shapes=dynamic, opset_version=18, verbose=False)
        program.save(str(path), external_data=program.model_proto.ByteSize() > 1_800_000_000)
    except Exception as e:  # noqa: BLE001 - torch.export's failures are long; one line says which model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"torch.onnx.export could not export this model ({type(e).__name__}: {first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _text_export(clf: Any, out: Path) -> dict[str, Any]:
    order = ["input_ids", "attention_mask", "token_type_ids"]  # Optimum's input order
    names = [n for n in order if n in clf.tokenizer.model_input_names or n == "attention_mask"]
    enc = clf.tokenizer(["a sample text for export", "two"], padding=True, return_tensors="pt")
    longest = int(getattr(clf.model.config, "max_position_embeddings", 512) or 512)
    batch, seq = torch.export.Dim("batch_size", max=4096), torch.export.Dim("sequence_length", max=longest)
    inputs = {n: enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names}
    _export_graph(_TextGraph(clf.model.cpu().eval()), inputs, {n: {0: batch, 1: seq} for n in names}, out / "model.onnx")
    clf.model.config.save_pretrained(out)
    clf.tokenizer.save_pretrained(out)
    return {"inputs": names, "task": "text-classification"}


class _ImageGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def _image_export(clf: Any, out: Path) -> dict[str, Any]:
    size = clf.pre.size
    x = torch.zeros(2, 3, size, size)
    model = clf.model.cpu().eval().to(memory_format=torch.contiguous_format)
    _export_graph(_ImageGraph(model), {"pixel_values": x}, {"pixel_values": {0: torch.export.Dim("batch_size", max=4096)}},
                  out / "model.onnx")
    shutil.copy2(clf.model_dir / "config.json", out / "config.json")
    return {"inputs": ["pixel_values"], "task": "image-classification", "image_size": size}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def compare(reference: np.ndarray, got: np.ndarray, multi_label: bool) -> dict[str, Any]:
    """How far the exported model's logits are from PyTorch's on the same inputs."""
    probs = (lambda z: 1 / (1 + np.exp(-z))) if multi_label else _softmax
    pr, pg = probs(reference), probs(got)
    same = (pr > 0.5) == (pg > 0.5) if multi_label else pr.argmax(-1) == pg.argmax(-1)
    agree = float(same.all(-1).mean() if multi_label else same.mean())
    return {"samples": int(len(reference)), "max_abs_logit_diff": float(np.abs(reference - got).max()),
            "max_abs_prob_diff": float(np.abs(pr - pg).max()), "mean_abs_prob_diff": float(np.abs(pr - pg).mean()),
            "label_agreement": agree}


def _parity(torch_clf: Any, onnx_dir: Path, file: str, samples: list[Any], kind: str) -> dict[str, Any]:
    from tunesmith.predict import OnnxImageClassifier, OnnxTextClassifier

    onnx_clf = (OnnxImageClassifier if kind == "image" else OnnxTextClassifier)(onnx_dir, file=file, run_dir=None)
    if kind == "image":
        from tunesmith.data.images import normalize

        ref = np.concatenate([torch_clf.forward(normalize(torch.stack(samples[i:i + 16]), torch_clf.pre))
                              for i in range(0, len(samples), 16)])
        got = np.concatenate([onnx_clf.forward(normalize(torch.stack(samples[i:i + 16]), onnx_clf.pre))
                              for i in range(0, len(samples), 16)])
    else:
        onnx_clf.max_length = torch_clf.max_length
        ref, got = torch_clf.logits(samples, 16), onnx_clf.logits(samples, 16)
    return compare(ref, got, torch_clf.multi_label)


def _check(figures: dict[str, Any], quantized: bool) -> str | None:
    """None when the figures are within the stated tolerance, else what is wrong."""
    if not quantized:
        if figures["max_abs_logit_diff"] > FLOAT_ATOL:
            return f"its logits differ from PyTorch's by up to {figures['max_abs_logit_diff']:.2e} (tolerance {FLOAT_ATOL:.0e})"
        return None
    if figures["label_agreement"] < INT8_MIN_AGREEMENT or figures["mean_abs_prob_diff"] > INT8_MEAN_PROB_DIFF:
        return (f"int8 labels agree with PyTorch's on {figures['label_agreement']:.1%} of samples (need "
                f"{INT8_MIN_AGREEMENT:.0%}) and probabilities move by {figures['mean_abs_prob_diff']:.3f} on average "
                f"(tolerance {INT8_MEAN_PROB_DIFF})")
    return None


def _quantize(out: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime's "please pre-process" advice
    # Per-channel weight scales, and 7-bit weights (reduce_range), which onnxruntime's quantization guide
    # advises on x86 CPUs without VNNI (AVX2: the u8*s8 products can saturate). On the MiniLM demo run
    # these took the mean probability change from 0.069 to 0.026 and label agreement from 93% to 97%.
    quantize_dynamic(str(out / "model.onnx"), str(out / "model_quantized.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, reduce_range=True)


def export_onnx(run_dir: str | Path, output: str | Path | None = None, quantize: str | None = None,
                quiet: bool = False) -> dict[str, Any]:
    """Export, check and (only when within tolerance) move into place; returns export.json's content."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        _need(m)
    from tunesmith.predict import load

    run = Path(run_dir)
    clf = load(run, device="cpu")
    kind = "image" if hasattr(clf, "preprocess") else "text"
    if quantize == "int8" and kind == "image":
        raise UserError("--quantize int8 is for text classifiers: onnxruntime's dynamic quantization changed 22% of "
                        "EfficientNet-Lite0's labels on digits (convolutions need static quantization with calibration "
                        "images, which tunesmith does not do yet); export the float32 model without --quantize")
    out = Path(output) if output else run / "onnx"
    with export_folder(out, "ONNX") as tmp:
        report = _export_into(clf, run, tmp, kind, quantize, quiet)
    if not quiet:
        _print(report, out)
    return report


def _export_into(clf: Any, run: Path, tmp: Path, kind: str, quantize: str | None, quiet: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if not quiet:
        print(f"tunesmith: exporting {run} to ONNX (torch.export; a minute for a MiniLM-sized model)", flush=True)
    info = _image_export(clf, tmp) if kind == "image" else _text_export(clf, tmp)
    samples = sample_images(run, clf) if kind == "image" else sample_texts(run)
    report: dict[str, Any] = {"format": "onnx", "opset": 18, **info, "labels": clf.labels,
                              "multi_label": clf.multi_label, "files": {"model": "model.onnx"},
                              "tolerance": {"float32_max_abs_logit_diff": FLOAT_ATOL,
                                            "int8_min_label_agreement": INT8_MIN_AGREEMENT,
                                            "int8_mean_abs_prob_diff": INT8_MEAN_PROB_DIFF}}
    report["parity"] = _parity(clf, tmp, "model.onnx", samples, kind)
    if problem := _check(report["parity"], quantized=False):
        raise UserError(f"the ONNX export of {run} does not match the PyTorch model: {problem}; nothing was written")
    if quantize == "int8":
        _quantize(tmp)
        report["files"]["int8"] = "model_quantized.onnx"
        report["parity_int8"] = _parity(clf, tmp, "model_quantized.onnx", samples, kind)
        if problem := _check(report["parity_int8"], quantized=True):
            raise UserError(f"the int8 ONNX model of {run} is too far from PyTorch: {problem}; export without "
                            "--quantize (nothing was written)")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["sizes_mb"] = {k: round((tmp / f).stat().st_size / 1e6, 2) for k, f in report["files"].items()}
    (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _print(report: dict[str, Any], out: Path) -> None:
    p = report["parity"]
    print(f"wrote {out / 'model.onnx'} ({report['sizes_mb']['model']} MB): {p['samples']} samples, max |logit diff| "
          f"{p['max_abs_logit_diff']:.1e} (tolerance {FLOAT_ATOL:.0e}), labels agree {p['label_agreement']:.1%}")
    if "parity_int8" in report:
        q = report["parity_int8"]
        print(f"wrote {out / 'model_quantized.onnx'} ({report['sizes_mb']['int8']} MB, int8): labels agree "
              f"{q['label_agreement']:.1%}, mean |prob diff| {q['mean_abs_prob_diff']:.3f} (max {q['max_abs_prob_diff']:.3f})")
    example = "photo.jpg" if report["task"] == "image-classification" else '"some text"'
    print(f"use it: tunesmith predict {out.parent} {example} --onnx  |  tunesmith serve {out.parent} --onnx")
