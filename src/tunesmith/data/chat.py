"""Language-model data: chat conversations, prompt/completion pairs, Alpaca instructions, raw text.

Formats (decided per file from the first usable row, or set with `lm.format`):

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`, as
  OpenAI's fine-tuning API takes it: multi-turn, an optional system message, an optional
  `weight` (0 or 1) on assistant messages (0: that turn is context, not trained); with
  `tools` (function specs) and assistant `tool_calls` followed by `tool` results, rendered by a
  chat template that supports tools (the whole call turn is trained);
- sharegpt: `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}`, with
  LLaMA-Factory's `function_call` / `observation` turns and its `system` / `tools` fields;
- conversational: TRL's prompt/completion with message lists (`prompt` the context, `completion`
  the assistant turn(s) the loss covers), rendered with the chat template;
- prompt-completion: `{"prompt": ..., "completion": ...}` (TRL's convention: the two are joined
  as plain text, no chat template, and the loss covers the completion and an EOS token);
- alpaca: `instruction`, optional `input`, `output`: becomes a user turn (instruction, a blank
  line, input) and an assistant turn, rendered with the chat template;
- text: a `text` column (`data.text_column`) or `.txt` files (a folder of them too), for
  continued pre-training on a domain's documents: every token is trained, each document ends
  with EOS, documents longer than `train.max_length` are cut into consecutive chunks (nothing is
  thrown away).

Rows are checked here and every unusable one is named by file and line: not JSON, an unknown
role or speaker, no assistant message, empty content, a bad weight, turns that do not alternate
user / assistant, a system message after the first turn, a tool result with no call before it,
a row of another format than the file's.

Tokenization renders a conversation once with the chat template and labels tokens by character
span: the content of each trained assistant turn plus the end-of-turn token the template writes
after it. A template that writes no EOS after an assistant turn gets the tokenizer's EOS token
inserted there, so a tuned model always learns to stop.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.text import text_problem
from tunesmith.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("chat", "sharegpt", "conversational", "prompt-completion", "alpaca", "text")
# ShareGPT speakers (`from`), with the names LLaMA-Factory and FastChat data use
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}
IGNORE = -100

# A documented default for tokenizers without a chat template: plain markers, and the
# tokenizer's EOS token closing every assistant turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@dataclass
class Example:
    """One training example before tokenization."""

    kind: str  # chat | prompt-completion | text
    where: str  # file:line
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None  # function specs the conversation may call (OpenAI `tools`)

    def key(self) -> str:
        """What makes two examples the same (duplicates, train/test overlap)."""
        if self.kind == "chat":
            return json.dumps([(m["role"], m.get("content"), m.get("tool_calls")) for m in self.messages], ensure_ascii=False)
        if self.kind == "prompt-completion":
            return json.dumps([self.prompt, self.completion], ensure_ascii=False)
        return self.text or ""

    def prompt_messages(self) -> list[dict[str, str]] | None:
        """The conversation up to its last assistant turn (what a model is asked, for samples)."""
        if self.kind != "chat":
            return None
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return [{"role": m["role"], "content": m.get("content") or ""} for m in self.messages[:last]]

    def reference(self) -> str | None:
        if self.kind == "chat":
            return [m for m in self.messages if m["role"] == "assistant"][-1].get("content") or ""
        return self.completion


@dataclass
class LMSet:
    """The examples of one split, with the rows that could not be used."""

    name: str
    source: str
    format: str
    examples: list[Example]
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    @property
    def where(self) -> list[str]:
        return [e.where for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, idx: list[int], name: str, source: str) -> "LMSet":
        return LMSet(name, source, self.format, [self.examples[i] for i in idx])


# ---------------------------------------------------------------------------------------------
# Reading


def detect_format(row: dict[str, Any], text_column: str) -> str | None:
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "conversational" if isinstance(row["prompt"], list) or isinstance(row["completion"], list) else "prompt-completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if text_column in row:
        return "text"
    return None


def chat_problem(row: dict[str, Any], key: str = "messages") -> str | None:
    """Why a chat row is unusable (OpenAI's fine-tuning checks, turn order, tool calls), or None."""
    msgs = row.get(key)
    if not isinstance(msgs, list) or not msgs:
        return f"'{key}' must be a non-empty list of {{role, content}} objects"
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "'tools' must be a list of function specs (objects)"
    trained, previous = 0, None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}"
        role = m.get("role")
        if role not in ROLES:
            return (f"messages[{i}] has unknown role {json.dumps(role)[:40]}; use one of {', '.join(ROLES)}"
                    if "role" in m else f"messages[{i}] has no 'role'")
        calls = m.get("tool_calls")
        if calls is not None:
            problem = _tool_calls_problem(calls, role, i)
            if problem:
                return problem
        elif "content" not in m:
            return f"messages[{i}] ({role}) has no 'content'"
        if not calls or m.get("content") not in (None, ""):
            problem = text_problem(m.get("content"), f"messages[{i}] ({role}) content")
            if problem:
                return problem
        if "weight" in m:
            if role != "assistant":
                return f"messages[{i}] ({role}): 'weight' is only allowed on assistant messages"
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return f"messages[{i}]: 'weight' must be 0 or 1, got {json.dumps(m['weight'])[:20]}"
        if role == "assistant" and m.get("weight", 1) == 1:
            trained += 1
        if role == "system" and i > 0:
            return f"messages[{i}] (system): a system message must come first in a conversation"
        problem = _order_problem(previous, m, i)
        if problem:
            return problem
        if role != "system":
            previous = m
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message: a conversation needs at least one assistant reply to learn from"
    if not trained:
        return "every assistant message has weight 0: nothing to learn from this conversation"
    return None


