"""Faster CPU training steps at the same mathematics (`train.fast_cpu_ops`, on by default).

Measured on the packaged MiniLM (batch 32, Rotten Tomatoes rows, bf16 autocast on an AMD EPYC with
AVX-512 BF16; benchmarks/profile_training.py, docs/benchmarks.md), three things outside the matrix
products took most of a CPU training step, and each has an exact replacement:

- **Dropout masks.** `torch.bernoulli_` draws one float per element. `keep_mask` draws 64 bits and
  reads four 16-bit lanes from them, each kept when at or above p * 65536 (p rounded to 1/65536):
  the same Bernoulli(1 - p) mask with the same 1 / (1 - p) scaling, from torch's seeded generator
  (runs repeat, and resume exactly), about a fifth of the time. `FastDropout` keeps a one-byte mask
  for the backward pass.
- **Attention with dropout.** With `dropout_p > 0`, `scaled_dot_product_attention` leaves its
  fused CPU kernel for a slow general path (and its bf16 backward is slow even without dropout).
  `cpu_attention` computes softmax(q k^T * scale + mask) in float32, drops with `keep_mask` and
  multiplies by v: the formula of transformers' eager attention, 2-2.5x faster forward and
  backward. It is registered with transformers' `AttentionInterface` and used only while a model
  trains on a CPU with attention dropout; evaluation, prediction and export run sdpa as before.
- **The dense embedding gradient.** Every step allocated and zero-filled a vocabulary x hidden
  gradient (30,522 x 384 floats, 47 MB) to add about a thousand token rows into it; on this project's
  virtual machines the fresh pages cost more than the arithmetic (46 ms of a 250 ms step).
  `GradBufferEmbedding` keeps one gradient buffer, clears it in place at each step (pages already
  mapped: a few ms) and adds the rows a batch uses. AdamW, clipping and weight decay see the same
  dense gradient. One process only: under DDP the gradient must flow through autograd to be all-reduced.

- **Gradient clipping.** `clip_grad_norm_` takes the same L2 norm from one dot product per gradient and
  scales the gradients only when the norm is above the limit (about 5 ms a step against 18).

- **The last layer of a first-token classifier.** A head on the first token (BERT's pooler, RoBERTa's,
  ELECTRA's and DistilBERT's classification heads) reads one position of the last encoder layer, yet the layer
  computes every position. `first_token_last_layer` gives a BERT-family last layer (BertLayer, RobertaLayer,
  ..., DistilBERT's TransformerBlock) a forward
  that, in the classifier's own training forward, computes the keys and values from every token and the
  query, attention output, feed-forward block and layer norms for position 0 alone: about 10/12 of that
  layer's matrix products saved (14% of MiniLM-L6's, 7% of BERT-base's), position 0's formula unchanged. It is
  kept only when a padded probe batch gives the same logits with and without it (so a mean-pooled head keeps
  the whole layer), and only while the classifier's forward runs without hidden states or attentions asked
  for; evaluation, the encoder called alone and gradient checkpointing use the whole layer.

`speed_up` applies the dropout, attention, embedding and last-layer paths where they fit (CPU device; the
buffer needs a trainable untied input embedding and one process), and the loop clips with
`clip_grad_norm_` on a CPU in one process; `train.fast_cpu_ops: false`
trains with the plain modules and torch's clipping. Saved models are unchanged:
the modules keep their classes' parameters and names (the swap is of Python classes only).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

ATTENTION = "tunesmith_cpu"


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool Bernoulli(1 - p) keep mask from 16-bit lanes of 64-bit draws (torch's seeded CPU generator)."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    return bits.view(torch.int16)[:n].view(shape) >= -32768 + round(p * 65536)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x * ctx.scale, 0.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0).to(grad.dtype), None


class FastDropout(nn.Dropout):
    """`nn.Dropout` with `keep_mask` on a CPU (elsewhere, and in eval mode, exactly nn.Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return _Dropout.apply(x, self.p)


def cpu_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention contract (q, k, v as batch x heads x length x dim; returns batch x length x
    heads x dim). With dropout on a CPU in bf16/fp16 (autocast): eager attention's formula with a float32 softmax
    and `keep_mask`; otherwise transformers' sdpa, unchanged (in float32 sdpa's own dropout path is as fast)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (dropout == 0 or query.device.type != "cpu" or query.dtype == torch.float32 or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or groups > 1 or (is_causal and attention_mask is None)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, torch.finfo(torch.float32).min) if attention_mask.dtype == torch.bool
                  else scores + attention_mask.float())
    probs = torch.softmax(scores, dim=-1)
    probs = _Dropout.apply(probs, dropout).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, cpu_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the same masks as sdpa


