"""The fast CPU paths (tunesmith.models.fastops) against the plain modules they replace: the same
distribution, the same gradients, the same losses; and training with them on and off."""

import copy

import pytest
import torch
from torch import nn

import tunesmith
from tunesmith.models import fastops
from tunesmith.models.fastops import FastDropout, GradBufferEmbedding, keep_mask, speed_up


def tiny_bert(dropout=0.1, attention_dropout=0.1, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout,
                     num_labels=3, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg)


def batch(seed=0, n=6, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # ragged rows, padded with id 0
        cut = int(torch.randint(4, length + 1, (1,), generator=g))
        ids[i, cut:], mask[i, cut:] = 0, 0
    return ids, mask, torch.randint(0, 3, (n,), generator=g)


def test_keep_mask_is_bernoulli_and_seeded():
    torch.manual_seed(3)
    m = keep_mask((1000, 1000), 0.1)
    assert m.dtype == torch.bool and m.shape == (1000, 1000)
    assert abs(m.float().mean().item() - 0.9) < 0.002
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000, 1000), 0.1), m)  # torch's generator: runs repeat, resume continues
    assert abs(keep_mask((4001,), 0.5).float().mean().item() - 0.5) < 0.03  # odd sizes: lanes cut to n


def test_fast_dropout_forward_backward_match_its_mask():
    d = nn.Dropout(0.25)
    d.__class__ = FastDropout
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(0)
    y = d(x)
    torch.manual_seed(0)
    keep = keep_mask(x.shape, 0.25)
    assert torch.allclose(y, torch.where(keep, x / 0.75, 0.0))
    y.sum().backward()
    assert torch.allclose(x.grad, keep / 0.75)
    d.eval()
    assert torch.equal(d(x), x)  # evaluation: nn.Dropout's identity