def _tool_calls_problem(calls: Any, role: str, i: int) -> str | None:
    if role != "assistant":
        return f"messages[{i}] ({role}): only assistant messages make tool_calls"
    if not isinstance(calls, list) or not calls:
        return f"messages[{i}]: 'tool_calls' must be a non-empty list"
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"messages[{i}].tool_calls[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": ...}}}}"
        if not isinstance(fn.get("arguments", {}), (str, dict)):
            return f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string or an object"
    return None


def _order_problem(previous: dict[str, Any] | None, m: dict[str, Any], i: int) -> str | None:
    """Turns alternate user / assistant; tool results follow an assistant's tool call (or another result)."""
    role = m["role"]
    before = previous["role"] if previous else None
    if role == "tool" and not (before == "tool" or (before == "assistant" and previous.get("tool_calls"))):
        return f"messages[{i}] (tool): a tool result must follow an assistant message with tool_calls"
    if before == "assistant" and previous.get("tool_calls") and role != "tool":
        return f"messages[{i}] ({role}): an assistant message with tool_calls must be followed by the tool result(s)"
    if role == before and role in ("user", "assistant"):
        return (f"messages[{i}] ({role}) follows another {role} message: turns must alternate user / assistant "
                "(merge the two, or put the missing turn between them)")
    return None


