"""causal-lm on a tiny Llama built in code: label masks, packing, training, export, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CHATML, make_chat_rows, write_jsonl
from tunesmith import train
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.chat import IGNORE, tokenize_chat
from tunesmith.registry import TASKS


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _task(cfg: dict):
    c = load_config(cfg)
    task = TASKS.get("causal-lm")(c)
    from tunesmith.models import resolve_model

    task.load_tokenizer(resolve_model(c.model))
    return task


CONVO = [
    {"role": "system", "content": "you are the support team"},
    {"role": "user", "content": "my printer is offline"},
    {"role": "assistant", "content": "turn the printer off and on again"},
    {"role": "user", "content": "the wifi keeps dropping"},
    {"role": "assistant", "content": "move closer to the router"},
]


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        if not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_label_mask_covers_exactly_the_assistant_turns_and_their_end_token(tok):
    t = tokenize_chat(tok, CHATML, CONVO, "assistant")
    assert t.ids == tok.apply_chat_template(CONVO, tokenize=True, return_dict=True)["input_ids"]  # one rendering
    end = tok.convert_tokens_to_ids("<|im_end|>")
    runs = _runs(t.trained)
    assert len(runs) == 2
    for (a, b), answer in zip(runs, ["turn the printer off and on again", "move closer to the router"]):
        # token by token: the trained run is exactly the answer's tokens plus <|im_end|>
        assert t.ids[a:b] == tok(answer, add_special_tokens=False)["input_ids"] + [end]
        assert tok.decode(t.ids[:a]).endswith("<|im_start|>assistant\n")  # right after the generation prompt
    # weight 0: that turn becomes context
    weighted = [dict(m) for m in CONVO]
    weighted[2]["weight"] = 0
    t0 = tokenize_chat(tok, CHATML, weighted, "assistant")
    assert _runs(t0.trained) == [runs[1]]
    # loss on every token
    assert all(tokenize_chat(tok, CHATML, CONVO, "all").trained)


def test_a_template_without_an_end_token_gets_eos_inserted(tok):
    no_eos = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    t = tokenize_chat(tok, no_eos, CONVO, "assistant")
    eos = tok.eos_token_id
    runs = _runs(t.trained)
    assert len(runs) == 2
    for (a, b), answer in zip(runs, ["turn the printer off and on again", "move closer to the router"]):
        assert t.ids[b - 1] == eos
        assert tok.decode(t.ids[a : b - 1]).strip() == answer
    assert t.ids.count(eos) == 2  # inserted after each assistant turn, nowhere else


def test_formats_prompt_completion_alpaca_and_text(make_lm_config, tmp_path, tok):
    d = tmp_path / "fmt"
    d.mkdir()
    write_jsonl(d / "pc.jsonl", [{"prompt": f"Q{i}: hello there\nA:", "completion": " hi, how can I help"} for i in range(6)])
    write_jsonl(d / "alpaca.jsonl", [{"instruction": f"answer {i}", "input": "hello there", "output": "hi, how can I help"}
                                     for i in range(6)])
    (d / "docs").mkdir()
    (d / "docs" / "a.txt").write_text(" ".join(["support team answers every ticket within a day"] * 30), encoding="utf-8")
    (d / "docs" / "b.txt").write_text("the quick brown fox jumps over the lazy dog", encoding="utf-8")

    task = _task(make_lm_config(data={"train": str(d / "pc.jsonl"), "validation": None, "test": None}, lm={"packing": False}))
    assert task.validate(task.tokenizer).ok
    data = task.load_data()
    assert (len(data.train), len(data.validation), len(data.test)) == (4, 1, 1)
    e = task.encode(data.train)
    completion = tok(" hi, how can I help", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for ids, tg in zip(e.input_ids, e.targets):
        assert [x for x in tg if x != IGNORE] == completion  # completion + EOS, no prompt token
        assert ids[-len(completion):] == completion

    task = _task(make_lm_config(data={"train": str(d / "alpaca.jsonl"), "validation": None, "test": None}))
    assert task.validate(task.tokenizer).ok
    ex = next(e for e in task.load_data().train.examples if e.where.endswith(":1"))
    assert ex.messages == [{"role": "user", "content": "answer 0\n\nhello there"},
                           {"role": "assistant", "content": "hi, how can I help"}]

    task = _task(make_lm_config(data={"train": str(d / "docs"), "validation": str(d / "docs" / "b.txt"),
                                      "test": str(d / "docs" / "b.txt")}, lm={"packing": False}, train={"max_length": 32}))
    rep = task.validate(task.tokenizer)
    assert rep.ok, rep.errors
    e = task.encode(task.load_data().train)
    doc_a = tok(" ".join(["support team answers every ticket within a day"] * 30))["input_ids"] + [tok.eos_token_id]
    # the long document is cut into consecutive 32-token chunks, nothing dropped; every token but a chunk's first is trained
    assert [t for r in e.input_ids[:-1] for t in r] == doc_a
    assert all(r[0] == IGNORE and IGNORE not in r[1:] for r in e.targets)


def _alone_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def test_packing_never_lets_an_example_attend_to_another(make_lm_config, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    task = _task(make_lm_config(train={"max_length": 96}))
    assert task.validate(task.tokenizer).ok
    data = task.load_data()
    enc = task.encode(data.train)
    assert max(len(r) for r in enc.input_ids) <= 96
    assert any(sum(1 for p in pos if p == 0) >= 3 for pos in enc.positions)  # rows do hold several examples
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    idx = list(range(min(4, len(enc))))
    batch = task.collate(enc, idx)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    compared = 0
    for row, i in enumerate(idx):
        starts = [k for k, p in enumerate(enc.positions[i]) if p == 0] + [len(enc.input_ids[i])]
        for a, b in zip(starts, starts[1:]):
            alone = _alone_logits(model, enc.input_ids[i][a:b])
            torch.testing.assert_close(packed[row, a:b], alone, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared >= 8
    # and the loss the task trains on equals the per-example losses, token-weighted
    loss = task.step(model, dict(batch))["loss"]
    total, n = 0.0, 0
    for i in idx:
        ids, tg = torch.tensor(enc.input_ids[i]), torch.tensor(enc.targets[i])
        starts = [k for k, p in enumerate(enc.positions[i]) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            lg = _alone_logits(model, ids[a:b].tolist())[:-1]
            y = tg[a + 1 : b]
            keep = y != IGNORE
            total += torch.nn.functional.cross_entropy(lg[keep], y[keep], reduction="sum").item()
            n += int(keep.sum())
    assert loss.item() == pytest.approx(total / n, rel=1e-4)


def test_overfit_reproduces_a_memorised_answer_and_stops(make_lm_config):
    from tunesmith.generate import ChatModel

    rows = make_chat_rows()
    questions = [r["messages"][0]["content"] for r in rows]
    res = train(make_lm_config(optim={"epochs": 40, "lr": 5e-3}, lm={"prompts": questions[:2], "max_new_tokens": 24}))
    hist = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in hist if h["type"] == "train"]
    assert losses[-1] < 0.1 * losses[0]
    model = ChatModel(res.run_dir)
    for r in rows[:3]:
        answer = model.generate(r["messages"][0]["content"], temperature=0, max_new_tokens=24)
        assert answer == r["messages"][1]["content"]
        assert model.stopped  # it ended with <|im_end|>, well before the 24-token limit
        assert model.last_output.shape[1] - model.last_prompt_tokens < 24
    samples = [json.loads(l) for l in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["tuned"] for s in samples] == [r["messages"][1]["content"] for r in rows[:2]]
    assert all(s["base"] != s["tuned"] for s in samples)
    assert "**base model**" in (res.run_dir / "samples.md").read_text()
    ev = res.eval
    assert ev["task"] == "causal-lm" and ev["before"]["perplexity"] > 10 * ev["after"]["perplexity"]
    assert ev["train"]["tokens_per_s"] > 0


def test_lora_merged_export_and_adapter_reload_to_identical_logits(make_lm_config, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = train(make_lm_config(strategy={"name": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}},
                               optim={"epochs": 4, "lr": 1e-2}))
    assert res.config.strategy.name == "lora"
    x = torch.tensor([[5, 17, 42, 99, 7, 3, 250]])
    with torch.no_grad():
        mem = res.model(input_ids=x).logits
        merged = AutoModelForCausalLM.from_pretrained(res.run_dir / "model")(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        untouched = base(input_ids=x).logits.clone()
        adapter = PeftModel.from_pretrained(base, res.run_dir / "model" / "adapter").eval()(input_ids=x).logits
    torch.testing.assert_close(merged, mem, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter, merged, atol=1e-4, rtol=1e-4)
    assert (merged - untouched).abs().max() > 1e-3  # the adapter did change the model
    assert AutoTokenizer.from_pretrained(res.run_dir / "model").chat_template == CHATML
    assert "lora adapters" in [g for g in res.eval["weights_moved"]] or res.eval["weights_moved"]


def test_freeze_trains_only_the_last_block(make_lm_config, tiny_llama_dir):
    from safetensors.torch import load_file

    res = train(make_lm_config(strategy={"name": "freeze", "train_last_n": 1}, optim={"epochs": 1}))
    before = load_file(tiny_llama_dir / "model.safetensors")
    after = load_file(res.run_dir / "model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.layers.1.") for k in changed)
    # the last block and what sits above it (the final norm); embeddings and block 0 untouched
    assert all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed)


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]', "not valid JSON"),
        ('{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]}', "unknown role"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "content is empty"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 2}]}', "weight"),
    ],
)
def test_bad_rows_are_named_by_file_and_line(make_lm_config, tmp_path, capsys, line, problem):
    import yaml

    rows = [json.dumps(r) for r in make_chat_rows()]
    train_file = tmp_path / "bad.jsonl"
    train_file.write_text("\n".join(rows[:3] + [line] + rows[3:]) + "\n", encoding="utf-8")
    cfg = make_lm_config(data={"train": str(train_file)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tunesmith: error:")
    assert f"{train_file}:4: " in err[0] and problem in err[0]
    assert not Path(cfg["output_dir"]).exists()  # nothing half-written


def test_too_long_is_an_error_by_line_or_counted_and_skipped(make_lm_config, tmp_path, capsys):
    import yaml

    rows = make_chat_rows() * 2
    long_answer = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    rows.insert(6, {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": long_answer}]})
    long_prompt = " ".join(["support team answers every ticket within a day"] * 20)
    rows.insert(8, {"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "hello there"}]})
    f = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = make_lm_config(data={"train": str(f)}, train={"max_length": 48})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{f}:7: " in err[0] and "lm.too_long=skip" in err[0]
    assert f"{f}:9" not in err[0]  # a long prompt is cut, not refused

    res = train(cfg | {"lm": {**cfg["lm"], "too_long": "skip"}, "optim": {**cfg["optim"], "epochs": 1}})
    rep = res.eval["data_report"]["files"][0]
    assert rep["bad_rows"] == 1 and rep["bad"][0]["where"] == f"{f}:7"
    assert res.eval["data"]["train"]["truncated"] == 1  # the long prompt, cut from the left


def test_validate_and_generate_cli(make_lm_config, tmp_path, capsys):
    import yaml

    cfg = make_lm_config(optim={"epochs": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(tmp_path / "c.yaml"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["files"][0]["rows"] == 40 and rep["files"][0]["tokens"]["max"] > 10
    run = train(cfg).run_dir
    capsys.readouterr()
    assert main(["generate", str(run), "hello", "there", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["predict", str(run), "hello"]) == 2
    assert "tunesmith generate" in capsys.readouterr().err
    from tunesmith.generate import ChatModel, chat_loop
    import io

    said = iter(["hello there", "/reset", "my printer is offline", "/exit"])
    out = io.StringIO()
    assert chat_loop(ChatModel(run), {"temperature": 0, "max_new_tokens": 4}, input_fn=lambda _: next(said), out=out) == 0
    assert out.getvalue().count("assistant> ") == 2 and "(conversation cleared)" in out.getvalue()


def test_config_defaults_and_refusals(make_lm_config):
    c = load_config({k: v for k, v in make_lm_config().items() if k not in ("strategy", "train")})
    assert c.strategy.name == "lora" and c.train.max_length == 512 and c.train.metric == "loss"
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="does not apply to task causal-lm"):
        load_config(make_lm_config(strategy={"name": "feature-extraction"}))
    with pytest.raises(UserError, match="train.metric"):
        load_config(make_lm_config(train={"metric": "accuracy"}))


def test_fused_lora_dropout_matches_dropout_then_linear():
    from tunesmith.models.fastops import keep_mask
    from tunesmith.strategies.lora import DropoutLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 8, bias=False)
    lin.__class__ = DropoutLinear
    lin.p = 0.25
    x = torch.randn(4, 64, 48, requires_grad=True)
    torch.manual_seed(7)
    y = lin(x)
    (y * torch.arange(8.0)).sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    torch.manual_seed(7)  # the same draw, by hand: dropout then linear, through autograd
    keep = keep_mask(x.shape, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    x2 = x.detach().clone().requires_grad_(True)
    w2 = lin.weight.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2 * keep / 0.75, w2)
    (y2 * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, x2.grad)
    torch.testing.assert_close(gw, w2.grad, rtol=1e-5, atol=1e-4)  # summation order differs
    lin.eval()
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight))  # no dropout in eval


def test_micro_batches_give_the_same_update(make_lm_config, tmp_path):
    a = train(make_lm_config(optim={"epochs": 2}, output_dir=str(tmp_path / "a"), lm={"packing": False, "samples": 0}))
    b = train(make_lm_config(optim={"epochs": 2}, output_dir=str(tmp_path / "b"), lm={"packing": False, "samples": 0},
                             train={"micro_batch_size": 1}))
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


def test_eval_cli_and_gradient_checkpointing(make_lm_config, lm_data_dir, tmp_path, capsys):
    plain = train(make_lm_config(strategy={"name": "lora", "lora": {"dropout": 0.0}}, optim={"epochs": 2},
                                 output_dir=str(tmp_path / "a"), lm={"samples": 0}))
    ckpt = train(make_lm_config(strategy={"name": "lora", "lora": {"dropout": 0.0}}, optim={"epochs": 2},
                                output_dir=str(tmp_path / "b"), lm={"samples": 0}, train={"gradient_checkpointing": True}))
    for (n, p), (_, q) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)  # recomputation changes memory, not the result
    capsys.readouterr()
    assert main(["eval", str(plain.run_dir), "--data", str(lm_data_dir / "test.jsonl"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["loss"] == pytest.approx(plain.eval["after"]["loss"], rel=1e-4) and m["tokens"] == 25
