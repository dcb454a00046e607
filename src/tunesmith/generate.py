"""Use a tuned language model: `tunesmith generate` and `tunesmith chat`.

`ChatModel` loads a causal-lm or preference run directory (its merged `model/`), a plain Hugging Face
directory, or a packaged model name, and answers a prompt or a conversation with the chat
template the model was trained with. Tokens stream to the terminal as they are generated.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import UserError
from tunesmith.runlock import check_not_failed


def _check_causal(model_dir: Path) -> None:
    """A model directory whose config names only encoder or classifier classes is not a language model to generate with."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}/config.json cannot be read: {e}") from None
    archs = cfg.get("architectures") or [] if isinstance(cfg, dict) else []
    if archs and not cfg.get("is_decoder") and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                                          for a in archs):
        raise UserError(f"{model_dir} does not hold a causal language model (its config names {', '.join(archs)}); "
                        "generate and chat need a causal-lm run or a decoder model directory")


class ChatModel:
    def __init__(self, source: str | Path, device: str | None = None, system_prompt: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = Path(source)
        check_not_failed(path)
        if (path / "model" / "config.json").exists():
            model_dir = path / "model"
        elif (path / "config.json").exists():
            model_dir = path
        elif path.exists():
            raise UserError(f"{source} is not a finished causal-lm run or a model directory (no model/config.json)")
        else:
            from tunesmith.models.resolve import resolve_model

            model_dir = resolve_model(str(source)).path
        self.model_dir = model_dir
        run_cfg = path / "config.yaml"
        self.system_prompt = system_prompt
        if system_prompt is None and run_cfg.exists():
            import yaml

            cfg = yaml.safe_load(run_cfg.read_text(encoding="utf-8"))
            if cfg.get("task") not in ("causal-lm", "preference"):
                raise UserError(f"{source} is a {cfg.get('task')} run; generate and chat need a causal-lm or preference run "
                                "(use `tunesmith predict` for classifiers)")
            self.system_prompt = (cfg.get("lm") or {}).get("system_prompt")
        _check_causal(model_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in our output
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            try:
                self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            except ValueError as e:
                raise UserError(f"{model_dir} does not hold a causal language model: {str(e).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def encode(self, conversation: str | list[dict[str, str]], raw: bool = False) -> torch.Tensor:
        """The prompt's token ids (1, n): the chat template with the generation prompt, or plain text with `raw`."""
        if raw:
            if not isinstance(conversation, str):
                raise UserError("--raw takes a plain text prompt")
            return self.tokenizer(conversation, return_tensors="pt")["input_ids"]
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else list(conversation)
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if not self.tokenizer.chat_template:
            raise UserError(f"{self.model_dir} has no chat template; pass --raw to continue plain text")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]

    def stream(self, conversation: str | list[dict[str, str]] | torch.Tensor, *, max_new_tokens: int = 256, temperature: float = 0.7,
               top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0, seed: int | None = None,
               raw: bool = False) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated (temperature 0: greedy)."""
        from transformers import TextIteratorStreamer

        ids = (conversation if isinstance(conversation, torch.Tensor) else self.encode(conversation, raw)).to(self.device)
        if seed is not None:
            torch.manual_seed(seed)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict[str, Any] = {
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens,
            "streamer": streamer, "pad_token_id": self.tokenizer.pad_token_id, "repetition_penalty": repetition_penalty,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        error: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self.last_output = self.model.generate(**kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                error.append(e)
                streamer.end()

        t = threading.Thread(target=work, daemon=True)
        t.start()
        yield from streamer
        t.join()
        if error:
            raise error[0]
        self.last_prompt_tokens = ids.shape[1]
        self.last_completion_tokens = self.last_output.shape[1] - ids.shape[1]

    def generate(self, conversation: str | list[dict[str, str]], **kwargs: Any) -> str:
        return "".join(self.stream(conversation, **kwargs)).strip()

    @property
    def stopped(self) -> bool:
        """Whether the last answer ended with an end-of-turn token (rather than the token limit)."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return int(self.last_output[0, -1]) in eos


def chat_loop(model: ChatModel, options: dict[str, Any], input_fn: Any = input, out: Any = sys.stdout) -> int:
    """An interactive multi-turn session: /reset starts over, /exit (or Ctrl-D) ends it."""
    history: list[dict[str, str]] = []
    out.write(f"chatting with {model.model_dir} (/reset to start over, /exit to leave)\n")
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            out.write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("assistant> ")
        out.flush()
        pieces = []
        for piece in model.stream(history, **options):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