def sharegpt_messages(row: dict[str, Any]) -> list[dict[str, Any]] | str:
    """ShareGPT's {from, value} turns (and LLaMA-Factory's system/tools fields) as OpenAI messages."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list of {from, value} objects"
    messages: list[dict[str, Any]] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            return f"conversations[{i}] must be an object with 'from' and 'value'"
        role = SHAREGPT_ROLES.get(t["from"]) if isinstance(t["from"], str) else None
        if role is None:
            known = ", ".join(sorted(SHAREGPT_ROLES))
            return f"conversations[{i}] has unknown speaker {json.dumps(t['from'])[:40]}; use one of {known}"
        if role == "function_call":  # LLaMA-Factory: the call as a JSON string
            try:
                call = json.loads(t["value"]) if isinstance(t["value"], str) else None
            except ValueError:
                call = None
            if not isinstance(call, dict) or "name" not in call:
                return f"conversations[{i}] (function_call): value must be a JSON object with 'name' and 'arguments'"
            args = call.get("arguments", {})
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": call["name"], "arguments": args}}]})
            continue
        messages.append({"role": role, "content": t["value"]})
    return messages


def _tools_of(row: dict[str, Any]) -> list[dict[str, Any]] | str | None:
    tools = row.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory keeps them as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            return "'tools' is a string that is not JSON"
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "'tools' must be a list of function specs (objects)"
    return tools


def to_example(row: dict[str, Any], fmt: str, where: str, text_column: str, system_prompt: str | None) -> Example | str:
    """An Example, or the reason the row is unusable."""
    own = detect_format(row, text_column)
    if own is not None and own != fmt and not (fmt == "text" and text_column in row):
        return (f"this row is {own} data, but the file is read as {fmt} (decided by its first usable row, or lm.format): "
                "one format per file")
    if fmt in ("chat", "sharegpt", "conversational"):
        tools = _tools_of(row)
        if isinstance(tools, str):
            return tools
        if fmt == "sharegpt":
            converted = sharegpt_messages(row)
            if isinstance(converted, str):
                return converted
            row = {"messages": converted}
        elif fmt == "conversational":  # TRL: prompt and completion as message lists; the loss covers the completion
            prompt, completion = row.get("prompt"), row.get("completion")
            if not isinstance(prompt, list) or not isinstance(completion, list) or not completion:
                return "'prompt' and 'completion' must both be lists of {role, content} messages (TRL's conversational format)"
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
                return "'completion' has no assistant message"
            context = [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt]
            row = {"messages": context + completion}
        problem = chat_problem({**row, "tools": tools})
        if problem:
            return problem
        messages = [dict(m) for m in row["messages"]]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return Example("chat", where, messages=messages, tools=tools)
    if fmt == "prompt-completion":
        for key in ("prompt", "completion"):
            if key not in row:
                return f"no '{key}' field (this file is read as prompt/completion)"
            problem = text_problem(row[key], f"'{key}'")
            if problem:
                return problem
        return Example("prompt-completion", where, prompt=row["prompt"], completion=row["completion"])
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in row:
                return f"no '{key}' field (this file is read as Alpaca: instruction, input, output)"
            problem = text_problem(row[key], f"'{key}'")
            if problem:
                return problem
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            return f"'input' must be a string, got {type(extra).__name__}"
        user = row["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return Example("chat", where, messages=messages)
    if text_column not in row:
        return f"no '{text_column}' field (data.text_column)"
    problem = text_problem(row[text_column], f"'{text_column}'")
    return problem or Example("text", where, text=row[text_column])


def _txt_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"{path}: a data folder for causal-lm must hold .txt files; found none")
        return files
    return [path]


def read_lm_set(path: str, data: Any, lm: Any, name: str) -> LMSet:
    """Read one data file (or a folder of .txt files) with unusable rows collected in `.bad`."""
    from tunesmith.data.readers import decode_text, read_table

    p = Path(path)
    if not p.exists():
        raise UserError(f"data file {p} does not exist")
    if p.is_dir() or p.suffix.lower() == ".txt":
        if lm.format not in ("auto", "text"):
            raise UserError(f"{p}: .txt data is raw text; lm.format is '{lm.format}' (use auto or text)")
        examples, bad = [], []
        for f in _txt_files(p):
            text = decode_text(f)
            problem = text_problem(text, "the file")
            if problem:
                bad.append((f"{f}:1", problem))
                continue
            examples.append(Example("text", f"{f}:1", text=text))
            if data.max_rows and len(examples) >= data.max_rows:
                break
        if not examples:
            raise UserError(f"{p}: no usable text ({len(bad)} empty or unreadable file(s))")
        return LMSet(name, str(p), "text", examples, bad)
    malformed: list[tuple[str, str]] = []
    table = read_table(p, data.max_rows, malformed=malformed)
    fmt = lm.format
    if fmt == "auto":
        fmt = next((f for r in table.rows if (f := detect_format(r, data.text_column))), None)
        if fmt is None:
            cols = ", ".join(table.columns[:8]) or "(none)"
            raise UserError(
                f"{p}: cannot tell the data format from its fields ({cols}); causal-lm reads 'messages' (chat), "
                f"'prompt'+'completion', 'instruction'+'output' (Alpaca) or '{data.text_column}' (raw text); "
                "rename the fields or set lm.format"
            )
    return convert_rows(table, malformed, lambda row, where: to_example(row, fmt, where, data.text_column, lm.system_prompt),
                        name, str(p), fmt)


def convert_rows(table: Any, malformed: list[tuple[str, str]], convert: Any, name: str, source: str, fmt: str) -> LMSet:
    """Every row of a read table through `convert(row, where)` (an example, or why the row is unusable)."""
    examples, bad = [], list(malformed)
    for i, row in enumerate(table.rows):
        ex = convert(row, table.where(i))
        if isinstance(ex, str):
            bad.append((table.where(i), ex))
        else:
            examples.append(ex)
    bad.sort(key=lambda b: line_of(b[0]))
    return LMSet(name, source, fmt, examples, bad)


def line_of(where: str) -> int:
    tail = where.rsplit(":", 1)[-1].rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def split_set(s: LMSet, fractions: dict[str, float], seed: int) -> dict[str, LMSet]:
    """Seeded random split; identical examples stay on the same side (no train/test leak)."""
    import random

    groups: dict[str, list[int]] = {}
    for i, e in enumerate(s.examples):
        groups.setdefault(e.key(), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    need = len(fractions) + 1
    if len(keys) < need:
        raise UserError(f"{s.source} has {len(keys)} distinct example(s); splitting {' and '.join(fractions)} from it "
                        f"needs at least {need}: add examples or give {' and '.join('data.' + n for n in fractions)} file(s)")
    out: dict[str, LMSet] = {}
    start = 0
    for name, frac in fractions.items():
        k = min(max(1, round(len(keys) * frac)), len(keys) - start - (need - 1 - list(fractions).index(name)))
        idx = sorted(i for key in keys[start : start + k] for i in groups[key])
        out[name] = s.subset(idx, name, f"split from {s.source}")
        start += k
    out["train"] = s.subset(sorted(i for key in keys[start:] for i in groups[key]), "train", s.source)
    out["train"].bad = s.bad
    return out


# ---------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class Tokenized:
    ids: list[int]
    trained: list[bool]  # the loss covers this token (as a prediction target)
    answer: list[bool]  # assistant/completion tokens: what truncation must keep


def chat_template_of(tokenizer: Any, setting: str | None) -> str:
    """The template conversations are rendered with: the model's own, `default`, or a .jinja file."""
    if setting in (None, "model"):
        return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if setting == "default":
        return DEFAULT_CHAT_TEMPLATE
    p = Path(setting)
    if p.suffix == ".jinja" or (len(setting) < 4096 and "{" not in setting and p.exists()):
        if not p.exists():
            raise UserError(f"lm.chat_template: {p} does not exist")
        try:
            template, where = p.read_text(encoding="utf-8"), str(p)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"lm.chat_template: cannot read {p}: {e}") from None
    else:
        template, where = setting, "lm.chat_template"  # the template itself, inline
    check_template(template, where)
    return template


