"""A text classifier on the CPU: PyTorch against its ONNX export (float32 and int8) in onnxruntime.

    .venv/bin/python benchmarks/bench_onnx.py RUN [--texts 512]

RUN is a finished text-classification run; its ONNX export is written first when RUN/onnx is
missing (`tunesmith export RUN --format onnx --quantize int8`). Each backend classifies the same
texts from the run's test file (tokenisation included, the way `tunesmith predict` and `serve` do
it) at batch 1 and batch 32, after one warm-up pass; printed: texts/s, and accuracy on the whole
labelled test file with the largest |logit| and probability differences from PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def labelled_test(run: Path) -> tuple[list[str], list[str]]:
    import yaml

    from tunesmith.config import DataConfig
    from tunesmith.data.text import read_text_set

    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    dcfg = DataConfig.model_validate({**data, "validation": None, "test": None, "max_rows": None})
    s = read_text_set(data["test"], dcfg, "test", labelled=True)
    return list(s.texts), [str(x) for x in s.labels]


def speed(clf, texts: list[str], batch: int) -> float:
    clf.logits(texts[: max(batch, 8)], batch)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        clf.logits(texts[i : i + batch], batch)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--json", default="bench_onnx.json")
    a = ap.parse_args()
    run = Path(a.run)
    from tunesmith.export_onnx import export_onnx
    from tunesmith.predict import load

    if not (run / "onnx" / "model_quantized.onnx").exists():
        export_onnx(run, quantize="int8")
    texts, gold = labelled_test(run)
    timed = texts[: a.texts]
    backends = {"pytorch": load(run, device="cpu"), "onnxruntime fp32": load(run, onnx=True),
                "onnxruntime int8": load(run, quantized=True)}
    ref = backends["pytorch"].logits(texts, 32)
    rows = []
    for name, clf in backends.items():
        logits = ref if name == "pytorch" else clf.logits(texts, 32)
        pred = [clf.labels[i] for i in logits.argmax(-1)]
        e_ref = np.exp(ref - ref.max(-1, keepdims=True))
        e = np.exp(logits - logits.max(-1, keepdims=True))
        row = {"backend": name, "texts_per_s_batch1": round(speed(clf, timed[:128], 1), 1),
               "texts_per_s_batch32": round(speed(clf, timed, 32), 1),
               "accuracy": round(float(np.mean([p == g for p, g in zip(pred, gold)])), 4),
               "max_abs_logit_diff": float(np.abs(logits - ref).max()),
               "max_abs_prob_diff": float(np.abs(e / e.sum(-1, keepdims=True) - e_ref / e_ref.sum(-1, keepdims=True)).max()),
               "test_rows": len(texts)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{'backend':18} {'batch 1/s':>10} {'batch 32/s':>11} {'accuracy':>9} {'max |dlogit|':>13}")
    for r in rows:
        print(f"{r['backend']:18} {r['texts_per_s_batch1']:10.1f} {r['texts_per_s_batch32']:11.1f} {r['accuracy']:9.4f} "
              f"{r['max_abs_logit_diff']:13.2e}  ({r['texts_per_s_batch1'] / base['texts_per_s_batch1']:.2f}x, "
              f"{r['texts_per_s_batch32'] / base['texts_per_s_batch32']:.2f}x PyTorch)")
    Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