def test_attention_path_matches_eager_formula_with_the_same_mask():
    """bf16 q, k, v with a padding mask: the fast path is softmax(q k^T s + mask) dropped by keep_mask, times v."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_bert()
    module = model.bert.encoder.layer[0].attention.self
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 10, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(3, 1, 10, 10, dtype=torch.bool)
    mask[0, ..., 7:] = False
    torch.manual_seed(5)
    out, _ = fastops.cpu_attention(module, q, k, v, mask, dropout=0.1, scaling=0.25)
    torch.manual_seed(5)
    keep = keep_mask((3, 2, 10, 10), 0.1)
    scores = (q.float() @ k.float().transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    ref = (torch.where(keep, scores.softmax(-1) / 0.9, 0.0) @ v.float()).transpose(1, 2)
    assert out.shape == (3, 10, 2, 16) and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.03  # bf16 rounding of the products
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (q, k, v))
    # no dropout (evaluation), or float32: transformers' sdpa itself
    for args in ((q.detach(), k.detach(), v.detach(), 0.0), (q.detach().float(), k.detach().float(), v.detach().float(), 0.1)):
        *qkv, p = args
        torch.manual_seed(2)
        a, _ = fastops.cpu_attention(module, *qkv, mask, dropout=p, scaling=0.25)
        torch.manual_seed(2)
        b, _ = sdpa_attention_forward(module, *qkv, mask, dropout=p, scaling=0.25)
        assert torch.equal(a, b)


def _train(model, steps, accumulate=1, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    for s in range(steps):
        for m in range(accumulate):
            ids, mask, y = batch(seed=10 * s + m)
            loss = nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
            (loss / accumulate).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def test_embedding_gradient_buffer_gives_the_plain_losses_and_weights():
    """Dropout off, so both runs compute the same function: 6 steps of 2 accumulated micro-batches each."""
    plain = tiny_bert(dropout=0.0, attention_dropout=0.0)
    fast = copy.deepcopy(plain)
    assert speed_up(fast, torch.device("cpu"), 1) == ["embedding gradient buffer", "last layer on the first token"]
    assert type(fast.bert.embeddings.word_embeddings) is GradBufferEmbedding
    a, b = _train(plain, 6, accumulate=2), _train(fast, 6, accumulate=2)
    assert a == pytest.approx(b, abs=1e-5)
    assert a[-1] < a[0]
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        if not n.endswith("key.bias"):  # softmax ignores it: its gradient is rounding noise that AdamW scales up
            assert torch.allclose(p, q, atol=1e-5), n
    # the buffer holds only this step's rows: each row's gradient equals the plain one
    for model in (plain, fast):
        ids, mask, y = batch(seed=99)
        nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).backward()
    g_plain, g_fast = plain.bert.embeddings.word_embeddings.weight.grad, fast.bert.embeddings.word_embeddings.weight.grad
    assert torch.allclose(g_plain, g_fast, atol=1e-6)
    assert g_fast[0].abs().sum() == 0  # the padding row gets no gradient
    unused = sorted(set(range(60)) - set(batch(seed=99)[0].flatten().tolist()))
    assert unused and g_fast[unused].abs().sum() == 0  # rows written by earlier steps were cleared


def test_embedding_gradient_buffer_recovers_from_a_nan_step():
    """Clipping a NaN gradient writes NaN into every row of the buffer: the next step must not see it."""
    model = tiny_bert(dropout=0.0, attention_dropout=0.0)
    speed_up(model, torch.device("cpu"), 1)
    w = model.bert.embeddings.word_embeddings.weight
    ids, mask, y = batch()
    (nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y) * float("nan")).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # NaN norm: every gradient element becomes NaN
    assert not torch.isfinite(w.grad).any()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_first_token_last_layer_gives_the_plain_losses_only_where_the_head_reads_one_token():
    """A CLS classifier's last layer computes position 0 alone in its training forward: the same losses and
    weights as the plain layer (dropout off), every other call (eval, the encoder called alone, hidden
    states asked for, a forward that raised) the whole sequence; a mean-pooled head keeps the plain layer."""
    from tunesmith.models.heads import use_mean_pooling

    plain = tiny_bert(dropout=0.0, attention_dropout=0.0)
    fast = copy.deepcopy(plain)
    assert fastops.first_token_last_layer(fast)
    last = fast.bert.encoder.layer[-1]
    assert isinstance(last, fastops._FirstTokenLayer) and not isinstance(fast.bert.encoder.layer[0], fastops._FirstTokenLayer)
    widths: list[int] = []
    last.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    a, b = _train(plain, 6, accumulate=2), _train(fast, 6, accumulate=2)
    assert a == pytest.approx(b, abs=1e-5) and a[-1] < a[0]
    assert set(widths) == {1}  # every training forward took the short path
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        if not n.endswith("key.bias"):  # softmax ignores it: its gradient is rounding noise that AdamW scales up
            assert torch.allclose(p, q, atol=1e-5), n
    ids, mask, _ = batch()
    widths.clear()
    fast.train()
    fast.bert(input_ids=ids, attention_mask=mask)  # the encoder alone (contrastive, mean pooling): every position
    fast(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with pytest.raises(IndexError):
        fast(input_ids=ids + 1000, attention_mask=mask)  # a forward that fails leaves the short path off
    fast.bert(input_ids=ids, attention_mask=mask)
    fast.eval()
    plain.load_state_dict(fast.state_dict())  # the same weights: evaluation is the plain layer's, bit for bit
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids, attention_mask=mask).logits, plain.eval()(input_ids=ids, attention_mask=mask).logits)
    assert widths == [12, 12, 12, 12]
    twin = copy.deepcopy(fast).train()  # the hooks find the copy's own layer (the width hook is copied with it)
    widths.clear()
    twin(input_ids=ids, attention_mask=mask)
    assert widths == [1]
    fast.train()
    fast.classifier.eval()  # modes are put back as they were, module by module, after the probe batch
    assert fastops.first_token_last_layer(fast)  # a later stage: checked and hooked again, not stacked
    assert fast.bert.training and last.training and not fast.classifier.training
    assert len(fast._forward_pre_hooks) == 1 and type(last).__mro__[2] is type(fast.bert.encoder.layer[0])
    pooled = tiny_bert()
    use_mean_pooling(pooled)  # the masked mean of every position: the layer must stay whole
    assert not fastops.first_token_last_layer(pooled)
    assert not isinstance(pooled.bert.encoder.layer[-1], fastops._FirstTokenLayer)
    assert "last layer on the first token" not in speed_up(pooled, torch.device("cpu"), 1)


def _tiny_classifier(family):
    import transformers as tf

    torch.manual_seed(0)
    off = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64, num_labels=3, **off)
    if family == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=1, **kw)), "roberta.encoder.layer.1"
    if family == "electra":
        return tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=32, **kw)), "electra.encoder.layer.1"
    cfg = tf.DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
                              num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    return tf.DistilBertForSequenceClassification(cfg), "distilbert.transformer.layer.1"


@pytest.mark.parametrize("family", ["roberta", "electra", "distilbert"])
def test_first_token_last_layer_in_other_encoder_families(family):
    """RoBERTa's and ELECTRA's layers are BERT's; DistilBERT's block has its own names: each short path gives the
    plain layer's losses (dropout off) and computes one position in training."""
    plain, name = _tiny_classifier(family)
    fast = copy.deepcopy(plain)
    assert fastops.first_token_last_layer(fast)
    widths: list[int] = []
    fast.get_submodule(name).register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    ids, mask, y = batch()
    ids = ids.clamp(min=2) * mask + mask.eq(0) * (1 if family == "roberta" else 0)  # padding = the model's pad id
    losses = []
    for model in (plain, fast):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = []
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[1][-1] < losses[1][0]
    assert widths == [1, 1, 1, 1]