def check_template(template: str, where: str) -> None:
    """A chat template that Jinja cannot compile, named with its line, before anything is rendered."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError as e:
        raise UserError(f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _render(tokenizer: Any, template: str, messages: list[dict[str, Any]], gen: bool = False,
            tools: list[dict[str, Any]] | None = None) -> str:
    keep = ("role", "content", "tool_calls", "tool_call_id", "name")
    msgs = [{k: (v if k != "content" or v is not None else "") for k, v in m.items() if k in keep} for m in messages]
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen, **extra)


def renders_tools(template: str) -> bool:
    """Whether a chat template renders tool specs and tool calls at all (it names them)."""
    return "tools" in template or "tool_calls" in template


def tokenize_chat(tokenizer: Any, template: str, messages: list[dict[str, Any]], loss_on: str,
                  tools: list[dict[str, Any]] | None = None) -> Tokenized:
    """Render with the template and label the tokens of each trained assistant turn (+ its end-of-turn)."""
    full = _render(tokenizer, template, messages, tools=tools)
    eos = tokenizer.eos_token or ""
    spans: list[tuple[int, int, bool]] = []  # character ranges of trained text in `full`; True: EOS goes after it
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prefix = _render(tokenizer, template, messages[:i], gen=True, tools=tools) if i else ""
        except Exception:  # noqa: BLE001 - a template that refuses a conversation starting with the assistant
            prefix = ""
        if not full.startswith(prefix):
            raise UserError(
                "the chat template renders the start of a conversation differently from the whole of it, so assistant "
                "turns cannot be located; set lm.chat_template: default (or a template of your own)"
            )
        if m.get("tool_calls"):  # the call is written by the template: the whole turn after the generation prompt
            turn = _render(tokenizer, template, messages[: i + 1], tools=tools)
            if not full.startswith(turn):
                raise UserError("the chat template renders the start of a conversation differently from the whole of it, so "
                                "assistant turns cannot be located; set lm.chat_template (or a template of your own)")
            if m.get("weight", 1) == 0:
                continue
            seg = full[len(prefix) : len(turn)]
            k = seg.rfind(eos) if eos else -1
            if k >= 0:
                spans.append((len(prefix), len(prefix) + k + len(eos), False))
            else:
                spans.append((len(prefix), len(prefix) + len(seg.rstrip()), bool(eos)))
            continue
        content = m["content"]
        start = full.find(content, len(prefix))
        if start < 0:
            content = content.strip()
            start = full.find(content, len(prefix))
        if start < 0:
            raise UserError("the chat template changes the assistant's text beyond trimming; set lm.chat_template: default")
        end = start + len(content)
        if m.get("weight", 1) == 0:
            continue
        turn_end = len(_render(tokenizer, template, messages[: i + 1], tools=tools))
        k = full.find(eos, end, max(turn_end, end + len(eos))) if eos else -1
        if eos and k >= 0 and not full[end:k].strip():
            spans.append((start, k + len(eos), False))
        else:
            spans.append((start, end, bool(eos)))
    if any(ins for _, _, ins in spans):  # the text again, with EOS after those turns; later spans shift
        parts, last, shift, moved = [], 0, 0, []
        for s, e, ins in spans:
            moved.append((s + shift, e + shift + (len(eos) if ins else 0), False))
            if ins:
                parts.append(full[last:e] + eos)
                shift += len(eos)
                last = e
        parts.append(full[last:])
        full, spans = "".join(parts), moved
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts = [s for s, _, _ in spans]
    answer = []
    for (a, b) in offsets:  # a token that overlaps a trained span is trained (" turn" after "Assistant:")
        j = bisect.bisect_right(starts, b - 1) - 1
        answer.append(b > a and j >= 0 and a < spans[j][1])
    trained = [True] * len(ids) if loss_on == "all" else list(answer)
    return Tokenized(ids, trained, answer)


def tokenize_prompt_completion(tokenizer: Any, prompt: str, completion: str, loss_on: str) -> Tokenized:
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = p + c + eos
    answer = [False] * len(p) + [True] * (len(c) + len(eos))
    return Tokenized(ids, [True] * len(ids) if loss_on == "all" else list(answer), answer)


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def fit(t: Tokenized, max_length: int) -> tuple[Tokenized | None, bool]:
    """(the example cut to max_length, whether it was cut); None when even the last answer does not fit.

    The prompt is cut from the left (the oldest context goes first) so that the last answer and
    at least one token before it stay whole.
    """
    n = len(t.ids)
    if n <= max_length:
        return t, False
    last = max(i for i, a in enumerate(t.answer) if a) + 1 if any(t.answer) else n
    first = last - 1
    while first > 0 and t.answer[first - 1]:
        first -= 1
    start = max(0, last - max_length)
    if start >= first:  # the last answer (with one prompt token) is longer than max_length
        return None, True
    return Tokenized(t.ids[start:last], t.trained[start:last], t.answer[start:last]), True


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
        else:
            rows.append([i])
            r, room = len(rows) - 1, capacity - n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows
