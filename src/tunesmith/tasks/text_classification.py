"""`text-classification`: a pre-trained text encoder plus a new classification head.

Single-label (softmax, cross-entropy) or multi-label (sigmoid, binary cross-entropy) decided by
the data. The head is the model family's own `*ForSequenceClassification` head, sized to the
user's labels; a pre-trained head of another size is discarded.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tunesmith.data.batching import Ragged, make_batches, pad_batch, shard
from tunesmith.data.text import TextSet, check_known_labels, is_multi_label, read_text_set
from tunesmith.errors import UserError
from tunesmith.models.heads import checkpoint_label_names, mean_pool, sentence_transformers_pooling, use_mean_pooling
from tunesmith.models.safety import check_weights_safety, loading_weights
from tunesmith.precision import linear_weights_cast
from tunesmith.tasks.base import Accumulator, Prepared, Runtime, TokenView
from tunesmith.tasks.classification import ClassificationTask
from tunesmith.validate import DataReport, classification_report, token_lengths

if TYPE_CHECKING:
    from tunesmith.config import Config
    from tunesmith.models.resolve import ResolvedModel


@dataclass
class Encoded:
    """A tokenized text set, ready for batching: token ids as one flat array (see `Ragged`)."""

    input_ids: Ragged
    extra: dict[str, Ragged]  # token_type_ids for sentence pairs
    labels: torch.Tensor | None  # (N,) long, or (N, C) float for multi-label
    truncated: int

    @property
    def lengths(self) -> list[int]:
        return self.input_ids.lengths

    def __len__(self) -> int:
        return len(self.input_ids)

    def concat(self, other: "Encoded") -> "Encoded":
        """This set followed by `other` (replay rows appended after the training rows)."""
        labels = torch.cat([self.labels, other.labels]) if self.labels is not None and other.labels is not None else None
        extra = {k: v + other.extra[k] for k, v in self.extra.items() if k in other.extra}
        return Encoded(self.input_ids + other.input_ids, extra, labels, self.truncated + other.truncated)

    def digest(self) -> str:
        """A hash of the token ids: what a feature cache keys the data on."""
        h = hashlib.sha256()
        h.update(np.asarray(self.lengths, dtype=np.int64).tobytes())
        for name, part in [("", self.input_ids)] + [(k, self.extra[k]) for k in sorted(self.extra)]:
            h.update(name.encode())
            for row in part:  # streamed from disk, hashed as int64 as when the ids were in memory
                h.update(row.astype(np.int64).tobytes())
        return h.hexdigest()

    def subset(self, idx: list[int]) -> "Encoded":
        return Encoded(
            self.input_ids.take(idx),
            {k: v.take(idx) for k, v in self.extra.items()},
            self.labels[idx] if self.labels is not None else None,
            0,
        )


class TextClassification(ClassificationTask):
    name = "text-classification"
    # measured on MiniLM-L6 (benchmarks/bench_defaults.py, docs/strategies.md): at 2e-5 full fine-tuning
    # ends below the linear probe on small data (macro-F1 0.52 vs 0.62 at 800 imbalanced rows), at 1e-4 above it
    strategy_lr = {"full": 1e-4}
    # one pass, raised to optim.min_steps on small data (docs/strategies.md, "The budget"): at 3,000-4,000 rows a
    # second and third epoch measured -0.9 to +2.9 points macro-F1 on three proxies, for 1.7-3x the training time
    default_epochs = 1

    def __init__(self, config: "Config"):
        super().__init__(config)
        self._prepared: Prepared | None = None

    # -- data ---------------------------------------------------------------------------------
    def load_data(self) -> Prepared:
        """The data `validate` read and checked (validated now if it was not)."""
        if self._prepared is None:
            rep = self.validate()
            if not rep.ok:
                raise UserError(rep.error_line())
        return self._prepared

    def validate(self, tokenizer: Any = None) -> DataReport:
        """Read every data file once and report on it (see tunesmith.validate); never raises for bad data.

        When training can proceed, the sets it read are the ones `load_data` returns."""
        d = self.config.data
        collect = d.model_copy(update={"bad_rows": "skip"})  # read past bad rows to list them all
        files = [("train", d.train), ("validation", d.validation), ("test", d.test)]
        if self.config.strategy.replay:
            files.append(("replay", self.config.strategy.replay.file))
        rep, sets, names, multi = classification_report(
            files, lambda path, split: read_text_set(path, collect, split),
            keys=lambda s: s.keys,
            multi_label=lambda found: is_multi_label(found, d), data=d, seed=self.config.train.seed,
        )
        rep.max_length = self.config.train.max_length
        if tokenizer is not None:
            for f in rep.files:
                if f.split in sets:
                    s = sets[f.split]
                    f.lengths = token_lengths(tokenizer, s.texts, s.pairs)
                    f.truncated = sum(1 for n in f.lengths if n > rep.max_length)
        rep.check_rows()
        if rep.ok:
            self.labels, self.multi_label = names, multi
            self._prepared = Prepared(sets["train"], sets["validation"], sets["test"], names, multi)
            self.set_class_weights(sets["train"].labels)
        return rep

    def load_replay(self, path: str) -> TextSet:
        """General-domain rows to mix into training (strategy.replay): same columns, known labels."""
        s = read_text_set(path, self.config.data, "replay")
        check_known_labels(s, self.labels, self.multi_label)
        return s

    # -- model --------------------------------------------------------------------------------
    def load_tokenizer(self, resolved: "ResolvedModel") -> Any:
        from transformers import AutoTokenizer

        if self.tokenizer is None:
            remote = {"trust_remote_code": True} if self.config.trust_remote_code else {}  # load_model warns
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), **remote)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the tokenizer of '{resolved.spec}' from {resolved.path}: {str(e).splitlines()[0]}") from None
        return self.tokenizer

    def load_model(self, resolved: "ResolvedModel") -> tuple[nn.Module, list[str], list[str]]:
        """The backbone with a new head; returns (model, head parameter names, discarded keys)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        path = str(resolved.path)
        remote = check_weights_safety(resolved, self.config)
        self.load_tokenizer(resolved)
        try:
            hf_config = AutoConfig.from_pretrained(
                path, **remote,
                num_labels=len(self.labels),
                id2label=dict(enumerate(self.labels)),
                label2id={l: i for i, l in enumerate(self.labels)},
                problem_type="multi_label_classification" if self.multi_label else "single_label_classification",
            )
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model '{resolved.spec}' from {path}: {str(e).splitlines()[0]}") from None
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # we report the new head ourselves, in one line
        try:
            with loading_weights(resolved, "has no sequence-classification head class"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, config=hf_config, ignore_mismatched_sizes=True, output_loading_info=True, **remote
                )
        finally:
            hf_logging.set_verbosity(verbosity)
        # a model a tunesmith run saved: its config describes the head that run left (`tunesmith_head`);
        # this run starts its own description, keeping only that the model reads the mean token
        saved = getattr(model.config, "tunesmith_head", None) or {}
        if hasattr(model.config, "tunesmith_head"):
            del model.config.tunesmith_head
        pooling = (self.config.strategy.model_extra or {}).get("pooling", "auto")  # feature-extraction's key
        if pooling == "mean" or pooling == "auto" and (
                saved.get("pooling") == "mean" or sentence_transformers_pooling(resolved.path) == "mean"):
            # a sentence-transformers model classifies from what it was trained to give: the mean token
            use_mean_pooling(model)
        fresh = set(info.get("missing_keys", [])) | {m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])}
        head = [n for n, _ in model.named_parameters() if n in fresh]
        discarded = sorted(set(info.get("unexpected_keys", [])) | {m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])})
        if not head:  # a checkpoint that already had a head of exactly this size: retrain its classifier
            head = [n for n, _ in model.named_parameters() if n.startswith(_classifier_prefix(model))]
            named = checkpoint_label_names(resolved.path)
            if named is not None and named != self.labels:  # other classes, or another order: its rows mean nothing here
                with torch.no_grad():  # transformers' initialisation of a classification head
                    for n, p in model.named_parameters():
                        if n in head and p.dim() > 1:
                            p.normal_(0.0, getattr(model.config, "initializer_range", 0.02))
                        elif n in head:
                            p.zero_()
            else:
                self.head_kept = f"the checkpoint's own {len(self.labels)}-way head" + (" (the same labels)" if named else "")
        return model, head, discarded

    # -- a finished run ------------------------------------------------------------------------
    def load_trained(self, model_dir: Path) -> nn.Module:
        from tunesmith.predict import TextClassifier

        clf = TextClassifier(model_dir, device="cpu")
        self.tokenizer, self.labels, self.multi_label = clf.tokenizer, clf.labels, clf.multi_label
        return clf.model

    def read_eval_set(self, path: str) -> Encoded:
        d = self.config.data.model_copy(update={"train": path, "validation": None, "test": None, "max_rows": None})
        s = read_text_set(path, d, "evaluation")
        check_known_labels(s, self.labels, self.multi_label)
        return self.encode(s)

    # -- batches ------------------------------------------------------------------------------
    def encode(self, s: TextSet) -> Encoded:
        """Tokenized in chunks straight into flat arrays: the tokenizer's per-token objects never exist for
        the whole set at once (peak memory stays flat as the data grows)."""
        max_length, chunk = self.config.train.max_length, 2048
        ids = Ragged.writer()
        types = Ragged.writer(ids.spill) if s.pairs is not None else None
        truncated, has_types = 0, False
        for a in range(0, len(s), chunk):
            texts = s.texts[a : a + chunk]
            pairs = s.pairs[a : a + chunk] if s.pairs is not None else None
            kwargs = {"text_pair": pairs} if pairs is not None else {}
            enc = self.tokenizer(texts, truncation=True, max_length=max_length, **kwargs)
            ids.extend(enc["input_ids"])
            if types is not None and "token_type_ids" in enc:
                types.extend(enc["token_type_ids"])
                has_types = True
            # Only rows that came out exactly max_length long can have been cut: re-tokenize just those.
            full_len = [i for i, x in enumerate(enc["input_ids"]) if len(x) == max_length]
            if full_len:
                again = self.tokenizer([texts[i] for i in full_len], text_pair=[pairs[i] for i in full_len] if pairs else None,
                                       truncation=False)["input_ids"]
                truncated += sum(1 for x in again if len(x) > max_length)
        extra = {"token_type_ids": types.done()} if has_types else {}
        labels = self._label_tensor(s.labels) if s.labels and s.labels[0] is not None else None
        return Encoded(ids.done(), extra, labels, truncated)

    def card(self) -> dict[str, str]:
        return {"library_name": "transformers", "pipeline_tag": "text-classification", "usage": """
With tunesmith: `tunesmith predict RUN "some text"`, or in Python `tunesmith.load("RUN").predict(["some text"])`.

With plain transformers (a sentence-transformers base classifies from its mean token: tunesmith restores that
pooler for you; plain `from_pretrained` gives the family's own head on this folder):

```python
from transformers import pipeline
clf = pipeline("text-classification", model="RUN/model")
print(clf("some text", top_k=None))
```
"""}

    def example(self, i: int) -> dict[str, Any]:
        s = self.load_data().test
        text = s.texts[i] if s.pairs is None else f"{s.texts[i]} [pair] {s.pairs[i]}"
        return {"where": s.where[i], "text": text if len(text) <= 600 else text[:600] + " ..."}

    def token_preview(self, n: int) -> tuple[list[TokenView], list[str]]:
        """The first training rows after truncation; the label is the target, no token is."""
        s = self.load_data().train
        enc = self.encode(s.subset(list(range(min(n, len(s)))), "preview", s.source))
        views = []
        for i, ids in enumerate(enc.input_ids):
            pieces = self.tokenizer.convert_ids_to_tokens([int(t) for t in ids])
            label = s.labels[i] if isinstance(s.labels[i], str) else "|".join(s.labels[i])
            cut = " (truncated)" if len(ids) == self.config.train.max_length else ""
            views.append(TokenView(s.where[i], [(p, int(t), None) for p, t in zip(pieces, ids)],
                                   f"label {label}, {len(ids)} tokens{cut}"))
        return views, []

    def _label_tensor(self, labels: list[Any]) -> torch.Tensor:
        index = {l: i for i, l in enumerate(self.labels)}
        if self.multi_label:
            t = torch.zeros(len(labels), len(self.labels))
            for row, ls in enumerate(labels):
                t[row, [index[l] for l in ls]] = 1.0
            return t
        return torch.tensor([index[l] for l in labels], dtype=torch.long)

    def collate(self, enc: Encoded, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        batch = pad_batch(
            enc.input_ids.rows(idx),
            self.tokenizer.pad_token_id or 0,
            {k: v.rows(idx) for k, v in enc.extra.items()},
        )
        if enc.labels is not None:
            batch["labels"] = enc.labels[idx]
        return batch

    # -- one step -----------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward pass; returns a dict with the required `loss` and the logits."""
        labels = batch.pop("labels")
        logits = model(**batch).logits
        if self.multi_label:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        else:
            loss = self.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, enc: Encoded, acc: Accumulator, rt: Runtime, features: bool = False) -> None:
        """Logits of this process's rows (and their mean-pooled last hidden states if asked)."""
        was_training = model.training
        model.eval()
        with linear_weights_cast(model, rt.amp):
            for b in make_batches(enc.lengths, rt.batch_size, seed=0, epoch=0, shuffle=False):
                b = shard(b, rt.rank, rt.world)
                if not b:
                    continue
                batch = {k: v.to(rt.device) for k, v in self.collate(enc, b).items() if k != "labels"}
                with torch.autocast(rt.device.type, dtype=rt.amp, enabled=rt.amp is not None):
                    out = model(**batch, output_hidden_states=features)
                pooled = mean_pool(out.hidden_states[-1].float(), batch["attention_mask"]).cpu().numpy() if features else None
                acc.update(b, out.logits.float().cpu().numpy(), pooled)
        model.train(was_training)


def _classifier_prefix(model: nn.Module) -> str:
    for name in ("classifier", "score", "head", "classification_head"):
        if hasattr(model, name):
            return name + "."
    names = [n for n, _ in model.named_parameters()]
    return names[-1].rsplit(".", 1)[0] + "."


logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars: noise in our output


_quiet_transformers()