def test_speed_up_leaves_evaluation_and_saved_models_unchanged(tmp_path):
    plain = tiny_bert()
    fast = copy.deepcopy(plain)
    done = speed_up(fast, torch.device("cpu"), 1)
    assert done == ["8 dropout layers", "attention with dropout", "embedding gradient buffer", "last layer on the first token"]
    plain.eval(), fast.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, fast(input_ids=ids, attention_mask=mask).logits)
    fast.save_pretrained(tmp_path)
    assert "tunesmith" not in (tmp_path / "config.json").read_text()
    assert "embedding gradient buffer" not in speed_up(tiny_bert(), torch.device("cpu"), 2)  # DDP: no buffer
    assert speed_up(tiny_bert(), torch.device("meta"), 1) == []


def test_bf16_training_with_fast_paths_learns_like_the_plain_modules():
    """With dropout on, the masks differ (another random stream), so compare what training reaches."""
    def run(fast):
        model = tiny_bert(seed=1)
        if fast:
            speed_up(model, torch.device("cpu"), 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = _train(model, 30, lr=3e-3)
        return sum(losses[:5]) / 5, sum(losses[-5:]) / 5

    (plain_start, plain_end), (fast_start, fast_end) = run(False), run(True)
    assert plain_end < plain_start and fast_end < fast_start
    assert abs(fast_end - plain_end) < 0.25


def test_training_config_switch(tiny_model_dir, data_dir, tmp_path):
    """train.fast_cpu_ops: on by default (same losses as off on the dropout-free tiny model), off on request."""
    def run(fast, name):
        cfg = {"task": "text-classification", "model": str(tiny_model_dir), "output_dir": str(tmp_path / name),
               "data": {"train": str(data_dir / "train.csv"), "validation": str(data_dir / "validation.csv"),
                        "test": str(data_dir / "test.csv")},
               # a gradient-norm limit that clips every step: the fast clipping path scales the gradients
               "strategy": {"name": "full", "lp_ft": False}, "optim": {"lr": 1e-3, "epochs": 2, "min_steps": 0, "max_grad_norm": 0.05},
               "train": {"fast_cpu_ops": fast, "log_every": 1, "precision": "fp32"}, "eval": {"report": False}}
        res = tunesmith.train(cfg, quiet=True)
        lines = [l for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
        return res, [__import__("json").loads(l)["loss"] for l in lines]

    on, on_losses = run(True, "on")
    off, off_losses = run(False, "off")
    assert len(on_losses) > 4 and on_losses == pytest.approx(off_losses, abs=1e-5)
    # training over, the kept gradient buffer was let go before the final evaluation (and so were the gradients)
    buffered = [m for m in on.model.modules() if type(m) is GradBufferEmbedding]
    assert buffered and all(m._buffer is None for m in buffered)
    assert all(p.grad is None for p in on.model.parameters())
    assert on.eval["after"]["accuracy"] == off.eval["after"]["accuracy"]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, float("nan")], ids=["below", "near", "above", "nan"])
