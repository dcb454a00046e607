"""Bad input of every kind: one `tunesmith: error:` line naming the file, line or key; exit 2; no
traceback; no run directory left looking started; a finished run untouched.

Add a case by adding a row to CASES: an id, the command line, fragments the error line must hold,
and optionally files to write first (under {d}) or a config (written to {cfg}: the family's base
config with these sections merged in; None deletes a key). Place holders in argv, fragments and
file contents: {d} the case's own directory, {cfg} its config, {run}/{lmrun}/{imgrun} finished
text/causal-lm/image runs, {model}/{llama}/{timm} tiny model directories, {text}/{chat}/{images}
the good data the base configs read. Property-based cases (Hypothesis) follow the table.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import make_chat_rows, make_texts, write_csv, write_jsonl
from tunesmith.cli import main


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    base: str = "text"  # which base config {cfg} starts from: text | lm | image


def C(id, argv, expect, files=None, config=None, base="text"):
    return Case(id, argv.split() if isinstance(argv, str) else argv, expect, files or {}, config, base)


TRAIN = "train {cfg} --quiet"
ROWS = "".join(f"{t},{l}\n" for t, l in make_texts(24, 5))
CSV = "text,label\n" + ROWS
CHAT = "".join(json.dumps(r) + "\n" for r in make_chat_rows() * 3)


def jl(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*msgs: tuple[str, Any]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in msgs]}


GOOD = chat(("user", "hi"), ("assistant", "hello"))
SHARE_GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}

# a template that refuses system messages, as Gemma's does
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

FAILED_JSON = json.dumps({"status": "failed", "error": "boom", "step": 7, "checkpoint": "ckpt/step-000006"})

CASES: list[Case] = [
    # -- config files ---------------------------------------------------------------------------
    C("config-missing", "train {d}/nope.yaml", ["config file {d}/nope.yaml does not exist"]),
    C("config-is-dir", "train {d}", ["{d}", "is a directory"]),
    C("config-empty", TRAIN, ["missing required key 'task'"], files={"c.yaml": ""}),
    C("config-list", TRAIN, ["a config is a mapping", "not a list"], files={"c.yaml": "- task\n- model\n"}),
    C("config-scalar", TRAIN, ["a config is a mapping", "not a str"], files={"c.yaml": "hello\n"}),
    C("config-broken-yaml", TRAIN, ["{cfg}:2: not valid YAML"], files={"c.yaml": "task: text-classification\n  model: [x\n"}),
    C("config-tab-indent", TRAIN, ["{cfg}:2: not valid YAML"], files={"c.yaml": "data:\n\ttrain: a.csv\n"}),
    C("config-binary", TRAIN, ["{cfg}", "UTF-8"], files={"c.yaml": b"\xff\xfe\x00\x01task"}),
    C("config-nul", TRAIN, ["{cfg}"], files={"c.yaml": "task: text-classification\x00\n"}),
    C("config-duplicate-key", TRAIN, ["{cfg}:", "'optim' appears twice"], files={"c.yaml": "task: text-classification\noptim: {lr: 1}\noptim: {lr: 2}\n"}),
    C("config-data-not-mapping", TRAIN, ["data", "valid dictionary"], config={"data": 3}),
    C("config-unknown-top", TRAIN, ["unknown key 'foo'"], config={"foo": 1}),
    C("config-unknown-optim", TRAIN, ["unknown key 'optim.lrr'", "did you mean 'lr'"], config={"optim": {"lrr": 1}}),
    C("config-unknown-task", TRAIN, ["unknown task 'text-clasification'", "did you mean 'text-classification'"], config={"task": "text-clasification"}),
    C("config-task-number", TRAIN, ["task"], config={"task": 3}),
    C("config-no-model", TRAIN, ["missing required key 'model'"], config={"model": None}),
    C("config-no-train", TRAIN, ["missing required key 'data.train'"], config={"data": {"train": None}}),
    C("config-model-list", TRAIN, ["model", "string"], config={"model": [1, 2]}),
    C("config-output-dir-list", TRAIN, ["output_dir"], config={"output_dir": [1]}),
    C("config-overwrite-maybe", TRAIN, ["overwrite"], config={"overwrite": "maybe"}),
    C("config-resume-maybe", TRAIN, ["resume"], config={"resume": "maybe"}),
    C("config-bad-rows", TRAIN, ["data.bad_rows"], config={"data": {"bad_rows": "ignore"}}),
    C("config-max-rows-0", TRAIN, ["data.max_rows"], config={"data": {"max_rows": 0}}),
    C("config-val-fraction", TRAIN, ["data."], config={"data": {"validation": None, "validation_fraction": 1.5}}),
    # -- config values, as overrides ----------------------------------------------------------------
    *[C(f"value-{k}={v}", f"train {{cfg}} {k}={v}", [frag]) for k, v, frag in [
        ("optim.lr", "-1", "optim.lr must be > 0"),
        ("optim.lr", "0", "optim.lr must be > 0"),
        ("optim.lr", "fast", "optim.lr"),
        ("optim.lr", "[1]", "optim.lr"),
        ("optim.lr", "nan", "optim.lr"),
        ("optim.lr", "inf", "optim.lr"),
        ("optim.batch_size", "0", "optim.batch_size"),
        ("optim.batch_size", "-3", "optim.batch_size"),
        ("optim.batch_size", "1.5", "optim.batch_size"),
        ("optim.batch_size", "many", "optim.batch_size"),
        ("optim.epochs", "0", "optim.epochs"),
        ("optim.epochs", "-1", "optim.epochs"),
        ("optim.warmup", "-1", "optim.warmup"),
        ("optim.weight_decay", "-0.1", "optim.weight_decay"),
        ("optim.grad_accum", "0", "optim.grad_accum"),
        ("optim.max_steps", "0", "optim.max_steps"),
        ("optim.max_grad_norm", "0", "optim.max_grad_norm"),
        ("optim.betas", "[0.9]", "optim.betas"),
        ("optim.betas", "[0.9,1.5]", "optim.betas"),
        ("optim.scheduler", "cosine2", "optim.scheduler"),
        ("optim.min_steps", "-1", "optim.min_steps"),
        ("optim.head_lr", "0", "optim.head_lr"),
        ("optim.lr_find_steps", "3", "optim.lr_find_steps"),
        ("train.max_length", "1", "train.max_length"),
        ("train.max_length", "0", "train.max_length"),
        ("train.precision", "fp8", "train.precision"),
        ("train.seed", "abc", "train.seed"),
        ("train.metric", "bleu", "'bleu' is not a validation metric"),
        ("train.micro_batch_size", "0", "train.micro_batch_size"),
        ("train.class_weights", "some", "train.class_weights"),
        ("train.keep_checkpoints", "0", "train.keep_checkpoints"),
        ("train.log_every", "0", "train.log_every"),
        ("train.max_bad_steps", "0", "train.max_bad_steps"),
        ("eval.batch_size", "0", "eval.batch_size"),
        ("image.size", "10", "image.size"),
        ("image.label_smoothing", "1", "image.label_smoothing"),
        ("lm.samples", "-1", "lm.samples"),
        ("strategy.name", "lora2", "unknown strategy 'lora2'"),
        ("strategy.name", "123", "strategy.name"),
        ("strategy.layer_decay", "2", "strategy.layer_decay"),
        ("strategy.train_last_n", "2", "applies to strategy"),
        ("strategy.lora", "3", "strategy.lora"),
        ("strategy.replay.fraction", "2", "strategy.replay"),
    ]],
    C("value-micro-over-batch", "train {cfg} optim.batch_size=8 train.micro_batch_size=16", ["train.micro_batch_size"]),
    C("value-lora-rank-0", "train {cfg} strategy.name=lora strategy.lora.r=0", ["strategy.lora.r"]),
    C("value-lora-unknown-key", "train {cfg} strategy.name=lora strategy.lora.rank=8", ["unknown key", "rank"]),
    C("value-head-only-on-lm", "train {cfg} strategy.name=head-only", ["strategy 'head-only' does not apply to task causal-lm"], base="lm"),
    C("value-lora-on-images", "train {cfg} strategy.name=lora", ["lora"], base="image"),
    C("value-metric-lm", "train {cfg} train.metric=accuracy", ["'accuracy' is not a validation metric"], base="lm"),
    # -- the command line ---------------------------------------------------------------------------
    C("cli-override-no-equals", "train {cfg} optim.lr", ["override 'optim.lr' is not key=value"]),
    C("cli-override-empty-key", "train {cfg} =3", ["override '=3'"]),
    C("cli-override-empty-part", "train {cfg} optim..lr=3", ["empty key part"]),
    C("cli-override-into-value", "train {cfg} optim.lr.x=3", ["optim.lr", "valid number"]),
    C("cli-override-section", "train {cfg} optim=3", ["optim"]),
    C("cli-unknown-command", "trian {cfg}", ["invalid choice: 'trian'"]),
    C("cli-unknown-flag", "train {cfg} --fast", ["unrecognized arguments: --fast"]),
    C("cli-train-no-config", "train", ["the following arguments are required: config"]),
    C("cli-predict-batch-0", "predict {run} good --batch-size 0", ["--batch-size"]),
    C("cli-predict-batch-str", "predict {run} good --batch-size many", ["--batch-size", "invalid int value"]),
    C("cli-predict-top-k-0", "predict {imgrun} {images}/test --top-k 0", ["--top-k"]),
    C("cli-generate-tokens-0", "generate {llama} hi --max-new-tokens 0", ["argument --max-new-tokens: must be at least 1"]),
    C("cli-generate-temp", "generate {llama} hi --temperature -1", ["--temperature must be in [0, 100]", "got -1.0"]),
    C("cli-generate-top-p", "generate {llama} hi --top-p 0", ["--top-p in (0, 1]"]),
    C("cli-generate-top-p-2", "generate {llama} hi --top-p 1.5", ["--top-p in (0, 1]"]),
    C("cli-generate-rep", "generate {llama} hi --repetition-penalty 0", ["--repetition-penalty"]),
    C("cli-sample-data-name", "sample-data mnist {d}/out", ["invalid choice: 'mnist'"]),
    C("cli-sample-data-count", "sample-data digits {d}/out --train-per-class 0", ["--train-per-class"]),
    C("cli-sample-data-topic", "sample-data chatterbot {d}/out --topics nosuchtopic", ["nosuchtopic"]),
    C("cli-sample-data-into-file", "sample-data digits {d}/f.txt", ["{d}/f.txt exists"], files={"f.txt": "x"}),
    C("cli-demo-rows-0", "demo --train-rows 0", ["--train-rows"]),
    C("cli-demo-epochs-0", "demo --epochs 0", ["--epochs"]),
    C("cli-lr-find-output", "lr-find {cfg} --output {d}/plot.jpg", ["--output {d}/plot.jpg", ".png"]),
    C("cli-validate-missing", "validate {d}/nope.yaml", ["does not exist"]),
    # -- text data files ------------------------------------------------------------------------------
    *[C(f"text-{id}", TRAIN, expect, files={"train" + ext: body}, config={"data": {"train": "{d}/train" + ext}}) for id, ext, body, expect in [
        ("empty", ".csv", "", ["{d}/train.csv is empty"]),
        ("whitespace", ".csv", "  \n\n", ["{d}/train.csv is empty"]),
        ("header-only", ".csv", "text,label\n", ["{d}/train.csv", "no"]),
        ("one-class", ".csv", "text,label\n" + "".join(f"{t},pos\n" for t, _ in make_texts(20, 0)), ["only one label ('pos')"]),
        ("one-row", ".csv", "text,label\ngreat film,pos\n", ["{d}/train.csv"]),
        ("no-text-column", ".csv", "review,label\n" + ROWS, ["no column 'text'", "columns in the file: review, label"]),
        ("no-label-column", ".csv", "text,class\n" + ROWS, ["no column 'label'", "columns in the file: text, class"]),
        ("duplicate-header", ".csv", "text,text\n" + ROWS, ["{d}/train.csv:1: duplicate column name(s) 'text'"]),
        ("tabs-in-csv", ".csv", "text\tlabel\n" + ROWS.replace(",", "\t"), ["{d}/train.csv:1: the header has tabs"]),
        ("commas-in-tsv", ".tsv", CSV, ["{d}/train.tsv:1: the header has commas"]),
        ("wrong-fields", ".csv", CSV + "a,b,c\n", ["{d}/train.csv:26: 3 fields, but the header has 2"]),
        ("broken-quote", ".csv", CSV + '"open quote,pos\n' + ROWS, ["{d}/train.csv:26:"]),
        ("empty-text", ".csv", CSV + " ,pos\n", ["{d}/train.csv:26: text is empty"]),
        ("missing-label", ".csv", CSV + "great film,\n", ["{d}/train.csv:26: label is missing"]),
        ("not-utf8", ".csv", CSV.encode() + b"caf\xe9 film,pos\n", ["{d}/train.csv:26: not valid UTF-8 (byte 0xe9)"]),
        ("binary", ".csv", bytes(range(256)) * 40, ["{d}/train.csv"]),
        ("nul-row", ".csv", CSV + "great\x00film,pos\n", ["{d}/train.csv:26:", "NUL"]),
        ("xlsx", ".xlsx", "x", ["unsupported file type '.xlsx'"]),
        ("no-suffix", "", CSV, ["unsupported file type '(none)'"]),
        ("jsonl-array-line", ".jsonl", '[{"text": "great film", "label": "pos"}]\n', ["{d}/train.jsonl:1:", "JSON array", "one JSON object per line"]),
        ("jsonl-number-lines", ".jsonl", "1\n2\n3\n", ["{d}/train.jsonl:1:", "JSON object"]),
        ("jsonl-broken", ".jsonl", jl(*[{"text": t, "label": l} for t, l in make_texts(20, 0)], '{"text": "x", "label"'), ["{d}/train.jsonl:21: not valid JSON"]),
        ("jsonl-text-number", ".jsonl", jl(*[{"text": t, "label": l} for t, l in make_texts(20, 0)], {"text": 5, "label": "pos"}), ["{d}/train.jsonl:21: text is int, not a string"]),
        ("jsonl-label-dict", ".jsonl", jl(*[{"text": t, "label": l} for t, l in make_texts(20, 0)], {"text": "film", "label": {"a": 1}}), ["{d}/train.jsonl:21: label is missing or not"]),
        ("jsonl-one-object-file", ".jsonl", json.dumps([{"text": t, "label": l} for t, l in make_texts(20, 0)], indent=2), ["{d}/train.jsonl: the file is one JSON array of 20 item(s), not JSON lines", "jq -c"]),
        ("parquet-garbage", ".parquet", b"PAR1 not really", ["{d}/train.parquet: not a readable Parquet file"]),
    ]],
    *[C(f"text-split-{id}", TRAIN, expect, files={"train.csv": body}, config={"data": {"train": "{d}/train.csv", "validation": None, "test": None}})
      for id, body, expect in [
        ("two-rows", "text,label\ngreat film,pos\ndull film,neg\n", ["{d}/train.csv"]),
        ("more-classes-than-rows", "text,label\n" + "".join(f"film {i},c{i}\n" for i in range(12)), ["{d}/train.csv"]),
        ("one-row-per-class", "text,label\n" + "".join(f"film {i},c{i % 4}\n" for i in range(5)), ["{d}/train.csv"]),
    ]],
    C("text-train-missing", TRAIN, ["data file {d}/missing.csv does not exist"], config={"data": {"train": "{d}/missing.csv"}}),
    C("text-train-is-dir", TRAIN, ["is a directory"], config={"data": {"train": "{d}"}}),
    C("text-validation-unknown-label", TRAIN, ["{d}/val.csv:26: label 'meh'", "never occurs in the training data"],
      files={"val.csv": CSV + "the film,meh\n"}, config={"data": {"validation": "{d}/val.csv"}}),
    C("text-column-typo", TRAIN, ["no column 'txt'", "did you mean 'text'"], config={"data": {"text_column": "txt"}}),
    C("text-pair-column-missing", TRAIN, ["no column 'hypothesis'"], config={"data": {"text_pair_column": "hypothesis"}}),
    C("text-replay-missing", TRAIN, ["{d}/replay.csv does not exist"], config={"strategy": {"replay": {"file": "{d}/replay.csv"}}}),
    C("text-replay-unknown-label", TRAIN, ["{d}/replay.csv", "'other'"], files={"replay.csv": CSV + "film,other\n"},
      config={"strategy": {"replay": {"file": "{d}/replay.csv"}}}),
    # -- chat / language-model data -----------------------------------------------------------------------
    *[C(f"chat-{id}", TRAIN, expect, files={"train.jsonl": CHAT + body}, config={"data": {"train": "{d}/train.jsonl"}}, base="lm")
      for id, body, expect in [
        ("messages-not-list", jl({"messages": "hi"}), ["{d}/train.jsonl:16: 'messages' must be a non-empty list"]),
        ("messages-empty", jl({"messages": []}), ["{d}/train.jsonl:16: 'messages' must be a non-empty list"]),
        ("message-not-object", jl({"messages": ["hi"]}), ["{d}/train.jsonl:16: messages[0] must be an object"]),
        ("unknown-role", jl(chat(("human", "hi"), ("assistant", "x"))), ["{d}/train.jsonl:16: messages[0] has unknown role \"human\""]),
        ("no-role", jl({"messages": [{"content": "hi"}]}), ["{d}/train.jsonl:16: messages[0] has no 'role'"]),
        ("no-content", jl({"messages": [{"role": "user"}]}), ["{d}/train.jsonl:16: messages[0] (user) has no 'content'"]),
        ("empty-content", jl(chat(("user", "hi"), ("assistant", " "))), ["{d}/train.jsonl:16: messages[1] (assistant) content is empty"]),
        ("content-number", jl(chat(("user", 5), ("assistant", "x"))), ["{d}/train.jsonl:16: messages[0] (user) content is int"]),
        ("no-assistant", jl(chat(("user", "hi"))), ["{d}/train.jsonl:16: no assistant message"]),
        ("weight-on-user", jl({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]}),
         ["{d}/train.jsonl:16: messages[0] (user): 'weight' is only allowed on assistant messages"]),
        ("weight-2", jl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}),
         ["{d}/train.jsonl:16: messages[1]: 'weight' must be 0 or 1"]),
        ("all-weight-0", jl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}),
         ["{d}/train.jsonl:16: every assistant message has weight 0"]),
        ("roles-out-of-order", jl(chat(("user", "a"), ("system", "b"), ("assistant", "c"))), ["{d}/train.jsonl:16: messages[1] (system): a system message must come first"]),
        ("mixed-formats", jl({"prompt": "a", "completion": "b"}), ["{d}/train.jsonl:16: this row is prompt-completion data, but the file is read as chat"]),
        ("array-line", "[1, 2]\n", ["{d}/train.jsonl:16:", "JSON array"]),
        ("two-users-in-a-row", jl(chat(("user", "a"), ("user", "b"), ("assistant", "c"))),
         ["{d}/train.jsonl:16: messages[1] (user) follows another user message: turns must alternate"]),
        ("two-assistants-in-a-row", jl(chat(("user", "a"), ("assistant", "b"), ("assistant", "c"))),
         ["{d}/train.jsonl:16: messages[2] (assistant) follows another assistant message"]),
        ("tool-result-without-call", jl(chat(("user", "a"), ("tool", "42"), ("assistant", "c"))),
         ["{d}/train.jsonl:16: messages[1] (tool): a tool result must follow an assistant message with tool_calls"]),
        ("tool-calls-on-user", jl({"messages": [{"role": "user", "content": "a", "tool_calls": [{"function": {"name": "f"}}]},
                                                {"role": "assistant", "content": "b"}]}),
         ["{d}/train.jsonl:16: messages[0] (user): only assistant messages make tool_calls"]),
        ("tool-call-no-name", jl({"messages": [{"role": "user", "content": "a"},
                                               {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]},
                                               {"role": "tool", "content": "x"}, {"role": "assistant", "content": "b"}]}),
         ["{d}/train.jsonl:16: messages[1].tool_calls[0] must be"]),
        ("call-without-result", jl({"messages": [{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
                                                 {"role": "assistant", "content": "b"}]}),
         ["{d}/train.jsonl:16:", "must be followed by the tool result"]),
        ("tools-not-list", jl({**GOOD, "tools": "get_weather"}), ["{d}/train.jsonl:16: 'tools' is a string that is not JSON"]),
        ("sharegpt-row", jl({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}),
         ["{d}/train.jsonl:16: this row is sharegpt data, but the file is read as chat"]),
        ("broken-json", '{"messages": [\n', ["{d}/train.jsonl:16: not valid JSON"]),
    ]],
    *[C(f"sharegpt-{id}", TRAIN, expect, files={"train.jsonl": jl(SHARE_GOOD, row)}, config={"data": {"train": "{d}/train.jsonl"}}, base="lm")
      for id, row, expect in [
        ("unknown-speaker", {"conversations": [{"from": "alien", "value": "a"}, {"from": "gpt", "value": "b"}]},
         ["{d}/train.jsonl:2: conversations[0] has unknown speaker \"alien\"", "human"]),
        ("no-value", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},
         ["{d}/train.jsonl:2: conversations[0] must be an object with 'from' and 'value'"]),
        ("not-a-list", {"conversations": "hi"}, ["{d}/train.jsonl:2: 'conversations' must be a non-empty list"]),
        ("gpt-twice", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}]},
         ["{d}/train.jsonl:2: messages[2] (assistant) follows another assistant message"]),
        ("bad-function-call", {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "reset"}]},
         ["{d}/train.jsonl:2: conversations[1] (function_call): value must be a JSON object"]),
        ("tool-without-template", {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                                                     {"from": "observation", "value": "ok"}, {"from": "gpt", "value": "done"}]},
         ["{d}/train.jsonl:2: this conversation has tools or tool calls, but the chat template never mentions"]),
    ]],
    *[C(f"conversational-{id}", TRAIN, expect, files={"train.jsonl": jl({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}, row)},
        config={"data": {"train": "{d}/train.jsonl"}}, base="lm")
      for id, row, expect in [
        ("no-assistant", {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
         ["{d}/train.jsonl:2: 'completion' has no assistant message"]),
        ("string-completion", {"prompt": [{"role": "user", "content": "a"}], "completion": "b"},
         ["{d}/train.jsonl:2: 'prompt' and 'completion' must both be lists"]),
        ("empty-completion", {"prompt": [{"role": "user", "content": "a"}], "completion": []},
         ["{d}/train.jsonl:2: 'prompt' and 'completion' must both be lists"]),
    ]],
    C("lm-prompt-empty-completion", TRAIN, ["{d}/train.jsonl:2: 'completion' is empty"],
      files={"train.jsonl": jl({"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}) }, config={"data": {"train": "{d}/train.jsonl"}}, base="lm"),
    C("lm-alpaca-no-output", TRAIN, ["{d}/train.jsonl:2: no 'output' field"],
      files={"train.jsonl": jl({"instruction": "a", "output": "b"}, {"instruction": "a"})}, config={"data": {"train": "{d}/train.jsonl"}}, base="lm"),
    C("lm-alpaca-input-number", TRAIN, ["{d}/train.jsonl:2: 'input' must be a string"],
      files={"train.jsonl": jl({"instruction": "a", "output": "b"}, {"instruction": "a", "input": 3, "output": "b"})},
      config={"data": {"train": "{d}/train.jsonl"}}, base="lm"),
    C("lm-format-mismatch", TRAIN, ["{d}/train.jsonl:1: this row is chat data, but the file is read as alpaca"],
      files={"train.jsonl": CHAT}, config={"data": {"train": "{d}/train.jsonl"}, "lm": {"format": "alpaca"}}, base="lm"),
    C("lm-txt-empty", TRAIN, ["{d}/doc.txt"], files={"doc.txt": "   \n"}, config={"data": {"train": "{d}/doc.txt"}}, base="lm"),
    C("lm-txt-with-chat-format", TRAIN, [".txt data is raw text", "lm.format is 'chat'"], files={"doc.txt": "some text\n"},
      config={"data": {"train": "{d}/doc.txt"}, "lm": {"format": "chat"}}, base="lm"),
    C("lm-folder-no-txt", TRAIN, ["must hold .txt files"], files={"docs/a.md": "x"}, config={"data": {"train": "{d}/docs"}}, base="lm"),
    C("lm-template-missing", TRAIN, ["lm.chat_template: {d}/t.jinja does not exist"], config={"lm": {"chat_template": "{d}/t.jinja"}}, base="lm"),
    C("lm-template-broken", TRAIN, ["lm.chat_template"], config={"lm": {"chat_template": "{% for m in messages %}{{ m['content'] }"}}, base="lm"),
    C("lm-too-long", TRAIN, ["do not fit train.max_length=16", "lm.too_long=skip"],
      files={"train.jsonl": CHAT + jl(chat(("user", "hi"), ("assistant", "the quick brown fox jumps over the lazy dog " * 4)))},
      config={"data": {"train": "{d}/train.jsonl"}, "train": {"max_length": 16}}, base="lm"),
    C("lm-template-refuses", TRAIN, ["{d}/train.jsonl:2: the chat template refuses this conversation", "System role not supported"],
      files={"train.jsonl": jl(GOOD, chat(("system", "s"), ("user", "b"), ("assistant", "c")))},
      config={"data": {"train": "{d}/train.jsonl"}, "lm": {"chat_template": STRICT_TEMPLATE}}, base="lm"),
    C("lm-template-file-broken", TRAIN, ["{d}/t.jinja: the chat template is not valid Jinja (line 2"],
      files={"t.jinja": "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"}, config={"lm": {"chat_template": "{d}/t.jinja"}}, base="lm"),
    C("lm-prompts-not-list", TRAIN, ["lm.prompts"], config={"lm": {"prompts": "hi"}}, base="lm"),
    C("lm-forgetting-missing", TRAIN, ["{d}/general.txt"], config={"lm": {"forgetting": "{d}/general.txt"}}, base="lm"),
    # -- image data -------------------------------------------------------------------------------------------
    C("img-train-missing", TRAIN, ["data path {d}/nope does not exist"], config={"data": {"train": "{d}/nope"}}, base="image"),
    C("img-no-images", TRAIN, ["{d}/imgs", "no images"], files={"imgs/a/notes.txt": "x", "imgs/b/notes.txt": "y"},
      config={"data": {"train": "{d}/imgs"}}, base="image"),
    C("img-one-class", TRAIN, ["only one", "class"], files={"imgs/a/0.png": "PNG:0", "imgs/a/1.png": "PNG:1"},
      config={"data": {"train": "{d}/imgs"}}, base="image"),
    C("img-empty-folder", TRAIN, ["{d}/imgs"], files={"imgs/.keep": ""}, config={"data": {"train": "{d}/imgs"}}, base="image"),
    C("img-all-damaged", TRAIN, ["bad image(s)", "{d}/imgs/"], files={"imgs/a/0.png": b"not png", "imgs/b/0.png": b""},
      config={"data": {"train": "{d}/imgs"}}, base="image"),
    C("img-test-unknown-class", TRAIN, ["{d}/test", "'purple'"], files={"test/purple/0.png": "PNG:3"},
      config={"data": {"test": "{d}/test"}}, base="image"),
    C("img-text-file", TRAIN, ["{d}/train.csv"], files={"train.csv": "path,label\n"}, config={"data": {"train": "{d}/train.csv"}}, base="image"),
    C("img-size-over-model", TRAIN, ["image.size"], config={"image": {"size": 100000}}, base="image"),
    # -- model directories -------------------------------------------------------------------------------------------
    C("model-typo", TRAIN, ["did you mean 'minilm-l6'"], config={"model": "minilm-l7"}),
    C("model-hub-offline", TRAIN, ["hub cannot be reached"], config={"model": "bert-base-uncased"}),
    C("model-dir-missing", TRAIN, ["model directory {d}/m does not exist"], config={"model": "{d}/m"}),
    C("model-dir-empty", TRAIN, ["{d}/m"], files={"m/.keep": ""}, config={"model": "{d}/m"}),
    C("model-config-broken", TRAIN, ["{d}/m"], files={"m/config.json": "{not json"}, config={"model": "{d}/m"}),
    C("model-config-only", TRAIN, ["{d}/m"], files={"m/config.json": json.dumps({"model_type": "bert"})}, config={"model": "{d}/m"}),
    C("model-pickle-only", TRAIN, ["pickle", "allow_pickle"], files={"m/config.json": "COPY:{model}/config.json", "m/pytorch_model.bin": "x",
                                                                    "m/vocab.txt": "COPY:{model}/vocab.txt", "m/tokenizer_config.json": "COPY:{model}/tokenizer_config.json"},
      config={"model": "{d}/m"}),
    C("model-weights-garbage", TRAIN, ["cannot load the weights of model '{d}/m'"],
      files={"m/config.json": "COPY:{model}/config.json", "m/model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
             "m/vocab.txt": "COPY:{model}/vocab.txt", "m/tokenizer_config.json": "COPY:{model}/tokenizer_config.json"},
      config={"model": "{d}/m"}),
    C("model-weights-cut", TRAIN, ["cannot load the weights of model '{d}/m'"],
      files={"m/config.json": "COPY:{model}/config.json", "m/model.safetensors": "CUT:{model}/model.safetensors",
             "m/vocab.txt": "COPY:{model}/vocab.txt", "m/tokenizer_config.json": "COPY:{model}/tokenizer_config.json"},
      config={"model": "{d}/m"}),
    C("model-image-for-text", TRAIN, ["{timm}"], config={"model": "{timm}"}),
    C("model-text-for-images", TRAIN, ["{model}"], config={"model": "{model}"}, base="image"),
    C("model-bert-for-lm", TRAIN, ["{model}"], config={"model": "{model}"}, base="lm"),
    C("model-packaged-wrong-task", TRAIN, ["model 'efficientnet-lite0' is a packaged image-classification model"], config={"model": "efficientnet-lite0"}),
    C("model-file-missing", TRAIN, ["model_file {d}/w.safetensors does not exist"], config={"model": "test_efficientnet", "model_file": "{d}/w.safetensors"}, base="image"),
    C("model-timm-name-no-weights", TRAIN, ["needs its weights", "model_file"], config={"model": "test_efficientnet"}, base="image"),
    C("model-lora-targets-absent", "train {cfg} strategy.name=lora strategy.lora.target_modules=[nosuchlayer]", ["nosuchlayer"]),
    C("model-positions", "train {cfg} train.max_length=100000 strategy.name=lora strategy.lora.target_modules=[nosuchlayer]", ["nosuchlayer"]),
    # -- run directories: train into them, predict / eval / generate from them -----------------------------------------
    C("run-finished", "train {cfg} output_dir={run}", ["{run} holds a finished run", "--overwrite"]),
    C("run-output-is-file", "train {cfg} output_dir={d}/f", ["output_dir {d}/f exists and is not a directory"], files={"f": "x"}),
    C("run-resume-nothing", "train {cfg} --resume", ["nothing to resume"]),
    C("predict-missing-dir", "predict {d}/nope good", ["run directory {d}/nope does not exist"]),
    C("predict-empty-dir", "predict {d}/empty good", ["{d}/empty is not a finished tunesmith run"], files={"empty/.keep": ""}),
    C("predict-no-input", "predict {run}", ["give texts to classify, or --file FILE"]),
    C("predict-file-missing", "predict {run} --file {d}/new.csv", ["{d}/new.csv does not exist"]),
    C("predict-file-no-column", "predict {run} --file {d}/new.csv", ["no column 'text'"], files={"new.csv": "review\ngood\n"}),
    C("predict-file-empty-text", "predict {run} --file {d}/new.csv", ["{d}/new.csv:3: text is empty"], files={"new.csv": "text,id\ngood,1\n ,2\n"}),
    C("predict-output-suffix", "predict {run} good --output {d}/p.txt", ["--output {d}/p.txt: use a .csv or .jsonl file name"]),
    C("predict-output-dir-missing", "predict {run} good --output {d}/no/p.csv", ["{d}/no/p.csv"]),
    C("predict-lm-run", "predict {lmrun} hello", ["holds a language model", "tunesmith generate"]),
    C("predict-image-missing", "predict {imgrun} {d}/none.png", ["{d}/none.png: no such image file or folder"]),
    C("predict-image-empty-folder", "predict {imgrun} {d}/imgs", ["{d}/imgs: no image files in this folder"], files={"imgs/x.txt": "x"}),
    C("predict-image-damaged", "predict {imgrun} {d}/bad.png", ["{d}/bad.png"], files={"bad.png": b"\x89PNG broken"}),
    C("predict-image-text-file", "predict {imgrun} {d}/notes.txt", ["{d}/notes.txt"], files={"notes.txt": "hello"}),
    *[C(f"{cmd.split()[0]}-failed-run", cmd, ["the run in {d}/failed failed at step 7 and holds no model: boom", "--resume"],
        files={"failed/config.yaml": "task: text-classification\n", "failed/failed.json": FAILED_JSON})
      for cmd in ("predict {d}/failed good", "eval {d}/failed --data {text}/test.csv", "generate {d}/failed hi")],
    C("eval-no-data-flag", "eval {run}", ["the following arguments are required: --data"]),
    C("eval-data-missing", "eval {run} --data {d}/t.csv", ["{d}/t.csv does not exist"]),
    C("eval-unknown-label", "eval {run} --data {d}/t.csv", ["{d}/t.csv", "'meh'"], files={"t.csv": CSV + "film,meh\n"}),
    C("eval-no-label-column", "eval {run} --data {d}/t.csv", ["no column 'label'"], files={"t.csv": "text\ngood film\n"}),
    C("eval-missing-run", "eval {d}/nope --data {text}/test.csv", ["{d}/nope"]),
    C("eval-not-a-run", "eval {d}/empty --data {text}/test.csv", ["{d}/empty is not a tunesmith run directory"], files={"empty/.keep": ""}),
    C("eval-image-folder-for-text", "eval {run} --data {images}/test", ["{images}/test is a directory"]),
    C("eval-lm-bad-rows", "eval {lmrun} --data {d}/t.jsonl", ["{d}/t.jsonl:1:"], files={"t.jsonl": jl({"messages": "x"})}),
    C("eval-image-unknown-class", "eval {imgrun} --data {d}/test", ["purple", "not among the model's classes"], files={"test/purple/0.png": "PNG:0"}),
    C("generate-missing", "generate {d}/nope hi", ["{d}/nope"]),
    C("generate-text-run", "generate {run} hi", ["{run} is a text-classification run"]),
    C("generate-image-run", "generate {imgrun} hi", ["{imgrun} is a image-classification run"]),
    C("generate-bert-dir", "generate {model} hi", ["{model} does not hold a causal language model"]),
    C("chat-text-run", "chat {run}", ["{run} is a text-classification run"]),
    C("validate-show-tokens-images", "validate {cfg} --show-tokens 2", ["--show-tokens applies to text tasks; image-classification has no tokens"], base="image"),
    C("validate-show-tokens-0", "validate {cfg} --show-tokens 0", ["argument --show-tokens: must be at least 1"]),
    C("convert-unknown-tool", "config convert {cfg}", ["cannot tell the config's tool"]),
    C("convert-list", "config convert {d}/a.yml", ["{d}/a.yml: a config is a mapping of keys, not a list"], files={"a.yml": "- a\n"}),
    C("convert-broken", "config convert {d}/a.yml", ["{d}/a.yml: not a readable YAML/JSON config"], files={"a.yml": "a: [\n"}),
    C("report-missing-dir", "report {d}/nope", ["{d}/nope is not a run directory (no config.yaml)"]),
    C("report-damaged-eval", "report {d}/r", ["{d}/r: config.yaml or eval.json is damaged"],
      files={"r/config.yaml": "task: text-classification\n", "r/eval.json": "{broken"}),
    C("compare-one-run", "compare {run}", ["compare needs at least two run directories"]),
    C("compare-not-html", "compare {run} {imgrun} --output {d}/c.txt", ["--output {d}/c.txt", "ending in .html"]),
    C("compare-missing-run", "compare {run} {d}/nope --output {d}/c.html", ["{d}/nope is not a run directory"]),
    C("compare-output-dir-missing", "compare {run} {lmrun} --output {d}/no/c.html", ["cannot write {d}/no/c.html"]),
    C("sweep-no-space", "sweep {cfg}", ["{cfg}: no sweep: section"]),
    C("sweep-trials-0", "sweep {cfg} --trials 0", ["argument --trials: must be at least 1"]),
    C("sweep-unknown-key", "sweep {cfg}", ["sweep.optim.lrr"], config={"sweep": {"optim.lrr": {"low": 1, "high": 2}}}),
    C("sweep-no-range", "sweep {cfg}", ["sweep.optim.lr", "give low and high"], config={"sweep": {"optim.lr": {"log": True}}}),
    C("train-seeds-0", "train {cfg} --seeds 0", ["argument --seeds: must be at least 1"]),
    C("validate-bad-override", "validate {cfg} optim.lr=-1", ["optim.lr must be > 0"]),
    C("validate-bad-data", "validate {cfg} data.train={d}/nope.csv", ["{d}/nope.csv does not exist"]),
    C("validate-json-bad-data", "validate {cfg} --json data.train={d}/nope.csv", ["{d}/nope.csv does not exist"]),
    C("lr-find-bad-data", "lr-find {cfg} data.train={d}/nope.csv", ["{d}/nope.csv does not exist"]),
]


# -- the world the cases run in: tiny models, good data, three finished runs --------------------------
def png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)


def base_configs(world: dict[str, str], out: str) -> dict[str, dict[str, Any]]:
    fast = {"optim": {"epochs": 1, "batch_size": 8, "min_steps": 0}, "train": {"precision": "fp32", "max_length": 32}}
    return {
        "text": {"task": "text-classification", "model": world["model"], **copy.deepcopy(fast),
                 "data": {k: f"{world['text']}/{k}.csv" for k in ("train", "validation", "test")},
                 "strategy": {"name": "full", "lp_ft": False}, "eval": {"linear_probe": False}, "output_dir": out},
        "lm": {"task": "causal-lm", "model": world["llama"], **copy.deepcopy(fast),
               "data": {k: f"{world['chat']}/{k}.jsonl" for k in ("train", "validation", "test")},
               "strategy": {"name": "full"}, "lm": {"forgetting": None, "samples": 1, "max_new_tokens": 4}, "output_dir": out},
        "image": {"task": "image-classification", "model": world["timm"], **copy.deepcopy(fast), "image": {"size": 32},
                  "data": {"train": f"{world['images']}/train", "test": f"{world['images']}/test"},
                  "strategy": {"name": "full", "lp_ft": False}, "eval": {"linear_probe": False}, "output_dir": out},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_llama_dir, tiny_timm_dir) -> dict[str, str]:
    import tunesmith

    root = tmp_path_factory.mktemp("adv-world")
    w = {"model": str(tiny_model_dir), "llama": str(tiny_llama_dir), "timm": str(tiny_timm_dir),
         "text": str(root / "text"), "chat": str(root / "chat"), "images": str(root / "images")}
    (root / "text").mkdir()
    for k, seed in (("train", 1), ("validation", 2), ("test", 3)):
        write_csv(root / "text" / f"{k}.csv", make_texts(48 if k == "train" else 16, seed))
    (root / "chat").mkdir()
    rows = make_chat_rows()
    write_jsonl(root / "chat" / "train.jsonl", rows * 4)
    write_jsonl(root / "chat" / "validation.jsonl", rows[:2])
    write_jsonl(root / "chat" / "test.jsonl", rows[2:])
    for split, n in (("train", 6), ("test", 2)):
        for c in ("blue", "red"):
            for i in range(n):
                png(root / "images" / split / c / f"{i}.png", hash((split, c, i)) % 1000)
    for key, family in (("run", "text"), ("lmrun", "lm"), ("imgrun", "image")):
        w[key] = str(root / key)
        tunesmith.train(base_configs(w, w[key])[family], quiet=True)
    return w


def _deep_update(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    for k, v in change.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in names.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    return value


def _listing(path: str) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).rglob("*")}


def run_case(case: Case, world: dict[str, str], d: Path, capsys) -> str:
    names = {**world, "d": str(d), "cfg": str(d / "c.yaml")}
    for rel, body in case.files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(body, str) and body.startswith("PNG:"):
            png(p, int(body[4:]))
        elif isinstance(body, str) and body.startswith("CUT:"):
            data = Path(_fill(body[4:], names)).read_bytes()
            p.write_bytes(data[: len(data) // 2])
        elif isinstance(body, str) and body.startswith("COPY:"):
            p.write_bytes(Path(_fill(body[5:], names)).read_bytes())
        else:
            p.write_bytes(body if isinstance(body, bytes) else _fill(body, names).encode())
    if "c.yaml" not in case.files:
        cfg = _deep_update(base_configs(world, str(d / "run"))[case.base], _fill(copy.deepcopy(case.config or {}), names))
        (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    runs = {k: _listing(world[k]) for k in ("run", "lmrun", "imgrun")}
    capsys.readouterr()
    rc = main(_fill(case.argv, names))
    out = capsys.readouterr()
    lines = [line for line in out.err.strip().splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}; stderr: {out.err[-2000:]}"
    assert "Traceback" not in out.err and "Traceback" not in out.out, out.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("tunesmith: error: "), out.err[-2000:]
    for fragment in _fill(case.expect, names):
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    assert not (d / "run").exists(), f"the run directory was left behind: {sorted(os.listdir(d / 'run'))}"
    assert {k: _listing(world[k]) for k in runs} == runs, "a finished run was changed"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2(case: Case, world, tmp_path, capsys):
    line = run_case(case, world, tmp_path, capsys)
    if os.environ.get("ADV_SHOW"):
        with capsys.disabled():
            print(f"\n[{case.id}] {line}")


def test_the_table_is_wide():
    assert len(CASES) >= 150 and len({c.id for c in CASES}) == len(CASES)
    assert {c.argv[0] for c in CASES} >= {"train", "predict", "eval", "generate", "chat", "validate", "lr-find", "sample-data", "demo",
                                          "config"}


# -- property-based: generated config values, overrides, data rows and conversations ----------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tunesmith.config import load_config  # noqa: E402
from tunesmith.errors import UserError  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = ["task", "model", "output_dir", "overwrite", "resume", "data", "data.train", "data.validation", "data.text_column",
        "data.label_separator", "data.validation_size", "data.bad_rows", "data.max_rows", "strategy", "strategy.name",
        "strategy.l2sp", "strategy.lp_ft", "strategy.lora", "strategy.lora.r", "strategy.lora.target_modules",
        "strategy.layer_decay", "strategy.train_last_n", "strategy.replay", "strategy.replay.fraction", "optim", "optim.lr",
        "optim.batch_size", "optim.epochs", "optim.betas", "optim.warmup", "optim.scheduler", "optim.lr_find_range",
        "optim.max_steps", "train.max_length", "train.precision", "train.metric", "train.micro_batch_size", "train.seed",
        "eval.batch_size", "image.size", "image.scale", "lm.format", "lm.prompts", "lm.chat_template", "lm.samples", "nonsense.key"]
STRATEGY_NAMES = st.sampled_from(["full", "lora", "freeze", "head-only", "feature-extraction", "gradual-unfreeze", "auto"])


def _one_line_user_error(fn) -> None:
    """fn() succeeds, or raises UserError with one line; anything else is a bug the generator found."""
    try:
        fn()
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


def _set(raw: dict, key: str, value: Any) -> dict:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return raw


@FUZZ
@given(task=st.sampled_from(["text-classification", "causal-lm", "image-classification"]), name=STRATEGY_NAMES,
       changes=st.lists(st.tuples(st.sampled_from(KEYS), JSON), min_size=1, max_size=3))
def test_generated_config_values_are_accepted_or_one_line(task, name, changes):
    raw = {"task": task, "model": "m", "data": {"train": "t.csv"}, "strategy": {"name": name}}
    for key, value in changes:
        _set(raw, key, value)
    _one_line_user_error(lambda: load_config(copy.deepcopy(raw)))


@FUZZ
@given(overrides=st.lists(st.text(alphabet=st.sampled_from("optim.lrtrainbatch_size=[]{}:,-+e0123 'x\"\t"), max_size=30),
                          min_size=1, max_size=3))
def test_generated_overrides_are_accepted_or_one_line(overrides):
    raw = {"task": "text-classification", "model": "m", "data": {"train": "t.csv"}}
    _one_line_user_error(lambda: load_config(raw, overrides))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-rows")


@FUZZ
@given(rows=st.lists(JSON, min_size=1, max_size=6), fmt=st.sampled_from(["jsonl", "csv"]))
def test_generated_text_rows_are_read_or_named(rows, fmt, fuzz_dir):
    from tunesmith.config import DataConfig
    from tunesmith.data.text import read_text_set

    path = fuzz_dir / f"rows.{fmt}"
    if fmt == "jsonl":
        body = "".join(json.dumps(r if not isinstance(r, dict) or len(r) != 2 else {"text": r, "label": "a"}) + "\n" for r in rows)
    else:
        body = "text,label\n" + "".join(f"{json.dumps(r)[:40]},{i % 2}\n" for i, r in enumerate(rows))
    path.write_text(body, encoding="utf-8", errors="surrogatepass")
    for bad_rows in ("error", "skip"):
        cfg = DataConfig(train=str(path), bad_rows=bad_rows)
        _one_line_user_error(lambda: read_text_set(str(path), cfg, "train"))


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "", None]),
                                 "content": st.text(max_size=40) | st.none() | st.integers()})


TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "observation", "function_call", "alien", ""]),
                               "value": st.text(max_size=30) | st.none() | st.just('{"name": "f", "arguments": {}}')})
CALL = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none() | st.just(""),
                              "tool_calls": st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
                                  {"name": st.text(max_size=8), "arguments": JSON})}), max_size=2) | JSON})


def _row(fmt: str, messages: Any) -> Any:
    if fmt == "sharegpt":
        return {"conversations": messages}
    if fmt == "conversational":
        cut = len(messages) // 2 if isinstance(messages, list) else 0
        return {"prompt": messages[:cut], "completion": messages[cut:]} if isinstance(messages, list) else {"prompt": messages, "completion": []}
    return {"messages": messages, **({"tools": [{"type": "function", "function": {"name": "f"}}]} if fmt == "tools" else {})}


@FUZZ
@given(fmt=st.sampled_from(["chat", "tools", "sharegpt", "conversational"]), conversations=st.lists(
    st.lists(MESSAGE | CALL, max_size=5) | st.lists(TURN, max_size=5) | JSON, min_size=1, max_size=4))
def test_generated_conversations_are_read_and_tokenized_or_named(fmt, conversations, fuzz_dir, tiny_llama_dir):
    """Rows of any shape, in each chat format, are named as bad or read; every row read renders and tokenizes
    with a template (one that renders tools for the tool rows)."""
    from transformers import AutoTokenizer

    from tunesmith.config import DataConfig, LMConfig
    from tunesmith.data.chat import read_lm_set, tokenize_chat

    from test_chat_formats import TOOLS_TEMPLATE

    tok = _TOKENIZERS.setdefault("llama", AutoTokenizer.from_pretrained(str(tiny_llama_dir)))
    path = fuzz_dir / "chat.jsonl"
    path.write_text("".join(json.dumps(_row(fmt, c) if isinstance(c, list) else c) + "\n" for c in conversations),
                    encoding="utf-8", errors="surrogatepass")
    lm_format = "chat" if fmt == "tools" else fmt

    def read_and_tokenize():
        s = read_lm_set(str(path), DataConfig(train=str(path), bad_rows="skip"), LMConfig(format=lm_format), "train")
        for e in s.examples:
            t = tokenize_chat(tok, TOOLS_TEMPLATE, e.messages, "assistant", tools=e.tools)
            assert len(t.ids) == len(t.trained) == len(t.answer) and any(t.trained)

    _one_line_user_error(read_and_tokenize)


_TOKENIZERS: dict[str, Any] = {}
