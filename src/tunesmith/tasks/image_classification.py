"""`image-classification`: an ImageNet-trained timm model with its classifier reset to the
user's classes (timm's own `reset_classifier`).

Data: a folder per class or a CSV/JSONL/Parquet listing (see tunesmith.data.images). Every image
is decoded once, in the pre-flight report, and kept (on disk, see `ImageStore`) resized to the
model's evaluation resize.
Evaluation and prediction apply exactly timm's evaluation transform (resize, centre crop,
normalise with the model's mean/std); training draws a random resized crop, a flip and,
optionally, colour jitter, RandAugment and mixup/cutmix, all from torch's (and NumPy's, for
mixup) seeded generators, so a resumed run continues exactly. Tensors are channels-last, the
fast layout for convolutions on CPUs.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tunesmith.data.batching import shard
from tunesmith.data.store import key_hash
from tunesmith.data.images import ImageSet, ImageStore, Preprocess, StoredImages, center_crop, decode, normalize, read_image_set
from tunesmith.errors import UserError
from tunesmith.models.heads import checkpoint_label_names
from tunesmith.models.resolve import ResolvedModel
from tunesmith.tasks.base import Accumulator, Prepared, Runtime
from tunesmith.tasks.classification import ClassificationTask
from tunesmith.validate import DataReport, classification_report

if TYPE_CHECKING:
    from tunesmith.config import Config


@dataclass
class ImageEncoded:
    """Decoded images (uint8, shorter side at the eval resize) and their labels."""

    images: StoredImages
    labels: torch.Tensor | None
    keys: list[str]  # file path, size and mtime of each image: what the feature cache keys on
    tag: str = ""  # the preprocessing: part of the feature cache key too
    truncated: int = 0

    @property
    def lengths(self) -> list[int]:
        return [1] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: list[int]) -> "ImageEncoded":
        return ImageEncoded(self.images.take(idx), self.labels[idx] if self.labels is not None else None,
                            [self.keys[i] for i in idx], self.tag)

    def concat(self, other: "ImageEncoded") -> "ImageEncoded":
        labels = torch.cat([self.labels, other.labels]) if self.labels is not None and other.labels is not None else None
        return ImageEncoded(self.images + other.images, labels, self.keys + other.keys, self.tag)

    def digest(self) -> str:
        h = hashlib.sha256(self.tag.encode())
        for k in self.keys:
            h.update(k.encode())
        return h.hexdigest()


def data_config_of(resolved: ResolvedModel) -> dict[str, Any]:
    """The model's preprocessing (timm's pretrained_cfg), without building the model."""
    import timm

    cfg: dict[str, Any] = {}
    if resolved.path.is_dir() and (resolved.path / "config.json").exists():
        cfg = json.loads((resolved.path / "config.json").read_text(encoding="utf-8")).get("pretrained_cfg", {})
    else:
        name = resolved.spec.removeprefix("timm/").removeprefix("timm:")
        pc = timm.models.get_pretrained_cfg(name)
        cfg = pc.to_dict() if pc is not None else {}
    return timm.data.resolve_data_config(pretrained_cfg=cfg) if cfg else {
        "input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class ImageClassification(ClassificationTask):
    name = "image-classification"
    refuses = {name: f"strategy {name} is not available for image-classification; use full, freeze, gradual-unfreeze, "
                     "head-only or feature-extraction" for name in ("lora", "contrastive")}

    def __init__(self, config: "Config"):
        super().__init__(config)
        self.pre: Preprocess | None = None
        self._store: ImageStore | None = None  # decoded pixels, on disk
        self._decoded: dict[Path, int] = {}  # path -> id in the store
        self._content: dict[Path, str] = {}  # path -> hash of its decoded pixels (exact duplicates)
        self._keys: dict[Path, str] = {}
        self._prepared: Prepared | None = None
        self._mixup = None

    @classmethod
    def configure(cls, cfg: "Config") -> None:
        d, s = cfg.data, cfg.strategy
        if d.label_separator or d.text_pair_column:
            raise ValueError("image-classification takes one label per image: remove data.label_separator / data.text_pair_column")
        if s.replay is not None:
            raise ValueError("strategy.replay is not available for image-classification yet")
        options = s.model_extra or {}  # the chosen strategy's own keys
        if options.get("pooling") == "mean" or options.get("head") == "mlp":
            raise ValueError("image-classification trains the model's own linear classifier: remove strategy.pooling: mean / head: mlp")

    # -- model resolution and preprocessing ---------------------------------------------------
    def resolve(self) -> ResolvedModel:
        from tunesmith.models.timm_models import resolve_image_model

        return resolve_image_model(self.config.model, self.config.model_file)

    def load_tokenizer(self, resolved: ResolvedModel) -> None:
        """Images have no tokenizer; the model's preprocessing is read here, before the scan."""
        self.pre = Preprocess.from_timm(data_config_of(resolved), self.config.image.size)
        return None

    def card(self) -> dict[str, str]:
        return {"library_name": "timm", "pipeline_tag": "image-classification", "usage": """
With tunesmith: `tunesmith predict RUN photo.jpg` (files or folders).

With timm alone (its own evaluation transform, from the folder's pretrained_cfg):

```python
import json, timm, torch
from PIL import Image
model = timm.create_model("local-dir:RUN/model", pretrained=True).eval()
tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
labels = json.load(open("RUN/model/config.json"))["label_names"]
with torch.no_grad():
    p = model(tf(Image.open("photo.jpg").convert("RGB"))[None]).softmax(-1)[0]
print(labels[int(p.argmax())], float(p.max()))
```
"""}

    def check_limits(self, resolved: ResolvedModel, tokenizer: Any) -> list[str]:
        """image.size far past the model's own input: a mistake that would take the memory of the machine."""
        native = int(data_config_of(resolved)["input_size"][-1])
        size = self.config.image.size
        if size is not None and size > 4 * native:
            gb = self.config.optim.batch_size * 3 * size * size * 4 * 2 / 2**30
            raise UserError(f"image.size {size} is more than 4x the input size of model '{resolved.spec}' ({native}): a batch of "
                            f"{self.config.optim.batch_size} such images needs about {gb:,.0f} GB before any layer runs; "
                            f"use at most {4 * native} (the model's own: {native})")
        return []

    # -- data ---------------------------------------------------------------------------------
    def _decode_all(self, paths: list[Path]) -> dict[Path, str]:
        """Decode every image not yet decoded (threads: Pillow releases the GIL); path -> problem."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._decoded]

        def one(p: Path) -> tuple[Path, torch.Tensor | None, str | None]:
            try:
                return p, decode(p, self.pre), None
            except ValueError as e:
                return p, None, str(e)

        if self._store is None:
            self._store = ImageStore()
        problems: dict[Path, str] = {}
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for p, img, why in pool.map(one, todo, chunksize=16):
                if img is None:
                    problems[p] = why
                else:
                    st = p.stat()
                    self._decoded[p] = self._store.add(img)
                    self._content[p] = key_hash(img.numpy().tobytes())
                    self._keys[p] = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return problems

    def validate(self, tokenizer: Any = None) -> DataReport:
        """Read every listing, decode every image once; report (see tunesmith.validate).

        When training can proceed, the sets it read are the ones `load_data` returns."""
        d = self.config.data
        if self.pre is None:
            self.load_tokenizer(self.resolve())
        rep, sets, names, _ = classification_report(
            [("train", d.train), ("validation", d.validation), ("test", d.test)], self._read,
            keys=lambda s: [self._content_key(p) for p in s.paths], multi_label=lambda _: False,
            data=d, seed=self.config.train.seed, noun="class", unit="image(s)/row(s)",
        )
        rep.check_rows()
        if rep.ok:
            self.labels = names
            self._prepared = Prepared(sets["train"], sets["validation"], sets["test"], names)
            self.set_class_weights(sets["train"].labels)
        return rep

    def _read(self, path: str, split: str) -> ImageSet:
        """A listing or folder, every image decoded; unreadable images join the set's bad rows."""
        s = read_image_set(path, self.config.data, split)
        problems = self._decode_all(s.paths)
        if not problems:
            return s
        keep = [i for i, p in enumerate(s.paths) if p not in problems]
        bad = s.bad + [(s.where[i], problems[p]) for i, p in enumerate(s.paths) if p in problems]
        return ImageSet(s.name, s.source, [s.paths[i] for i in keep], [s.labels[i] for i in keep],
                        [s.where[i] for i in keep], bad)

    def _content_key(self, p: Path) -> int:
        """Exact-duplicate key: the decoded pixels (the same picture saved twice is caught)."""
        return self._content[p]

    def load_data(self) -> Prepared:
        if self._prepared is None:
            rep = self.validate()
            if not rep.ok:
                raise UserError(rep.error_line())
        return self._prepared

    def example(self, i: int) -> dict[str, Any]:
        s = self.load_data().test
        return {"where": s.where[i], "image": str(s.paths[i])}

    # -- model --------------------------------------------------------------------------------
    def load_model(self, resolved: ResolvedModel) -> tuple[nn.Module, list[str], list[str]]:
        from tunesmith.models.timm_models import classifier_prefix, create_model

        model = create_model(resolved, self.config.allow_pickle)
        prefix = classifier_prefix(model)
        discarded = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        if resolved.source in ("packaged", "local") and checkpoint_label_names(resolved.path) == self.labels:
            discarded = []  # an earlier run on these classes (fine-tune again): its head, not a new one
            self.head_kept = f"the checkpoint's own {len(self.labels)}-way head (the same labels)"
        else:
            model.reset_classifier(len(self.labels))  # timm's own head reset, sized to the user's classes
        head = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        if not head:
            raise UserError(f"cannot find the classifier of '{resolved.spec}' (expected parameters under '{prefix}')")
        return model.to(memory_format=torch.channels_last), head, discarded

    def export_data_config(self) -> dict[str, Any]:
        p = self.pre
        return {"input_size": [3, p.size, p.size], "interpolation": p.interpolation, "mean": list(p.mean),
                "std": list(p.std), "crop_pct": p.crop_pct, "crop_mode": "center"}

    # -- a finished run ------------------------------------------------------------------------
    def load_trained(self, model_dir: Path) -> nn.Module:
        from tunesmith.predict import ImageClassifier

        clf = ImageClassifier(model_dir, device="cpu")
        self.labels, self.pre = clf.labels, clf.pre
        return clf.model

    def read_eval_set(self, path: str) -> ImageEncoded:
        from tunesmith.data.text import bad_rows_message

        s = self._read(path, "evaluation")
        if s.bad:
            raise UserError(bad_rows_message(path, s.bad, shown=3))
        unknown = sorted({l for l in s.labels if l not in self.labels})
        if unknown:
            raise UserError(f"{path}: class(es) {', '.join(unknown[:5])} are not among the model's classes "
                            f"({', '.join(self.labels[:10])})")
        return self.encode(s)

    # -- batches ------------------------------------------------------------------------------
    def encode(self, s: ImageSet) -> ImageEncoded:
        index = {l: i for i, l in enumerate(self.labels)}
        labels = torch.tensor([index[l] for l in s.labels], dtype=torch.long) if s.labels and s.labels[0] is not None else None
        images = StoredImages(self._store, [self._decoded[p] for p in s.paths])
        return ImageEncoded(images, labels, [self._keys[p] for p in s.paths], repr(self.pre))

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision import transforms as T
        from torchvision.transforms import functional as F

        a, size = self.config.image, self.pre.size
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale=list(a.scale), ratio=[3 / 4, 4 / 3])
        img = F.resized_crop(img, i, j, h, w, [size, size], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        if a.hflip and torch.rand(()) < a.hflip:
            img = img.flip(-1)
        if a.color_jitter:
            img = T.ColorJitter(a.color_jitter, a.color_jitter, a.color_jitter)(img)
        if a.randaugment:
            img = T.RandAugment(num_ops=2, magnitude=9)(img)
        return img

    def collate(self, enc: ImageEncoded, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        """A batch: augmented for training, timm's eval transform (`train=False`) for evaluation."""
        if train:
            imgs = torch.stack([self._augment(enc.images[i]) for i in idx])
        else:
            imgs = torch.stack([center_crop(enc.images[i], self.pre.size) for i in idx])
        batch = {"x": normalize(imgs, self.pre)}
        if enc.labels is not None:
            batch["labels"] = enc.labels[idx]
            a = self.config.image
            if train and (a.mixup or a.cutmix) and len(idx) % 2 == 0:  # timm's Mixup pairs images: even batches only
                if self._mixup is None:
                    from timm.data import Mixup

                    self._mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                                        num_classes=len(self.labels))
                batch["x"], batch["soft_labels"] = self._mixup(batch["x"], batch["labels"])
                batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
        return batch

    # -- one step -----------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch.pop("labels")
        soft = batch.pop("soft_labels", None)
        out = model(**batch)
        logits = out.logits if hasattr(out, "logits") else out
        if soft is not None:
            loss = torch.sum(-soft * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = self.cross_entropy(logits, labels, label_smoothing=self.config.image.label_smoothing)
        return {"loss": loss, "logits": logits}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, enc: ImageEncoded, acc: Accumulator, rt: Runtime, features: bool = False) -> None:
        """Logits of this process's rows (and the pooled features the classifier reads, if asked)."""
        was_training = model.training
        model.eval()
        for start in range(0, len(enc), rt.batch_size):
            b = shard(list(range(start, min(start + rt.batch_size, len(enc)))), rt.rank, rt.world)
            if not b:
                continue
            x = self.collate(enc, b, train=False)["x"].to(rt.device)
            pooled = None
            with torch.autocast(rt.device.type, dtype=rt.amp, enabled=rt.amp is not None):
                if features:
                    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
                    out = model.get_classifier()(pooled)
                    pooled = pooled.float().cpu().numpy()
                else:
                    out = model(x)
            acc.update(b, out.float().cpu().numpy(), pooled)
        model.train(was_training)

    def metrics(self, logits: np.ndarray, labels: torch.Tensor) -> dict[str, Any]:
        m = super().metrics(logits, labels)
        k = min(self.config.image.top_k, len(self.labels))
        if k > 1:
            top = np.argsort(-logits, axis=1)[:, :k]
            m[f"top{k}_accuracy"] = float((top == labels.numpy()[:, None]).any(axis=1).mean())
        return m

    def save(self, model: nn.Module, directory: Path) -> None:
        from tunesmith.models.timm_models import save_timm

        save_timm(model, directory, self.labels, self.export_data_config())
        (directory / "preprocessing.json").write_text(json.dumps(self.pre.to_dict(), indent=2), encoding="utf-8")