def test_clipping_gives_torchs_norm_and_gradients(scale):
    """fastops.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_: the same total norm and the same
    gradients after clipping, whether the limit bites, does not, or the gradients hold a NaN."""
    g = torch.Generator().manual_seed(0)
    shapes = [(60, 32), (32,), (64, 32), (3, 32), (1,)]
    grads = [torch.randn(s, generator=g) * scale for s in shapes]
    if scale != scale:
        grads = [torch.randn(s, generator=g) for s in shapes]
        grads[2][5, 7] = float("nan")
    plain, fast = ([nn.Parameter(torch.zeros(s)) for s in shapes] for _ in range(2))
    for a, b, gr in zip(plain, fast, grads):
        a.grad, b.grad = gr.clone(), gr.clone()
    fast.append(nn.Parameter(torch.zeros(2)))  # a parameter without a gradient is left out, as torch does
    n_plain = torch.nn.utils.clip_grad_norm_(plain, 1.0)
    n_fast = fastops.clip_grad_norm_(fast, 1.0)
    torch.testing.assert_close(n_fast, n_plain, rtol=1e-6, atol=0, equal_nan=True)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-12, equal_nan=True)
    if scale == 1e-3:  # not clipped: the gradients untouched, bit for bit
        assert all(torch.equal(b.grad, gr) for b, gr in zip(fast, grads))


def test_linear_weights_cast_gives_autocasts_outputs_bit_for_bit(tiny_llama_dir):
    """precision.linear_weights_cast (inference passes in bf16): the same logits as autocast's per-batch casts,
    LoRA included; every weight back in float32 afterwards, the same tensors; nothing cast while gradients are
    recorded; an output layer tied to the embedding left alone (casting it would change the embedding too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.precision import linear_weights_cast

    def logits(model, cast):
        with torch.no_grad(), linear_weights_cast(model, torch.bfloat16 if cast else None) as n:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(input_ids=ids, attention_mask=mask).logits.float(), n

    ids, mask, _ = batch()
    bert = tiny_bert().eval()
    bert.unused = nn.Linear(1, 3, bias=False)
    bert.unused.weight = nn.Parameter(torch.empty(0))  # an empty weight, as a ZeRO-3 partition holds: left alone, not counted
    lora = get_peft_model(tiny_bert(seed=1), LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():  # a LoRA update that is not zero
        for n_, p in lora.named_parameters():
            if "lora_B" in n_:
                p.normal_()
    lora.eval()
    # BERT: 6 linear layers a block, 2 blocks, the pooler and the classifier, each a weight and a bias; LoRA adds
    # A and B (no bias) on 2 modules a block, and a trainable copy of the classifier
    for model, linears in ((bert, 2 * (2 * 6 + 2)), (lora, 2 * (2 * 6 + 2) + 2 * 2 * 2 + 2)):
        before = {n_: (p, p.data_ptr(), p.clone()) for n_, p in model.named_parameters()}
        (plain, zero), (cast, n) = logits(model, False), logits(model, True)
        assert zero == 0 and n == linears and torch.equal(plain, cast)
        for n_, p in model.named_parameters():  # restored: the same parameter, storage and values, in float32
            assert p is before[n_][0] and p.dtype == torch.float32 and p.data_ptr() == before[n_][1] and torch.equal(p, before[n_][2])
    with linear_weights_cast(bert, torch.bfloat16) as n:  # gradients on: autocast must see the float32 weights
        assert n == 0 and bert.classifier.weight.dtype == torch.float32

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad(), linear_weights_cast(llama, torch.bfloat16) as n:
        assert llama.lm_head.weight.dtype == torch.float32 and llama.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert n == 2 * 7  # 7 linear layers a block (no biases), 2 blocks; not the tied output layer
    (plain, _), (cast, _) = logits(llama, False), logits(llama, True)
    assert torch.equal(plain, cast)
