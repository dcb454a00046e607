"""`tunesmith export RUN --format gguf`: a Llama-family chat run as one GGUF file for llama.cpp and
Ollama, with an Ollama `Modelfile` beside it, checked against the PyTorch model.

The file is written with the `gguf` package (llama.cpp's own writer) the way llama.cpp's
`convert_hf_to_gguf.py` writes a Llama: its tensor names, Q/K rows permuted for its rotary layout,
norms in float32, the other matrices in f16 or q8_0. The metadata carries what generation needs to
stop and to format a conversation: the byte-level BPE vocabulary and merges, the BOS/EOS/padding
ids, and the chat template (`tokenizer.chat_template`).

The check, before anything is kept: transformers loads the GGUF back (it dequantizes to float32)
and the loaded model must give the same logits, within 1e-4, as the PyTorch model with the same
rounding applied to its weights; that proves names, permutation, shapes and metadata. Then the
greedy answers to sample prompts are compared with the unrounded PyTorch model's, which measures
what f16 or q8_0 costs; both figures go to `export.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.runfiles import export_folder, run_settings

FILE_ATOL = 1e-4  # GGUF read back vs the same-rounded PyTorch model: the file itself must be exact
SUPPORTED = ("llama", "mistral")  # llama.cpp writes both as `llama`
TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_CONTROL = 1, 4, 3


def _model_dir(run: Path) -> Path:
    model_dir = run / "model" if (run / "model" / "config.json").exists() else run
    if not (model_dir / "config.json").exists():
        raise UserError(f"{run} is not a finished run or a model directory (no model/config.json)")
    return model_dir


def check_llama(config: Any) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(f"GGUF export writes Llama-family models ({', '.join(SUPPORTED)}); this run's model is "
                        f"'{kind}'" + (" (a classifier: use --format onnx)" if kind in ("bert", "timm", None) else ""))
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"GGUF export does not write rope scaling '{rope.get('rope_type')}' yet; this model uses it")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export writes Llama layers without biases; this model has attention or MLP biases")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qtype(w: np.ndarray, quantize: str) -> Any:
    import gguf

    if w.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if quantize == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def gguf_tensors(model: torch.nn.Module, quantize: str) -> list[tuple[str, np.ndarray, Any, str]]:
    """(gguf name, data to write, its type, the HF name) for every weight, in llama.cpp's layout."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    out = []
    for hf, t in state.items():
        if tied and hf == "lm_head.weight":
            continue
        if "rotary_emb" in hf:
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export does not know where the tensor '{hf}' goes in llama.cpp's layout")
        w = t.detach().float().cpu().numpy()
        if hf.endswith("q_proj.weight"):
            w = permute(w, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            w = permute(w, cfg.num_key_value_heads)
        qtype = _qtype(w, quantize)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            data = gguf.quants.quantize(w, qtype)
        else:
            data = w.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
        out.append((name, data, qtype, hf))
    return out


def rounded_model(model: torch.nn.Module, tensors: list[tuple[str, np.ndarray, Any, str]]) -> torch.nn.Module:
    """The PyTorch model with each weight rounded as the GGUF file stores it (f16, or q8_0's blocks of
    32 along a row), computed from the Hugging Face weights themselves, so that a wrong name,
    permutation or shape in the file cannot hide in the reference too."""
    import copy

    import gguf

    ref = copy.deepcopy(model)
    state = ref.state_dict()
    for _name, _data, qtype, hf in tensors:
        w = state[hf].detach().float().cpu().numpy()
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w = w.astype(np.float16).astype(np.float32)
        state[hf].copy_(torch.from_numpy(np.ascontiguousarray(w)).reshape(state[hf].shape))
    if getattr(model.config, "tie_word_embeddings", False):
        ref.tie_weights()
    return ref.eval()


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (`tokenizer.ggml.pre`)."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM/SmolLM2: digits one by one, then GPT-2's split
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if types == ["Split", "ByteLevel"] and "p{N}{1,3}" in json.dumps(parts[0]):
        return "llama-bpe"
    return "default"


def vocab_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Tokens, their types and the merges of a byte-level BPE tokenizer, as llama.cpp writes them."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer") or spec.get("decoder")):
        raise UserError("GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, GPT-2 style); this model's "
                        f"tokenizer is {model.get('type')}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_USER_DEFINED)
        else:
            tokens.append(tok)
            types.append((TOKEN_CONTROL if added[tok].special else TOKEN_USER_DEFINED) if tok in added else TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(tokenizer)}


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's, then the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


def write_gguf(path: Path, model: Any, tokenizer: Any, tensors: list, quantize: str, name: str) -> dict[str, Any]:
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    vocab = vocab_metadata(tokenizer, cfg.vocab_size)
    eos = eos_ids(model, tokenizer)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    specials = {"bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id}
    if specials["bos"] is not None:
        w.add_bos_token_id(specials["bos"])
    w.add_eos_token_id(eos[0])
    if len(eos) > 1:
        w.add_eot_token_id(eos[1])
    if specials["pad"] is not None:
        w.add_pad_token_id(specials["pad"])
    if specials["unk"] is not None:
        w.add_unk_token_id(specials["unk"])
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    for tname, data, qtype, _hf in tensors:
        w.add_tensor(tname, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"eos_token_ids": eos, "pre_tokenizer": vocab["pre"], "vocab_size": cfg.vocab_size}


def sample_prompts(run: Path, n: int = 4) -> list[str]:
    """The first user turns of the run's test (else validation) conversations; fixed prompts otherwise."""
    prompts: list[str] = []
    data = run_settings(run).get("data") or {}
    for split in ("test", "validation"):
        path = Path(data.get(split) or "")
        if not data.get(split) or not path.is_file() or path.suffix != ".jsonl":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            msgs = row.get("messages") if isinstance(row, dict) else None
            user = next((m.get("content") for m in msgs or [] if isinstance(m, dict) and m.get("role") == "user"), None)
            user = user if isinstance(user, str) else (row.get("prompt") if isinstance(row, dict) else None)
            if isinstance(user, str) and user.strip() and user not in prompts:
                prompts.append(user)
            if len(prompts) >= n:
                return prompts
    return prompts or ["What is a computer?", "Tell me a joke.", "How do I reset my password?", "Hello!"][:n]


def _greedy(model: Any, ids: torch.Tensor, eos: list[int], pad: int, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


def verify(path: Path, model: Any, tokenizer: Any, tensors: list, prompts: list[str], eos: list[int],
           max_new_tokens: int = 48) -> dict[str, Any]:
    """Load the GGUF back with transformers and compare it with the PyTorch model (see the module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in our output
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        loaded_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    finally:
        hf_logging.set_verbosity(verbosity)
    ref = rounded_model(model, tensors)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    diffs, file_same, fp32_same, stopped, fp32_stopped, text_same, common = [], 0, 0, 0, 0, 0, []
    for p in prompts:
        messages = [{"role": "user", "content": p}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text_same += loaded_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
        with torch.no_grad():
            diffs.append(float((loaded(ids).logits - ref(ids).logits).abs().max()))
        got, want, orig = (_greedy(m, ids, eos, pad, max_new_tokens) for m in (loaded, ref, model))
        file_same += got == want
        fp32_same += got == orig
        common.append(next((i for i, (a, b) in enumerate(zip(got, orig)) if a != b), min(len(got), len(orig))))
        stopped += bool(got) and got[-1] in eos
        fp32_stopped += bool(orig) and orig[-1] in eos
    loaded_eos = loaded.generation_config.eos_token_id
    loaded_eos = set(loaded_eos if isinstance(loaded_eos, list) else [loaded_eos]) | {loaded_tok.eos_token_id}
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "max_abs_logit_diff": max(diffs),
            "greedy_same_as_rounded": file_same, "greedy_same_as_float32": fp32_same,
            "greedy_tokens_before_divergence": round(sum(common) / len(common), 1),
            "stopped_at_eos": stopped, "float32_stopped_at_eos": fp32_stopped,
            "eos_in_metadata": eos[0] in loaded_eos,
            "chat_template_same": loaded_tok.chat_template == tokenizer.chat_template,
            "vocab_same": all(loaded_tok.convert_tokens_to_ids(t) == i for t, i in tokenizer.get_vocab().items()),
            "prompt_tokens_same": text_same}


def _problems(check: dict[str, Any]) -> list[str]:
    bad = []
    if check["max_abs_logit_diff"] > FILE_ATOL:
        bad.append(f"logits differ from the same-rounded PyTorch model by {check['max_abs_logit_diff']:.2e} "
                   f"(tolerance {FILE_ATOL:.0e})")
    if check["greedy_same_as_rounded"] != check["prompts"]:
        bad.append(f"greedy answers differ on {check['prompts'] - check['greedy_same_as_rounded']} of "
                   f"{check['prompts']} prompts")
    for key, what in (("eos_in_metadata", "the end-of-turn token"), ("chat_template_same", "the chat template"),
                      ("vocab_same", "the vocabulary")):
        if not check[key]:
            bad.append(f"{what} did not come back the same")
    return bad


CHATML_TEMPLATE = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
)


def default_system(tokenizer: Any) -> str | None:
    """The system message a ChatML template adds when the conversation has none (SmolLM2's does)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], add_generation_prompt=False, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs more than one user turn: no default to find
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


def modelfile(gguf_name: str, tokenizer: Any, eos: list[int], system: str | None) -> str:
    """An Ollama Modelfile: the file, its template in Ollama's Go syntax where the chat template is
    ChatML (else Ollama reads `tokenizer.chat_template` from the GGUF), the stop tokens, a system message."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        system = system or default_system(tokenizer)
    else:
        lines.append("# TEMPLATE: not written; Ollama takes the chat template from the GGUF's tokenizer.chat_template")
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(eos)):
        lines.append(f'PARAMETER stop "{token}"')
    lines.append("PARAMETER temperature 0.7")
    lines.append("PARAMETER top_p 0.9")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def _load(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_llama(AutoConfig.from_pretrained(model_dir))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in our output
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def export_gguf(run_dir: str | Path, output: str | Path | None = None, quantize: str = "f16",
                quiet: bool = False) -> dict[str, Any]:
    """Write, verify, and (only when the check passes) move into place; returns export.json's content."""
    import importlib.util

    if quantize not in ("f16", "q8_0"):
        raise UserError(f"--quantize {quantize} is for onnx; GGUF takes --quantize f16 or q8_0")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("GGUF export needs the 'gguf' package: pip install gguf")
    run = Path(run_dir)
    default_out = run / "gguf"
    if not run.exists():  # a packaged model name (smollm2-135m) or a hub id: written to ./NAME-gguf
        from tunesmith.models.resolve import resolve_model

        run, default_out = resolve_model(str(run_dir)).path, Path(f"{Path(str(run_dir)).name}-gguf")
    model_dir = _model_dir(run)
    out = Path(output) if output else default_out
    t0 = time.perf_counter()
    model, tokenizer = _load(model_dir)
    name = run.name if model_dir != run else model_dir.name
    gguf_name = f"{name}-{quantize}.gguf"
    if not quiet:
        print(f"tunesmith: writing {gguf_name} ({quantize}) and checking it against the PyTorch model", flush=True)
    with export_folder(out, "GGUF") as tmp:
        tensors = gguf_tensors(model, quantize)
        meta = write_gguf(tmp / gguf_name, model, tokenizer, tensors, quantize, name)
        check = verify(tmp / gguf_name, model, tokenizer, tensors, sample_prompts(run), meta["eos_token_ids"])
        if problems := _problems(check):
            raise UserError(f"the GGUF file does not reproduce {run}: {'; '.join(problems)} (nothing was written)")
        system = (run_settings(run).get("lm") or {}).get("system_prompt")
        (tmp / "Modelfile").write_text(modelfile(gguf_name, tokenizer, meta["eos_token_ids"], system), encoding="utf-8")
        report = {"format": "gguf", "file": gguf_name, "quantize": quantize, **meta, "check": check,
                  "size_mb": round((tmp / gguf_name).stat().st_size / 1e6, 1), "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        _print(report, out)
    return report


def _print(report: dict[str, Any], out: Path) -> None:
    c = report["check"]
    print(f"wrote {out / report['file']} ({report['size_mb']} MB, {report['quantize']}) and {out / 'Modelfile'}")
    print(f"check: read back by transformers, logits within {c['max_abs_logit_diff']:.1e} of the same-rounded model; "
          f"greedy answers equal to float32 PyTorch on {c['greedy_same_as_float32']}/{c['prompts']} prompts; "
          f"ended at EOS on {c['stopped_at_eos']}/{c['prompts']} (float32: {c['float32_stopped_at_eos']})")
    print(f"use it: llama-cli -m {out / report['file']} -cnv  |  cd {out} && ollama create NAME -f Modelfile")
