"""Preference data: which of two answers to a prompt is better (DPO and its relatives), or one
answer marked good or bad (KTO).

Formats (decided per file from the first usable row, or set with `preference.format`):

- paired (TRL's preference format): `prompt`, `chosen`, `rejected`. Either all three strings
  (plain text: prompt and answer are joined with no chat template, the answer ends with EOS, as
  for `prompt-completion`), or message lists (TRL's conversational form: `prompt` the
  conversation so far, `chosen` / `rejected` the assistant turn(s) that follow; rendered with
  the chat template). Without `prompt`, message-list `chosen` and `rejected` are whole
  conversations and their common start is the prompt (TRL's implicit prompt).
- openai (OpenAI's preference fine-tuning JSONL): `input.messages` (and `input.tools`),
  `preferred_output` and `non_preferred_output`, each a list holding the assistant message.
- unpaired (TRL's KTO form): `prompt`, `completion`, `label` (true: a good answer, false: a bad
  one); only `preference.loss: kto` reads it. KTO reads paired files too: a pair is one good and
  one bad answer.

Rows are checked here and every unusable one is named by file and line: a missing or empty side,
chosen and rejected identical, roles out of order or a non-assistant answer, a label that is not
true/false, a row of another format than the file's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunesmith.data.chat import LMSet, chat_problem, convert_rows
from tunesmith.data.text import text_problem
from tunesmith.errors import UserError

PREF_FORMATS = ("paired", "openai", "unpaired")


@dataclass
class PrefExample:
    """One preference row: a prompt (text, or the messages so far) and its answers.

    Paired rows have `chosen` and `rejected`; unpaired rows have `chosen` alone with `label`.
    A conversational answer is a list of assistant messages; a plain one a string."""

    where: str  # file:line
    prompt: str | list[dict[str, Any]]
    chosen: str | list[dict[str, Any]]
    rejected: str | list[dict[str, Any]] | None = None
    label: bool | None = None  # unpaired rows: True desirable, False undesirable
    tools: list[dict[str, Any]] | None = None
    kind: str = "preference"

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)

    def key(self) -> str:
        """What makes two rows the same (duplicates, train/test overlap)."""
        return json.dumps([self.prompt, self.chosen, self.rejected, self.label], ensure_ascii=False, sort_keys=True)

    def prompt_messages(self) -> list[dict[str, Any]] | str:
        """What a model is asked (the samples the base and tuned models answer)."""
        return self.prompt

    def reference(self) -> str:
        """The preferred answer, as text (a bad unpaired answer is no reference: empty)."""
        if self.label is False:
            return ""
        return answer_text(self.chosen)

    def unpaired(self) -> list["PrefExample"]:
        """A pair as KTO reads it: the chosen answer good, the rejected one bad."""
        if self.rejected is None:
            return [self]
        return [PrefExample(self.where, self.prompt, self.chosen, None, True, self.tools),
                PrefExample(self.where, self.prompt, self.rejected, None, False, self.tools)]


def answer_text(answer: str | list[dict[str, Any]]) -> str:
    if isinstance(answer, str):
        return answer
    return "\n".join(str(m.get("content") or "") for m in answer)


def detect_pref_format(row: dict[str, Any]) -> str | None:
    if "preferred_output" in row or "non_preferred_output" in row:
        return "openai"
    if "chosen" in row or "rejected" in row:
        return "paired"
    if "completion" in row and "label" in row:
        return "unpaired"
    return None


def _answer_problem(value: Any, what: str) -> str | None:
    """An answer: a non-empty string, or a list of assistant messages with content."""
    if isinstance(value, list):
        if not value:
            return f"'{what}' is an empty list: it needs the assistant message"
        for i, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                role = m.get("role") if isinstance(m, dict) else type(m).__name__
                return f"'{what}'[{i}] must be an assistant message (role 'assistant'), got {json.dumps(role)[:40]}"
            problem = text_problem(m.get("content"), f"'{what}'[{i}] content")
            if problem:
                return problem
        return None
    if value is None:
        return f"no '{what}' field"
    return text_problem(value, f"'{what}'")


def _conversation_problem(prompt: list[Any], answer: list[dict[str, Any]], what: str) -> str | None:
    """The prompt followed by this answer must be a valid conversation (roles in order, a user turn before)."""
    problem = chat_problem({"messages": [*prompt, *answer]})
    if problem:
        return f"prompt + {what}: {problem}"
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in prompt):
        return "the prompt has no user message"
    return None


def _split_implicit(chosen: list[Any], rejected: list[Any]) -> tuple[list[Any], list[Any], list[Any]] | str:
    """TRL's implicit prompt: two whole conversations; their common start is the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and isinstance(chosen[n - 1], dict) and chosen[n - 1].get("role") == "assistant":
        n -= 1  # the answers start at the first assistant turn after the shared context
    if n == 0:
        return "'chosen' and 'rejected' share no prompt (no 'prompt' field, and the conversations start differently)"
    return chosen[:n], chosen[n:], rejected[n:]


