"""Batched generation for `tunesmith serve`'s chat API.

On a CPU a 135M-parameter model spends most of a decoding step in per-layer overheads, not in
arithmetic, so 16 answers advance one token in about the time one does. The worker thread takes
the first waiting request, collects those that arrive within `window_ms` (up to `max_batch`),
and generates them together: prompts left-padded, one forward pass per step over the batch with
a shared KV cache, each row sampled with its own temperature, top-p, top-k, repetition penalty
and seed. A row that ends (EOS, its max_tokens, a stop string, or a client that left) is dropped
from the batch and its cache rows with it. Requests that arrive while a batch runs join it at the
next step (continuous batching, as vLLM does): their prompts are prefilled apart and their cache
rows left-padded and stacked under the running ones. One forward pass at a time, always.

Events go back to each request's asyncio queue: ('start', prompt_tokens) once its prompt is
encoded and fits, then ('piece', text)..., then ('end', stopped_at_eos, usage); or ('error', e).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.errors import UserError


# How long a request may wait for the running batch to let it in when fewer than 4 are waiting.
# With 16 clients on SmolLM2 (2 cores), admitting every newcomer at once cost throughput: each prefill
# is a forward pass of its own (76-88 answer tokens/s against 93 for static batches).
ADMIT_WAIT_S = 0.25


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class Row:
    """One request inside a generation batch."""

    messages: list[dict[str, str]]
    options: dict[str, Any]
    cancel: threading.Event
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded answer already sent
    stopped: bool = False  # ended with an end-of-turn token
    done: bool = False
    generator: torch.Generator | None = None
    arrived: float = field(default_factory=time.perf_counter)

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, event)


def sample(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """The next token of each row, by transformers' order: repetition penalty, temperature, top-k, top-p."""
    picks = []
    for lg, row in zip(logits, rows):
        o = row.options
        lg = lg.clone()
        if o["repetition_penalty"] != 1.0:
            seen = torch.tensor(row.ids + row.tokens, device=lg.device).unique()
            vals = lg[seen]
            lg[seen] = torch.where(vals < 0, vals * o["repetition_penalty"], vals / o["repetition_penalty"])
        if o["temperature"] == 0:
            picks.append(int(lg.argmax()))
            continue
        lg = lg / o["temperature"]
        if 0 < o["top_k"] < lg.numel():
            lg[lg < torch.topk(lg, o["top_k"]).values[-1]] = float("-inf")
        if o["top_p"] < 1.0:
            order = torch.argsort(lg, descending=True)
            cum = torch.softmax(lg[order], -1).cumsum(-1)
            drop = cum - torch.softmax(lg[order], -1) > o["top_p"]  # keep the smallest set reaching top_p
            lg[order[drop]] = float("-inf")
        picks.append(int(torch.multinomial(torch.softmax(lg, -1), 1, generator=row.generator)))
    return torch.tensor(picks, dtype=torch.long)


class ChatWorker:
    """Chat requests, batched, on one thread (see the module doc)."""

    def __init__(self, chat_model: Any, max_queue: int, context: int, max_batch: int = 16, window_ms: float = 20.0):
        self.chat, self.max_queue, self.context = chat_model, max_queue, context
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.jobs: queue.Queue[Row] = queue.Queue()
        self.tokenizer = chat_model.tokenizer
        eos = chat_model.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos.discard(None)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        self.batches = self.rows = 0
        self.steps = self.row_steps = 0  # decoding steps, and rows summed over them: the mean batch
        self.active: list[Row] = []
        self.device = next(chat_model.model.parameters()).device
        threading.Thread(target=self._work, name="tunesmith-chat", daemon=True).start()

    def submit(self, messages: list[dict[str, str]], options: dict[str, Any], cancel: threading.Event) -> asyncio.Queue:
        if self.jobs.qsize() >= self.max_queue:
            raise ApiError(503, f"the server has {self.max_queue} requests waiting; retry later", kind="server_busy")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self.jobs.put(Row(messages, options, cancel, out, loop))
        return out

    def _encode(self, row: Row) -> bool:
        """The prompt's ids on the row; False (and an error event) when it cannot be served."""
        try:
            ids = self.chat.encode(row.messages)[0].tolist()
        except UserError as e:
            row.emit("error", ApiError(400, str(e), "messages"))
            return False
        except Exception as e:  # noqa: BLE001 - the chat template refused these messages (jinja2's TemplateError)
            row.emit("error", ApiError(400, f"the model's chat template refused these messages: {e}", "messages"))
            return False
        n, want = len(ids), row.options["max_new_tokens"]
        if self.context and n + want > self.context:
            row.emit("error", ApiError(400, f"the prompt is {n} tokens; with max_tokens {want} that is over the model's "
                                            f"context of {self.context} tokens: shorten the messages or lower max_tokens",
                                       "messages"))
            return False
        row.ids = ids
        if row.options.get("seed") is not None:
            row.generator = torch.Generator().manual_seed(int(row.options["seed"]))
        row.emit("start", n)
        return True

    def _collect(self, first: Row) -> list[Row]:
        rows, deadline = [first], time.perf_counter() + self.window
        while len(rows) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                rows.append(self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait())
            except queue.Empty:
                break
        return [r for r in rows if not r.cancel.is_set() and self._encode(r)]

    def _work(self) -> None:
        while True:
            rows = self._collect(self.jobs.get())
            if not rows:
                continue
            self.active = list(rows)  # with the rows admitted while it runs
            self.batches += 1
            self.rows += len(rows)
            try:
                with torch.no_grad():
                    self._generate(rows)
            except BaseException as e:  # noqa: BLE001 - the batch's requests get the error, the worker lives on
                for r in self.active:
                    if not r.done:
                        r.emit("error", e)

    def _step_rows(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Sample, stream and close rows; returns the sampled tokens."""
        toks = sample(logits, rows)
        for row, t in zip(rows, toks.tolist()):
            row.tokens.append(t)
            if t in self.eos:
                row.stopped = row.done = True
            else:
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                if len(text) > row.sent and not text.endswith("\ufffd"):  # a partial UTF-8 character waits
                    row.emit("piece", text[row.sent :])
                    row.sent = len(text)
            if len(row.tokens) >= row.options["max_new_tokens"] or row.cancel.is_set():
                row.done = True
            if row.done:
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                if len(text) > row.sent:
                    row.emit("piece", text[row.sent :])
                usage = {"prompt_tokens": len(row.ids), "completion_tokens": len(row.tokens),
                         "total_tokens": len(row.ids) + len(row.tokens)}
                row.emit("end", row.stopped, usage)
        return toks

    def _prefill(self, rows: list[Row]) -> "_Batch":
        """The prompts, left-padded, through the model in one pass; each row's first token sampled."""
        from transformers import DynamicCache

        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(r.ids) :] = torch.tensor(r.ids)
            mask[i, width - len(r.ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.chat.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 position_ids=pos.to(self.device), past_key_values=cache, use_cache=True,
                                 logits_to_keep=1).logits[:, -1].float().cpu()
        batch = _Batch(list(rows), cache, mask, self._step_rows(rows, logits), pos[:, -1] + 1)
        batch.drop_finished(self.device)
        return batch

    def _admit(self, batch: "_Batch") -> None:
        """Requests waiting now join the running batch (continuous batching): their prompts are
        prefilled apart, then their cache is left-padded to the batch's length and stacked under it.
        A prefill is a forward pass of its own, so newcomers are let in together: when the batch is
        less than half full, when 4 wait, or when the first has waited ADMIT_WAIT_S."""
        room, new = self.max_batch - len(batch.rows), []
        waiting = self.jobs.qsize()
        if not room or not waiting:
            return
        try:
            oldest = self.jobs.queue[0].arrived
        except IndexError:
            return
        if (len(batch.rows) >= self.max_batch // 2 and waiting < min(room, 4)
                and time.perf_counter() - oldest < ADMIT_WAIT_S):
            return
        while len(new) < room:
            try:
                row = self.jobs.get_nowait()
            except queue.Empty:
                break
            if not row.cancel.is_set() and self._encode(row):
                new.append(row)
        if not new:
            return
        self.active += new
        self.rows += len(new)
        batch.merge(self._prefill(new))

    def _generate(self, rows: list[Row]) -> None:
        self.device = next(self.chat.model.parameters()).device
        batch = self._prefill(rows)
        while batch.rows:
            self._admit(batch)
            if not batch.rows:
                return
            batch.mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long)], 1)
            logits = self.chat.model(input_ids=batch.toks[:, None].to(self.device), attention_mask=batch.mask.to(self.device),
                                     position_ids=batch.nxt[:, None].to(self.device), past_key_values=batch.cache,
                                     use_cache=True).logits[:, -1].float().cpu()
            batch.nxt = batch.nxt + 1
            self.steps += 1
            self.row_steps += len(batch.rows)
            batch.toks = self._step_rows(batch.rows, logits)
            batch.drop_finished(self.device)


@dataclass
class _Batch:
    """The rows generating together: their KV cache, attention mask, last tokens and next positions."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    toks: torch.Tensor
    nxt: torch.Tensor

    def drop_finished(self, device: torch.device) -> None:
        """Rows that ended leave the batch, and the cache."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index.to(device))
        self.mask, self.toks, self.nxt = self.mask[index], self.toks[index], self.nxt[index]

    def merge(self, other: "_Batch") -> None:
        """`other`'s rows under these: both caches and masks left-padded to the longer length."""
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.cache, self.mask, self.toks, self.nxt = other.rows, other.cache, other.mask, other.toks, other.nxt
            return
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = width - t.shape[dim]
            if not extra:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], 0)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], 0)
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], 0)
        self.rows += other.rows
        self.toks = torch.cat([self.toks, other.toks])
        self.nxt = torch.cat([self.nxt, other.nxt])


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class ChatStream:
    """One chat request in flight: `await start()` (raises ApiError for a bad prompt), then `async for`
    over ('text', piece) events and a last ('end', finish_reason, usage). Stop strings end it early
    and are not part of the answer (OpenAI's behaviour); `close()` cancels generation."""

    def __init__(self, worker: ChatWorker, messages: list[dict[str, str]], options: dict[str, Any], stops: list[str]):
        self.cancel = threading.Event()
        self.stops = stops
        self.out = worker.submit(messages, options, self.cancel)

    async def start(self) -> None:
        try:
            event = await self.out.get()
        except BaseException:
            self.cancel.set()
            raise
        if event[0] == "error":
            raise event[1]

    def close(self) -> None:
        self.cancel.set()

    async def __aiter__(self) -> AsyncIterator[tuple]:
        pending = ""
        try:
            while True:
                event = await self.out.get()
                if event[0] == "error":
                    raise event[1]
                if event[0] == "end":
                    if pending:
                        yield ("text", pending)
                    yield ("end", "stop" if event[1] else "length", event[2])
                    return
                pending += event[1]
                hit = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
                if hit >= 0:
                    self.cancel.set()
                    if pending[:hit]:
                        yield ("text", pending[:hit])
                    while (event := await self.out.get())[0] == "piece":
                        pass  # the token in progress when generation was asked to stop
                    yield ("end", "stop", event[2] if event[0] == "end" else {})
                    return
                keep = held_back(pending, self.stops) if self.stops else 0
                if len(pending) > keep:
                    yield ("text", pending[: len(pending) - keep])
                    pending = pending[len(pending) - keep :]
        finally:
            self.cancel.set()