class _Lookup(torch.autograd.Function):
    """An embedding lookup whose weight gradient is added into the module's buffer, not allocated per step."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, module: "GradBufferEmbedding") -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(ids)
        return nn.functional.embedding(ids, weight, module.padding_idx, module.max_norm, module.norm_type,
                                       module.scale_grad_by_freq, module.sparse)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        ctx.module.accumulate(ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return None, None, None


class GradBufferEmbedding(nn.Embedding):
    """An `nn.Embedding` (same weight, same forward) whose dense gradient lives in one kept buffer: the
    first backward of a step clears it in place (the optimizer's zero_grad(set_to_none=True) only drops
    the reference) and every backward adds the rows its batch used."""

    _buffer: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.weight.requires_grad and torch.is_grad_enabled()) or self.max_norm is not None \
                or self.scale_grad_by_freq or self.sparse:
            return super().forward(ids)
        return _Lookup.apply(ids, self.weight, self)

    @torch.no_grad()
    def accumulate(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        w = self.weight
        if self.padding_idx is not None:  # the padding row gets no gradient (as in nn.Embedding)
            keep = ids != self.padding_idx
            ids, grad = ids[keep], grad[keep]
        if self._buffer is None or self._buffer.shape != w.shape or self._buffer.dtype != w.dtype:
            self._buffer = torch.empty_like(w)
        if w.grad is None:  # a new step: lend the buffer, cleared, as the gradient
            # all of it: clipping, L2-SP and a NaN step's clip coefficient write to every row, not only the batch's
            w.grad = self._buffer.zero_()
        w.grad.index_add_(0, ids, grad.to(w.grad.dtype))


class _FirstTokenLayer:
    """Mixed into the class of a classifier's last encoder layer: while `_first_token` is set (the classifier's
    own forward, training), `_short` computes only position 0 past the keys and values. Its query, attention
    output, feed-forward block and layer norms run on one row per sequence; the keys and values still come
    from every token. Position 0's output is the same formula; the other positions, which a head on the first
    token never reads, are not computed."""

    _first_token = False
    _short: Any = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        if not (self._first_token and self.training):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        return type(self)._short(self, hidden_states, attention_mask)


def _attend_first(a: nn.Module, q: nn.Module, k: nn.Module, v: nn.Module, hidden: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of position 0 over every position (transformers' attention interface, the model's own
    implementation): (batch, 1, heads x dim), and position 0's input."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    b, n, _ = hidden.shape
    first = hidden[:, :1]
    heads = a.attention_head_size
    query = q(first).view(b, 1, -1, heads).transpose(1, 2)
    key = k(hidden).view(b, n, -1, heads).transpose(1, 2)
    value = v(hidden).view(b, n, -1, heads).transpose(1, 2)
    if mask is not None and mask.ndim == 4 and mask.shape[-2] > 1:
        mask = mask[:, :, :1]  # the query row of position 0
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(a.config._attn_implementation, eager_attention_forward)
    out, _ = attend(a, query, key, value, mask, dropout=a.dropout.p if a.training else 0.0, scaling=a.scaling)
    return out.reshape(b, 1, -1).contiguous(), first


def _bert_first(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """BertLayer's formula (RoBERTa, XLM-R, ELECTRA, CamemBERT: the same layer) for position 0."""
    a = layer.attention.self
    out, first = _attend_first(a, a.query, a.key, a.value, hidden, mask)
    x = layer.attention.output(out, first)
    return layer.output(layer.intermediate(x), x)


def _distilbert_first(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """DistilBERT's TransformerBlock formula for position 0."""
    a = layer.attention
    out, first = _attend_first(a, a.q_lin, a.k_lin, a.v_lin, hidden, mask)
    x = layer.sa_layer_norm(a.out_lin(out) + first)
    return layer.output_layer_norm(layer.ffn(x) + x)


def _is_bert_layer(m: nn.Module) -> bool:
    return (_attention(getattr(getattr(m, "attention", None), "self", None), "query", "key", "value")
            and _modules(m, "intermediate", "output")
            and not getattr(m, "is_decoder", False) and not getattr(m, "chunk_size_feed_forward", 0))


def _is_distilbert_block(m: nn.Module) -> bool:
    return (_attention(getattr(m, "attention", None), "q_lin", "k_lin", "v_lin", "out_lin")
            and _modules(m, "sa_layer_norm", "ffn", "output_layer_norm") and not getattr(m.ffn, "chunk_size_feed_forward", 0))


def _attention(a: Any, *projections: str) -> bool:
    """Self-attention as `_attend_first` reads it: its projections, dropout, head size and scaling."""
    return _modules(a, *projections, "dropout") and hasattr(a, "attention_head_size") and hasattr(a, "scaling")


def _modules(m: Any, *names: str) -> bool:
    return m is not None and all(isinstance(getattr(m, n, None), nn.Module) for n in names)


# encoder layer families whose last layer can be computed for position 0 alone: (is it one, its short forward)
_FAMILIES = ((_is_bert_layer, _bert_first), (_is_distilbert_block, _distilbert_first))
_FIRST_TOKEN_CLASSES: dict[type, type] = {}


def _encoder_layers(model: nn.Module) -> list[tuple[nn.ModuleList, Any]]:
    """The module lists of encoder layers of a known family (not recomputed by gradient checkpointing), each with
    its family's short forward."""
    found = []
    for ml in model.modules():
        if isinstance(ml, nn.ModuleList) and len(ml):
            found += [(ml, short) for is_family, short in _FAMILIES
                      if all(is_family(m) and not getattr(m, "gradient_checkpointing", False) for m in ml)]
    return found


def first_token_last_layer(model: nn.Module) -> bool:
    """Make the last encoder layer compute only position 0 in the classifier's training forward, when the
    model's logits read only that position: checked on a padded probe batch (logits equal with and without
    it, in evaluation mode) before it is kept. Returns whether it was."""
    lists = _encoder_layers(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if len(lists) != 1 or not isinstance(emb, nn.Embedding):
        return False
    layers, short = lists[0]
    layer = layers[-1]
    for h in layer.__dict__.pop("_first_token_hooks", ()):  # a later stage (LoRA wraps the model): hooks anew
        h.remove()
    base = type(layer).__mro__[2] if isinstance(layer, _FirstTokenLayer) else type(layer)
    if base not in _FIRST_TOKEN_CLASSES:
        _FIRST_TOKEN_CLASSES[base] = type(base.__name__, (_FirstTokenLayer, base),
                                          {"__module__": base.__module__, "_short": staticmethod(short)})
    layer.__class__ = _FIRST_TOKEN_CLASSES[base]
    try:
        ok = _first_token_holds(model, layer, emb)
    except Exception:  # any model this does not fit: the plain layer
        ok = False
    if not ok:
        layer.__class__ = base
        return False
    name = next(n for n, m in model.named_modules() if m is layer)
    # hooks that look the layer up by name in the module they run on: a deep copy of the model keeps working
    layer._first_token_hooks = (model.register_forward_pre_hook(functools.partial(_first_token_on, name), with_kwargs=True),
                                model.register_forward_hook(functools.partial(_first_token_off, name), always_call=True))
    return True


def _first_token_on(name: str, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before the classifier's forward: the short path, unless hidden states or attentions are asked for."""
    asked = any(kwargs.get(o) is not None and kwargs.get(o) is not False
                for o in ("output_hidden_states", "output_attentions", "inputs_embeds"))
    model.get_submodule(name)._first_token = not asked and not args


def _first_token_off(name: str, model: nn.Module, *_: Any) -> None:
    model.get_submodule(name)._first_token = False


@torch.no_grad()
def _first_token_holds(model: nn.Module, layer: nn.Module, emb: nn.Embedding) -> bool:
    """The same logits, whole layer and short path, on a padded batch in evaluation mode (no dropout)."""
    gen = torch.Generator().manual_seed(0)
    device = emb.weight.device
    ids = torch.randint(min(emb.num_embeddings, 1000), (3, 7), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    modes = [(m, m.training) for m in model.modules()]  # put back exactly as they were
    model.eval()
    layer._first_token = False
    try:
        plain = model(input_ids=ids, attention_mask=mask).logits.float()
        layer._first_token, layer.training = True, True  # the short path; its submodules stay in eval (no dropout)
        short = model(input_ids=ids, attention_mask=mask).logits.float()
    finally:
        layer._first_token = False
        for m, training in modes:
            m.training = training
    return plain.shape == short.shape and bool(torch.allclose(plain, short, rtol=1e-4, atol=1e-5))


def speed_up(model: nn.Module, device: torch.device, processes: int) -> list[str]:
    """Swap in the fast CPU paths that fit this model; returns what was changed, for the console."""
    if device.type != "cpu":
        return []
    done = []
    drops = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0 and not m.inplace]
    for m in drops:
        m.__class__ = FastDropout
    if drops:
        done.append(f"{len(drops)} dropout layers")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa" and _attention_dropout(config) > 0:
        _register_attention()
        config._attn_implementation = ATTENTION
        done.append("attention with dropout")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (processes == 1 and type(emb) is nn.Embedding and emb.weight.requires_grad
            and (out is None or out.weight is not emb.weight)):
        emb.__class__ = GradBufferEmbedding
        done.append("embedding gradient buffer")
    if first_token_last_layer(model):
        done.append("last layer on the first token")
    return done


def _attention_dropout(config: Any) -> float:
    for name in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"):
        v = getattr(config, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


@torch.no_grad()
def clip_grad_norm_(params: Any, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (L2) for one CPU process: the same total norm from one dot product per
    gradient (torch's per-tensor `vector_norm` takes twice as long on a CPU), and the gradients scaled only
    where the coefficient is below 1 (torch multiplies every gradient by a clamped 1.0 each step); a
    non-finite norm still scales them, as torch does, so a NaN step stays NaN for the loop to skip."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    flat = [g.reshape(-1) if g.dtype in (torch.float32, torch.float64) else g.reshape(-1).float() for g in grads]
    total = torch.stack([torch.dot(f, f).float() for f in flat]).sum().sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if not coef >= 1.0:  # below 1, or NaN
        torch._foreach_mul_(grads, min(coef, 1.0) if math.isfinite(coef) else coef)
    return total


def release_buffers(model: nn.Module) -> None:
    """Drop what `speed_up` keeps between steps (the embedding-gradient buffer): training is over."""
    for m in model.modules():
        if type(m) is GradBufferEmbedding:
            m._buffer = None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's malloc_trim; elsewhere nothing):
    memory freed after training would otherwise stay in the process's resident set."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS), or no C library found: nothing to do
        return
    trim(0)
