"""Does torch.compile (inductor on a CPU) make MiniLM's fine-tuning steps faster? 40 steps of batch 32,
bf16 autocast, dynamic padding, fused AdamW, plain transformers modules; eager or compiled (dynamic shapes).

    .venv/bin/python benchmarks/probe_compile.py eager
    .venv/bin/python benchmarks/probe_compile.py compile

Prints each few steps' time and loss, the first 3 steps (compilation) and the steady-state median.
"""
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _rotten import write_split  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from tunesmith.models import resolve_model  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
torch.manual_seed(0)
d = Path(tempfile.mkdtemp(prefix="tunesmith-compile-"))
write_split(d, 2000, 100)
texts = [r["text"] for r in csv.DictReader(open(d / "train.csv"))]
labels = [0 if r["label"] == "fresh" else 1 for r in csv.DictReader(open(d / "train.csv"))]
path = resolve_model("minilm-l6").path
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
fwd = model
if mode != "eager":
    fwd = torch.compile(model, dynamic=True)
random.seed(0)
idx = list(range(len(texts))); random.shuffle(idx)
times = []
for step in range(40):
    b = idx[step * 32:(step + 1) * 32]
    enc = tok([texts[i] for i in b], padding=True, truncation=True, max_length=128, return_tensors="pt")
    y = torch.tensor([labels[i] for i in b])
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fwd(**enc)
    loss = torch.nn.functional.cross_entropy(out.logits.float(), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
    if step < 3 or step % 10 == 0:
        print(mode, step, enc["input_ids"].shape, f"{times[-1]*1000:.0f} ms", f"loss {loss.item():.4f}", flush=True)
steady = sorted(times[10:])[len(times[10:]) // 2]
print(mode, f"first 3 steps {sum(times[:3]):.1f} s, steady median {steady*1000:.0f} ms/step, total 40 steps {sum(times):.1f} s")
