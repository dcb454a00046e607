"""`preference`: tuning a chat model on which of two answers is better (DPO, IPO, SimPO, ORPO) or
on answers marked good or bad (KTO), the step after instruction tuning.

It is the `causal-lm` task with preference rows: the same models, tokenizer, chat template,
generation samples and forgetting check; data is read and checked in
`tunesmith.data.preference`; the losses are in `tunesmith.tasks.preference_loss`.

How a step is computed (what the loop sees is one forward per micro-batch):

- A pair is one row: prompt, then the chosen answer, then the rejected answer. Position ids put
  both answers right after the prompt, and a 4D attention mask lets each answer see the prompt
  and itself only, so the prompt is computed once for both answers (TRL runs it twice, once in
  each of the concatenated chosen and rejected rows). KTO rows hold the answer and the
  mismatched answer (for the KL estimate z0) the same way.
- Only the positions that predict an answer token go through the output layer (the prompt's
  logits are never formed; a 49k-word vocabulary makes them the largest tensor of a step).
- The reference model's log-probabilities are computed once, before training, with LoRA
  adapters disabled (or, under full fine-tuning, from the starting weights), and cached on disk
  keyed by the model and the tokenized data, like the feature cache: no second copy of the model,
  no reference pass per step, and a resumed run or a second seed reads them back.

Evaluation before and after, on held-out pairs: the preference loss, `preference_accuracy`
(the share of pairs whose chosen answer gets the higher mean token log-probability: the model's
own ranking, comparable before and after), the implicit reward accuracy and margin, and after
training the drift from the reference (`kl`: mean per-token KL(policy || reference) on the
held-out answers), plus base-vs-tuned answers to held-out prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tunesmith.data.batching import shard
from tunesmith.data.chat import LMSet, tokenize_chat
from tunesmith.data.preference import PrefExample, read_pref_set
from tunesmith.errors import UserError
from tunesmith.models.cache import cache_root, model_identity
from tunesmith.tasks.base import Accumulator, Runtime, TokenView
from tunesmith.tasks.causal_lm import CausalLM, LMEncoded, token_batches, unwrap
from tunesmith.tasks.preference_loss import DEFAULT_BETA, REFERENCE_FREE, kto, pair_loss
from tunesmith.tasks.preference_loss import token_logps as token_logps_of

if TYPE_CHECKING:
    from tunesmith.config import Config

REF_CACHE_VERSION = 1
KL_WARN = 1.0  # nats/token of drift from the reference past which the run warns
KL_CHUNK = 256  # answer positions per output-layer chunk in the drift measurement
LM_FORMATS = ("text", "chat", "prompt-completion")  # sets the causal-lm side reads (general text for the forgetting check)
# accumulator columns per row: policy log-prob of answer 1 and 2, their token counts, reference log-probs, label
P1, P2, N1, N2, R1, R2, LABEL = range(7)


@dataclass
class PairTokens:
    """One row as token ids: the prompt and two answers (chosen, rejected; or for KTO the answer and a
    mismatched one); `label` for KTO rows."""

    prompt: list[int]
    first: list[int]
    second: list[int]
    label: bool | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.first) + len(self.second)


@dataclass
class PrefEncoded:
    """Rows ready for batching, with the reference log-probabilities once computed."""

    rows: list[PairTokens]
    truncated: int = 0
    ref: np.ndarray | None = None  # (rows, 2) float64
    labels: None = None  # the loop's classification interface: no labels here
    examples: int = 0
    _digest: str | None = field(default=None, repr=False)

    @property
    def lengths(self) -> list[int]:
        return [r.length for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def unpaired(self) -> bool:
        return bool(self.rows) and self.rows[0].label is not None

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            for r in self.rows:
                h.update(json.dumps([r.prompt, r.first, r.second, r.label]).encode())
            self._digest = h.hexdigest()
        return self._digest


class Preference(CausalLM):
    name = "preference"
    model_task = "causal-lm"  # the same chat models
    metrics_better = {"loss": "min", "preference_accuracy": "max", "reward_accuracy": "max", "reward_margin": "max"}
    unit = "samples"
    default_strategy = "lora"
    auto_choice = ("lora", "preference: LoRA keeps the base model intact, and the base with adapters disabled is the "
                           "reference model (no second copy)")
    too_long_row = "prompt + the longer answer exceed train.max_length"
    too_long_lead = "do not fit train.max_length={}: the prompt leaves no room for the answers"
    too_long_fix = ("raise train.max_length, shorten the prompts, set preference.cut_prompt=true to cut them from the left, "
                    "or lm.too_long=skip to drop and count those rows")

    def __init__(self, config: "Config"):
        super().__init__(config)
        self.pref = config.preference
        self.beta = self.pref.beta if self.pref.beta is not None else DEFAULT_BETA[self.pref.loss]
        self._ref_info: dict[str, Any] = {}

    @classmethod
    def configure(cls, cfg: "Config") -> None:
        super().configure(cfg)
        if "packing" in cfg.lm.model_fields_set and cfg.lm.packing:
            raise ValueError("lm.packing does not apply to preference data: a row is one prompt with its two answers")
        cfg.lm.packing = False
        if "min_steps" not in cfg.optim.model_fields_set:
            cfg.optim.min_steps = 0  # epochs as configured: many passes over few pairs over-optimise the margins (TRL, OpenAI: 1-3 epochs)
        lora = getattr(cfg.strategy, "lora", None)
        if lora is not None and "dropout" not in lora.model_fields_set:
            lora.dropout = 0.0  # the policy's log-probabilities are compared with the reference's: no noise (TRL's disable_dropout)
        if cfg.strategy.replay:
            raise ValueError("strategy.replay does not apply to the preference task (it mixes instruction data into batches "
                             "of pairs); to limit forgetting lower the learning rate or raise preference.beta")

    # -- data ---------------------------------------------------------------------------------
    def read_set(self, path: str, split: str) -> LMSet:
        s = read_pref_set(path, self.config.data, self.pref.format, self.config.lm.system_prompt, split)
        if s.format == "unpaired" and self.pref.loss != "kto":
            raise UserError(f"{path}: unpaired rows (prompt, completion, label) say whether one answer is good, not which of "
                            f"two is better; preference.loss {self.pref.loss} needs pairs: set preference.loss=kto, or give "
                            "prompt/chosen/rejected rows")
        return s

    def _answer_ids(self, e: PrefExample, answer: Any) -> tuple[list[int], list[int]]:
        """(ids of prompt + answer, index where the answer starts); the answer ends with its end-of-turn/EOS token."""
        tok = self.tokenizer
        if not e.chat:
            p = tok(e.prompt, add_special_tokens=True)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
            return p + a, len(p)
        context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in e.prompt]
        messages = context + [dict(m) for m in answer]
        try:
            t = tokenize_chat(tok, self.template, messages, "assistant", tools=e.tools)
        except UserError as err:
            raise UserError(f"{e.where}: {err}") from None
        first = t.trained.index(True) if any(t.trained) else len(t.ids)
        last = len(t.trained) - t.trained[::-1].index(True) if any(t.trained) else len(t.ids)
        return t.ids[:last], first

    def _pair_tokens(self, e: PrefExample, mismatched: Any = None) -> tuple[PairTokens, int]:
        """(the row's tokens before fitting, the prompt's length)."""
        a_ids, a_start = self._answer_ids(e, e.chosen)
        other = e.rejected if e.rejected is not None else mismatched
        if other is None:
            return PairTokens(a_ids[:a_start], a_ids[a_start:], [], e.label), a_start
        b_ids, b_start = self._answer_ids(e, other)
        n = 0  # the shared prompt: tokens equal in both renderings, before either answer starts
        limit = min(a_start, b_start)
        while n < limit and a_ids[n] == b_ids[n]:
            n += 1
        return PairTokens(a_ids[:n], a_ids[n:], b_ids[n:], e.label), n

    def _fit(self, t: PairTokens) -> tuple[PairTokens | None, bool]:
        """The row within train.max_length (each answer with the prompt: positions restart per answer)."""
        limit = self.config.train.max_length
        longer = max(len(t.first), len(t.second) if t.label is None else 0)
        if t.label is not None and len(t.prompt) + len(t.second) > limit:  # KTO's mismatched answer is an estimate: cut it
            t = PairTokens(t.prompt, t.first, t.second[: max(0, limit - len(t.prompt))], t.label)
        if len(t.prompt) + longer <= limit:
            return t, False
        room = limit - longer
        if not self.pref.cut_prompt or room < 1:
            return None, True
        return PairTokens(t.prompt[-room:], t.first, t.second[: limit - room], t.label), True

    def _tokenize_set(self, s: LMSet) -> tuple[list[PairTokens | None], list[int], int, list[tuple[str, int]]]:
        from tunesmith.validate import quiet_length_warnings

        if s.format in LM_FORMATS:
            return super()._tokenize_set(s)
        fitted: list[PairTokens | None] = []
        lengths, long_rows, truncated = [], [], 0
        examples = s.examples  # KTO reads a pair as one good and one bad answer
        if self.pref.loss == "kto":
            examples = [u for e in s.examples for u in e.unpaired()]
        with quiet_length_warnings():
            for i, e in enumerate(examples):
                mismatched = examples[(i + 1) % len(examples)].chosen if e.label is not None and len(examples) > 1 else None
                if mismatched is not None and e.chat != examples[(i + 1) % len(examples)].chat:
                    mismatched = None
                t, _ = self._pair_tokens(e, mismatched)
                lengths.append(len(t.prompt) + max(len(t.first), len(t.second)))
                f, cut = self._fit(t)
                if f is None:
                    long_rows.append((e.where, lengths[-1]))
                truncated += cut and f is not None
                fitted.append(f)
        self._tokenized[id(s)] = (fitted, truncated)
        return fitted, lengths, truncated, long_rows

    def encode(self, s: LMSet) -> PrefEncoded | LMEncoded:
        if s.format in LM_FORMATS:  # the forgetting check's general text
            return super().encode(s)
        if id(s) not in self._tokenized:
            self._tokenize_set(s)
        fitted, truncated = self._tokenized[id(s)]
        rows = [t for t in fitted if t is not None]
        return PrefEncoded(rows, truncated, examples=len(rows))

    def describe(self, enc: dict[str, Any]) -> list[str]:
        lines = []
        for name, e in enc.items():
            if e.truncated:
                lines.append(f"truncated: {e.truncated} of {e.examples} {name} rows had their prompt cut from the left "
                             f"(preference.cut_prompt) to fit train.max_length={self.config.train.max_length}")
            kind = "answers (good/bad)" if e.unpaired else "pairs"
            lines.append(f"tokens: {name:<10} {len(e)} {kind}, {sum(e.lengths):,} tokens "
                         f"({sum(len(r.prompt) for r in e.rows):,} prompt tokens, computed once per row)")
        return lines

    def token_preview(self, n: int) -> tuple[list[TokenView], list[str]]:
        s = self.load_data().train
        enc = self.encode(s)
        views = []
        for e, t in list(zip(s.examples, enc.rows))[:n]:
            tokens = [(self.tokenizer.decode([i]), i, False) for i in t.prompt]
            tokens += [(self.tokenizer.decode([i]), i, True) for i in t.first]
            tokens += [(self.tokenizer.decode([i]), i, None if t.label is not None else True) for i in t.second]
            what = "answer" if t.label is not None else "chosen"
            views.append(TokenView(e.where, tokens, f"prompt {len(t.prompt)}, {what} {len(t.first)}, "
                                                    f"{'mismatched' if t.label is not None else 'rejected'} {len(t.second)} tokens"))
        return views, ["one row per pair: the prompt once, then each answer at the positions right after it "
                       "(each answer attends to the prompt and itself only)"]

    # -- batches ------------------------------------------------------------------------------
    def collate(self, enc: Any, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        """Rows [prompt | answer 1 | answer 2 | padding], a 4D mask, and where each answer token is predicted from."""
        if isinstance(enc, LMEncoded):
            return super().collate(enc, idx, train)
        rows = [enc.rows[i] for i in idx]
        width = max(r.length for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        branch = torch.full((len(rows), width), 3, dtype=torch.long)
        src, tgt, seq = [], [], []
        for b, r in enumerate(rows):
            p, a, c = len(r.prompt), len(r.first), len(r.second)
            ids[b, : p + a + c] = torch.as_tensor(r.prompt + r.first + r.second)
            positions[b, :p] = torch.arange(p)
            positions[b, p : p + a] = torch.arange(p, p + a)
            positions[b, p + a : p + a + c] = torch.arange(p, p + c)
            positions[b, p + a + c :] = torch.arange(width - p - a - c)
            branch[b, :p], branch[b, p : p + a], branch[b, p + a : p + a + c] = 0, 1, 2
            for start, n, k in ((p, a, 0), (p + a, c, 1)):
                # the answer's first token is predicted from the prompt's last; each later one from the token before it
                src += [b * width + p - 1] + [b * width + start + j - 1 for j in range(1, n)] if n else []
                tgt += (r.prompt + r.first + r.second)[start : start + n]
                seq += [2 * b + k] * n
        q = torch.arange(width)
        causal = q[None, :] <= q[:, None]
        key_branch, query_branch = branch[:, None, :], branch[:, :, None]
        mask = causal[None] & ((key_branch == 0) | (key_branch == query_branch))
        batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask[:, None],
                 "src": torch.as_tensor(src, dtype=torch.long), "tgt": torch.as_tensor(tgt, dtype=torch.long),
                 "seq": torch.as_tensor(seq, dtype=torch.long),
                 "n": torch.as_tensor([[len(r.first), len(r.second)] for r in rows], dtype=torch.float32)}
        if enc.ref is not None:
            batch["ref"] = torch.as_tensor(enc.ref[idx], dtype=torch.float32)
        if rows[0].label is not None:
            batch["label"] = torch.as_tensor([bool(r.label) for r in rows])
        return batch

    def weight(self, enc: Any, idx: list[int]) -> float:
        if isinstance(enc, LMEncoded):
            return super().weight(enc, idx)
        return float(len(idx))

    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, 2) summed log-probabilities of each row's two answers."""
        base = unwrap(model)
        if getattr(base.config, "_attn_implementation", "sdpa") != "sdpa":  # eager and others take an additive float mask
            mask = batch["attention_mask"]
            batch = {**batch, "attention_mask": torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min)}
        hidden, head = self._hidden_and_head(model, batch)
        h = hidden.reshape(-1, hidden.shape[-1])[batch["src"]]
        if type(head) is nn.Linear:  # chunked, logits recomputed in the backward pass: no rows x vocabulary tensor kept
            token_logps = token_logps_of(h, head, batch["tgt"])
        else:  # an adapted or unusual output layer (or the model's own logits): as it computes
            token_logps = -nn.functional.cross_entropy(head(h).float(), batch["tgt"], reduction="none")
        rows = batch["input_ids"].shape[0]
        return torch.zeros(rows * 2, dtype=token_logps.dtype, device=token_logps.device).index_add(
            0, batch["seq"], token_logps).view(rows, 2)

    def losses(self, lp: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per row, reward margin per row) from the policy's log-probabilities and the batch's references."""
        pref, n = self.pref, batch["n"].clamp(min=1)
        ref = batch.get("ref")
        if ref is None and pref.loss not in REFERENCE_FREE:
            raise RuntimeError("the reference log-probabilities were not computed before training")
        if pref.loss == "kto":
            loss, reward, _z0 = kto(lp[:, 0], ref[:, 0], batch["label"], lp[:, 1], ref[:, 1], self.beta,
                                    pref.desirable_weight, pref.undesirable_weight)
            return loss, reward
        rc, rr = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        loss, (chosen, rejected) = pair_loss(pref.loss, lp[:, 0], lp[:, 1], rc, rr, n[:, 0], n[:, 1], self.beta,
                                             pref.gamma, pref.label_smoothing)
        return loss, chosen - rejected

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lp = self.logps(model, batch)
        loss, margin = self.losses(lp, batch)
        return {"loss": loss.mean(), "reward_margin": margin.mean()}

    # -- the reference: once, before any weight moves -----------------------------------------
    def before_training(self, model: nn.Module, enc: dict[str, Any], rt: Runtime) -> None:
        """Reference log-probabilities of every split (the base with adapters disabled, or the starting
        weights), read from the cache when this model and data were seen before."""
        if self.pref.loss in REFERENCE_FREE:
            return
        from safetensors.numpy import load_file, save_file

        root = cache_root() / "reference"
        identity = model_identity(unwrap(model))
        for split, e in enc.items():
            if not isinstance(e, PrefEncoded) or e.ref is not None:
                continue
            key = hashlib.sha256(json.dumps([REF_CACHE_VERSION, identity, self.template, str(rt.amp),
                                             e.digest()]).encode()).hexdigest()[:32]
            path = root / f"{key}.safetensors"
            t0 = time.perf_counter()
            cached = path.exists()
            if cached:
                e.ref = load_file(str(path))["ref"]
            else:
                e.ref = self._reference_pass(model, e, rt)
                if rt.main:
                    root.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    save_file({"ref": e.ref}, str(tmp))
                    os.replace(tmp, path)  # written aside, then renamed: a killed run leaves no half-written cache
            seconds = time.perf_counter() - t0
            self._ref_info[split] = {"rows": len(e), "cached": cached, "seconds": round(seconds, 2), "key": key}
            rt.print(f"reference: {split} {len(e)} rows, log-probabilities {'read from cache' if cached else 'computed'} "
                     f"in {seconds:.1f} s")

    def _reference_pass(self, model: nn.Module, enc: PrefEncoded, rt: Runtime) -> np.ndarray:
        acc = self.accumulator(enc)
        with adapters_off(model):
            self.predict(model, enc, acc, rt)
        acc.merge(rt.gather)
        return acc.rows[:, [P1, P2]].copy()

    # -- evaluation ---------------------------------------------------------------------------
    def accumulator(self, enc: Any) -> Accumulator:
        if isinstance(enc, LMEncoded):
            return super().accumulator(enc)
        return Accumulator(len(enc), 7, self.metrics, dtype=np.float64)

    @torch.no_grad()
    def predict(self, model: nn.Module, enc: Any, acc: Accumulator, rt: Runtime, features: bool = False) -> None:
        if isinstance(enc, LMEncoded):
            return super().predict(model, enc, acc, rt, features)
        was_training = model.training
        model.eval()
        tokens_per_batch = max(rt.batch_size * 128, self.config.train.max_length * 2)
        for b in token_batches(enc.lengths, tokens_per_batch):
            b = shard(b, rt.rank, rt.world)
            if not b:
                continue
            batch = {k: v.to(rt.device) for k, v in self.collate(enc, b, train=False).items()}
            with torch.autocast(rt.device.type, dtype=rt.amp, enabled=rt.amp is not None):
                lp = self.logps(model, batch).double().cpu().numpy()
            n = batch["n"].cpu().numpy()
            ref = enc.ref[b] if enc.ref is not None else np.full_like(lp, np.nan)  # no reference: no loss or rewards
            label = np.array([1.0 if enc.rows[i].label else 0.0 for i in b])
            acc.update(b, np.column_stack([lp, n, ref, label]))
        model.train(was_training)

    def metrics(self, rows: np.ndarray, labels: Any = None) -> dict[str, Any]:
        if rows.shape[1] == 2:  # the forgetting check's token losses
            return super().metrics(rows, labels)
        t = {k: torch.as_tensor(rows[:, c]) for k, c in (("p1", P1), ("p2", P2), ("n1", N1), ("n2", N2), ("r1", R1), ("r2", R2))}
        n1, n2 = t["n1"].clamp(min=1), t["n2"].clamp(min=1)
        no_reference = np.isnan(rows[:, [R1, R2]]).any()  # `tunesmith eval` on new pairs: no reference log-probabilities
        if self.pref.loss == "kto":
            good = torch.as_tensor(rows[:, LABEL] > 0.5)
            auc = _auc(rows[:, P1] / rows[:, N1].clip(1), good.numpy())
            if no_reference:
                return {"preference_accuracy": auc, "rows": len(rows)}
            loss, reward, z0 = kto(t["p1"], t["r1"], good, t["p2"], t["r2"], self.beta,
                                   self.pref.desirable_weight, self.pref.undesirable_weight)
            right = torch.where(good, reward > self.beta * z0, reward < self.beta * z0).double()
            return {"loss": float(loss.mean()), "preference_accuracy": auc,
                    "reward_accuracy": float(right.mean()), "reward_margin": float(reward[good].mean() - reward[~good].mean())
                    if good.any() and (~good).any() else 0.0, "kl_estimate_z0": float(z0), "rows": len(rows)}
        own = t["p1"] / n1 - t["p2"] / n2  # the model's own ranking: mean token log-probability
        ranking = {"preference_accuracy": float(((own > 0).double() + 0.5 * (own == 0).double()).mean()),
                   "logps_chosen": float((t["p1"] / n1).mean()), "logps_rejected": float((t["p2"] / n2).mean()),
                   "pairs": len(rows)}
        if self.pref.loss not in REFERENCE_FREE and no_reference:
            return ranking
        ref = None if self.pref.loss in REFERENCE_FREE else (t["r1"], t["r2"])
        loss, (chosen, rejected) = pair_loss(self.pref.loss, t["p1"], t["p2"], *(ref or (None, None)), n1, n2, self.beta,
                                             self.pref.gamma, self.pref.label_smoothing)
        margin = chosen - rejected
        return {"loss": float(loss.mean()), "preference_accuracy": ranking["preference_accuracy"],
                "reward_accuracy": float((margin > 0).double().mean()), "reward_margin": float(margin.mean()),
                **{k: v for k, v in ranking.items() if k != "preference_accuracy"}}

    def final(self, model: nn.Module, enc: dict[str, Any], rt: Runtime, ev: dict[str, Any]) -> dict[str, Any]:
        out = super().final(model, enc, rt, ev)
        if self._ref_info:
            out["reference"] = {"source": "the starting model" + (" (LoRA adapters disabled)" if is_peft(model) else ""),
                                "cache_dir": str(cache_root() / "reference"), **self._ref_info}
        if rt.main:
            kl = self._drift(model, enc["test"], rt)
            if kl is not None:
                out["after"]["kl"] = kl
        b, a = ev.get("before", {}), out["after"]
        out["preference"] = {"loss": self.pref.loss, "beta": self.beta, "accuracy_before": b.get("preference_accuracy"),
                             "accuracy_after": a["preference_accuracy"], "reward_margin_after": a["reward_margin"],
                             "kl_after": a.get("kl"), "warnings": self._warnings(a)}
        return out

    def _warnings(self, after: dict[str, Any]) -> list[str]:
        """Signs of a policy that went too far from the reference (over-optimisation), with the fix."""
        out = []
        fix = "lower optim.lr, raise preference.beta, or train fewer epochs"
        samples = after.get("samples") or []
        empty = [s for s in samples if not (s.get("tuned") or "").strip() and (s.get("base") or "").strip()]
        if empty:
            out.append(f"{len(empty)} of {len(samples)} sample answers are empty after tuning (the model learned to stop at "
                       f"once, a known DPO failure when the rejected answers are the long ones): {fix}")
        if (after.get("kl") or 0.0) > KL_WARN:
            out.append(f"the tuned model drifted far from the reference: KL {after['kl']:.2f} nats/token on held-out "
                       f"answers (above {KL_WARN}): {fix}")
        return out

    @torch.no_grad()
    def _drift(self, model: nn.Module, enc: PrefEncoded, rt: Runtime) -> float | None:
        """Mean per-token KL(policy || reference) over the held-out answers' positions; None without a
        reference at hand (full fine-tuning: the starting model is reloaded for this)."""
        reference = None
        if not is_peft(model):
            reference, _, _ = super().load_model(self.resolve())
            reference.to(rt.device).eval()
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for b in token_batches(enc.lengths, max(rt.batch_size * 64, self.config.train.max_length * 2)):
            batch = {k: v.to(rt.device) for k, v in self.collate(enc, b, train=False).items()}
            pol_h, pol_head = self._answer_states(model, batch)
            with adapters_off(model):
                ref_h, ref_head = self._answer_states(reference if reference is not None else model, batch)
            for i in range(0, len(pol_h), KL_CHUNK):  # rows x vocabulary at most KL_CHUNK rows at a time
                pol = torch.log_softmax(pol_head(pol_h[i : i + KL_CHUNK]).float(), -1)
                with adapters_off(model):
                    ref = torch.log_softmax(ref_head(ref_h[i : i + KL_CHUNK]).float(), -1)
                total += float((pol.exp() * (pol - ref)).sum())
            count += len(pol_h)
        model.train(was_training)
        del reference
        return total / count if count else None

    def _answer_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """(the states that predict each answer token, the output layer)."""
        hidden, head = self._hidden_and_head(model, batch)
        return hidden.reshape(-1, hidden.shape[-1])[batch["src"]], head

    def summary(self, ev: dict[str, Any]) -> list[Any]:
        lines = []
        p = ev.get("preference")
        if p:
            kl = f"; drift from the reference KL {p['kl_after']:.4f} nats/token" if p.get("kl_after") is not None else ""
            before = f"{p['accuracy_before']:.3f} -> " if p.get("accuracy_before") is not None else ""
            lines.append(f"preference accuracy on held-out pairs ({p['loss']}, beta {p['beta']}): "
                         f"{before}{p['accuracy_after']:.3f}; reward margin {p['reward_margin_after']:+.3f}{kl}")
            lines += [f"[yellow]warning:[/] {w}" for w in p.get("warnings", [])]
        from rich.text import Text  # model text is shown as is, never read as console markup

        for sample in (ev.get("after", {}).get("samples") or [])[:2]:  # side by side on screen; all in samples.md
            cut = lambda t: " ".join(str(t).split())[:110] + ("..." if len(" ".join(str(t).split())) > 110 else "")  # noqa: E731
            lines.append(Text(f"  prompt: {cut(sample['prompt'])}"))
            if sample.get("base") is not None:
                lines.append(Text(f"    base:  {cut(sample['base'])}"))
            lines.append(Text(f"    tuned: {cut(sample['tuned'])}"))
        return lines + super().summary(ev)

    def _sample_prompts(self) -> list[tuple[Any, str | None]]:
        lm = self.config.lm
        if lm.prompts or self._prepared is None or not lm.samples:
            return super()._sample_prompts()
        seen, out = set(), []
        for e in self._prepared.test.examples:
            key = json.dumps(e.prompt, sort_keys=True)
            if key not in seen and e.label is not False:
                seen.add(key)
                out.append((e.prompt_messages(), e.reference()))
            if len(out) == lm.samples:
                break
        return out

    def card(self) -> dict[str, str]:
        c = super().card()
        c["usage"] = c["usage"].replace("With tunesmith:", f"Tuned on preferences ({self.pref.loss}). With tunesmith:")
        return c


def is_peft(model: nn.Module) -> bool:
    return hasattr(getattr(model, "module", model), "disable_adapter")


class adapters_off:
    """LoRA adapters disabled for the block (the base model is the reference); nothing for other models."""

    def __init__(self, model: nn.Module):
        m = getattr(model, "module", model)
        self.ctx = m.disable_adapter() if hasattr(m, "disable_adapter") else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _auc(score: np.ndarray, good: np.ndarray) -> float:
    """The chance that a good answer scores above a bad one (ties half): pairwise accuracy for unpaired data."""
    pos, neg = score[good], score[~good]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):  # average ranks of ties
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
