"""Chat data in the formats users bring: ShareGPT, TRL's conversational prompt/completion, OpenAI
rows with tools. Each must give exactly the tokens and loss mask of the same conversation written
as OpenAI messages; tool calls are trained, tool results are not; a template that cannot render
tools is refused by file and line."""

from __future__ import annotations

import json

import pytest

from conftest import CHATML, write_jsonl
from test_causal_lm import CONVO, _task
from tunesmith.data.chat import IGNORE, tokenize_chat

# A ChatML template with tools, in the shape of Qwen2.5's: specs in the system turn, calls as JSON
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}{{ '<|im_start|>assistant\\n' }}"
    "{%- for c in m.tool_calls %}{{ '<tool_call>' }}{{ c.function | tojson }}{{ '</tool_call>' }}{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
MESSAGES = CONVO
SHAREGPT = {"system": CONVO[0]["content"], "conversations": [
    {"from": "human", "value": "my printer is offline"}, {"from": "gpt", "value": "turn the printer off and on again"},
    {"from": "human", "value": "the wifi keeps dropping"}, {"from": "gpt", "value": "move closer to the router"}]}
# TRL conversational: the first exchange is context, only the completion is trained
CONVERSATIONAL = {"prompt": MESSAGES[:4], "completion": MESSAGES[4:]}
TOOLS = [{"type": "function", "function": {"name": "reset_router", "description": "restart the router",
                                           "parameters": {"type": "object", "properties": {"room": {"type": "string"}}}}}]
WITH_TOOLS = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "the wifi keeps dropping"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "reset_router", "arguments": {"room": "office"}}}]},
    {"role": "tool", "content": "router restarted"},
    {"role": "assistant", "content": "done: the router restarted"}]}


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _encoded_train(make_lm_config, tmp_path, rows, name, **sections):
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(path, rows)
    task = _task(make_lm_config(data={"train": str(path), "validation": str(path), "test": str(path)},
                                lm={"packing": False, **sections.pop("lm", {})}, **sections))
    rep = task.validate(task.tokenizer)
    assert rep.ok, rep.errors
    return task.encode(task.load_data().train)


def test_sharegpt_and_conversational_give_the_tokens_of_the_same_messages(make_lm_config, tmp_path, tok):
    ref = _encoded_train(make_lm_config, tmp_path, [{"messages": MESSAGES}], "openai")
    share = _encoded_train(make_lm_config, tmp_path, [SHAREGPT], "sharegpt")
    assert share.input_ids == ref.input_ids and share.targets == ref.targets
    conv = _encoded_train(make_lm_config, tmp_path, [CONVERSATIONAL], "conversational")
    assert conv.input_ids == ref.input_ids
    # the completion alone is trained: the prompt's assistant turn is context
    weighted = [dict(m) for m in MESSAGES]
    weighted[2]["weight"] = 0
    alone = tokenize_chat(tok, CHATML, weighted, "assistant")
    want = [i if t else IGNORE for i, t in zip(alone.ids, alone.trained)]
    assert [x for x in conv.targets[0] if x != IGNORE] == [x for x in want[1:] if x != IGNORE]
    assert sum(x != IGNORE for x in conv.targets[0]) < sum(x != IGNORE for x in ref.targets[0])


def test_tool_calls_are_trained_and_tool_results_are_not(tok):
    t = tokenize_chat(tok, TOOLS_TEMPLATE, WITH_TOOLS["messages"], "assistant", tools=TOOLS)
    text = tok.decode(t.ids)
    assert '"name": "reset_router"' in text.split("<|im_start|>user")[0]  # the spec, rendered in the system turn
    runs, start = [], None
    for i, f in enumerate(t.trained + [False]):
        if f and start is None:
            start = i
        if not f and start is not None:
            runs.append(tok.decode(t.ids[start:i]))
            start = None
    assert len(runs) == 2, runs
    call = json.loads(runs[0].removeprefix("<tool_call>").split("</tool_call>")[0])
    assert call == {"name": "reset_router", "arguments": {"room": "office"}} and runs[0].endswith("<|im_end|>")
    assert runs[1].strip() == "done: the router restarted<|im_end|>"
    assert all("router restarted" not in r.replace("done: the router restarted", "") for r in runs)  # the result is context


def test_tools_with_a_template_that_cannot_render_them_are_refused_by_line(make_lm_config, tmp_path, capsys):
    import yaml

    from tunesmith.cli import main

    path = tmp_path / "tools.jsonl"
    write_jsonl(path, [{"messages": MESSAGES[1:3]}, WITH_TOOLS])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_lm_config(data={"train": str(path), "validation": str(path), "test": str(path)})))
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:2: this conversation has tools or tool calls, but the chat template never mentions" in err[0]
    assert main(["validate", str(cfg), f"lm.chat_template={json.dumps(TOOLS_TEMPLATE)}"]) == 0, capsys.readouterr().err


def test_a_sharegpt_file_trains_end_to_end(make_lm_config, tmp_path):
    import tunesmith

    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for q, a in [("how do I reset my password", "use the reset link on the login page"),
                         ("my printer is offline", "turn the printer off and on again"), ("hello there", "hi, how can I help")]]
    write_jsonl(tmp_path / "share.jsonl", rows * 4)
    res = tunesmith.train(make_lm_config(data={"train": str(tmp_path / "share.jsonl"), "validation": None, "test": None},
                                         optim={"epochs": 2}), quiet=True)
    assert res.eval["after"]["loss"] < res.eval["before"]["loss"]
    assert res.eval["data_report"]["files"][0]["rows"] > 0


def test_show_tokens_marks_what_the_loss_covers_and_the_packed_rows(make_lm_config, make_config, tmp_path, capsys, tok):
    import yaml

    from tunesmith.cli import main

    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": MESSAGES}] * 3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_lm_config(data={"train": str(path), "validation": str(path), "test": str(path)},
                                                 train={"max_length": 140})))
    assert main(["validate", str(cfg), "--show-tokens", "1"]) == 0
    out = capsys.readouterr().out
    block = out.split(f"{path}:1: ")[1]
    assert block.startswith("70 tokens, ") and "; [brackets]: the loss covers it" in block.split("\n")[0]
    line = block.split("\n")[1]
    # piped: the trained tokens are bracketed, and they are exactly the two answers and their end tokens
    bracketed = [p.split("(")[0] for p in line.split(" ") if p.startswith("[")]
    t = tokenize_chat(tok, CHATML, MESSAGES, "assistant")
    assert len(bracketed) == sum(t.trained) and sum(1 for b in bracketed if b == "[<|im_end|>") == 2
    assert "rows: 2 of up to 140 tokens from 3 example(s) (packed)" in out and "row 0: 140 tokens = 70 + 70 (2 example(s)" in out

    assert main(["validate", str(cfg), "--show-tokens", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["show_tokens"]
    assert [tok_["trained"] for tok_ in shown["examples"][0]["tokens"]] == t.trained
    assert [tok_["id"] for tok_ in shown["examples"][0]["tokens"]] == t.ids

    # a classifier: the tokens after truncation, no token trained
    tcfg = tmp_path / "t.yaml"
    tcfg.write_text(yaml.safe_dump(make_config(train={"max_length": 6})))
    assert main(["validate", str(tcfg), "--show-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("tokens (truncated)") >= 1 and "[CLS](2)" in out and "[" not in out.split("[CLS](2)")[1].split("[SEP]")[0]