def to_pref_example(row: dict[str, Any], fmt: str, where: str, system_prompt: str | None) -> PrefExample | str:
    """A PrefExample, or the reason the row is unusable."""
    own = detect_pref_format(row)
    if own is not None and own != fmt:
        return f"this row is {own} preference data, but the file is read as {fmt} (decided by its first usable row): one format per file"
    tools = row.get("tools")
    if fmt == "openai":
        inp = row.get("input")
        if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list):
            return "'input' must be an object with 'messages' (OpenAI's preference format)"
        prompt, tools = inp["messages"], inp.get("tools")
        chosen, rejected = row.get("preferred_output"), row.get("non_preferred_output")
        names = ("preferred_output", "non_preferred_output")
    elif fmt == "unpaired":
        prompt, chosen, rejected, names = row.get("prompt"), row.get("completion"), None, ("completion", "")
        if not isinstance(row.get("label"), bool):
            return f"'label' must be true or false (a good or a bad answer), got {json.dumps(row.get('label'))[:40]}"
    else:
        prompt, chosen, rejected, names = row.get("prompt"), row.get("chosen"), row.get("rejected"), ("chosen", "rejected")
        if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
            split = _split_implicit(chosen, rejected)
            if isinstance(split, str):
                return split
            prompt, chosen, rejected = split
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "'tools' must be a list of function specs (objects)"
    for value, what in ((chosen, names[0]), (rejected, names[1])):
        if what:
            problem = _answer_problem(value, what)
            if problem:
                return problem
    answers = [a for a in (chosen, rejected) if a is not None]
    if isinstance(prompt, list):
        if not all(isinstance(a, list) for a in answers):
            return "the prompt is a list of messages, so the answers must be lists of assistant messages too"
        prompt = [dict(m) if isinstance(m, dict) else m for m in prompt]
        if system_prompt and prompt and isinstance(prompt[0], dict) and prompt[0].get("role") != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        for a, what in zip(answers, names):
            problem = _conversation_problem(prompt, a, what)
            if problem:
                return problem
    else:
        problem = text_problem(prompt, "'prompt'")
        if problem:
            return problem
        if not all(isinstance(a, str) for a in answers):
            return "the prompt is a string, so the answers must be strings too (or give the prompt as a list of messages)"
    if rejected is not None and answer_text(chosen).strip() == answer_text(rejected).strip():
        return f"'{names[0]}' and '{names[1]}' are identical: a pair must differ to say which is better"
    return PrefExample(where, prompt, chosen, rejected, row.get("label") if fmt == "unpaired" else None, tools)


def read_pref_set(path: str, data: Any, fmt: str, system_prompt: str | None, name: str) -> LMSet:
    """One preference file with its unusable rows collected in `.bad`."""
    from pathlib import Path

    from tunesmith.data.readers import read_table

    p = Path(path)
    if not p.exists():
        raise UserError(f"data file {p} does not exist")
    if p.is_dir() or p.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise UserError(f"{p}: preference data is JSON lines (or Parquet): one pair an object, with prompt/chosen/rejected "
                        "(TRL), input/preferred_output/non_preferred_output (OpenAI) or prompt/completion/label (KTO)")
    malformed: list[tuple[str, str]] = []
    table = read_table(p, data.max_rows, malformed=malformed)
    if fmt == "auto":
        fmt = next((f for r in table.rows if isinstance(r, dict) and (f := detect_pref_format(r))), None)
        if fmt is None:
            cols = ", ".join(table.columns[:8]) or "(none)"
            raise UserError(f"{p}: cannot tell the preference format from its fields ({cols}); the preference task reads "
                            "prompt+chosen+rejected (TRL), input+preferred_output+non_preferred_output (OpenAI) or "
                            "prompt+completion+label (KTO); rename the fields or set preference.format")
    return convert_rows(table, malformed, lambda row, where: to_pref_example(row, fmt, where, system_prompt)
                        if isinstance(row, dict) else "a row must be a JSON object", name, str(p), fmt)
