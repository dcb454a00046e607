"""Loading weights without running someone else's code.

safetensors files hold tensors only. Pickle-based files (.bin, .pt, .pth, .ckpt) can run code
when unpickled: a model that has only those is refused unless the config sets
`allow_pickle: true`, and even then transformers loads them with `torch.load(weights_only=True)`.
`trust_remote_code` (Python files shipped with a hub model) stays off unless the config turns it
on, and then the run says so.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@contextlib.contextmanager
def loading_weights(resolved: Any, no_class: str) -> Iterator[None]:
    """`from_pretrained`'s failures as one line: the family has no class for this task (`no_class` says
    what is missing), or the weights cannot be read (cut short, not safetensors, the wrong shapes)."""
    from safetensors import SafetensorError

    try:
        yield
    except (ValueError, OSError, RuntimeError, SafetensorError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        if "Unrecognized configuration class" in str(e):
            raise UserError(f"model '{resolved.spec}' {no_class}: {first}") from None
        raise UserError(f"cannot load the weights of model '{resolved.spec}' from {resolved.path}: {first}") from None


def check_weights_safety(resolved: Any, config: Any) -> dict[str, Any]:
    """Refuse pickle-only weights unless allowed; returns the `trust_remote_code` kwargs."""
    path = Path(resolved.path)
    if path.is_dir():
        safe = list(path.glob("*.safetensors"))
        pickled = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES and "training_args" not in f.name)
        if not safe and not pickled and not list(path.glob("*.gguf")) and not list(path.glob("*.index.json")):
            held = sorted(f.name for f in path.iterdir())
            raise UserError(f"model directory {path} has no weights (model.safetensors); it holds "
                            f"{', '.join(held[:6]) + (' ...' if len(held) > 6 else '') if held else 'nothing'}")
        if pickled and not safe and not config.allow_pickle:
            raise UserError(
                f"model '{resolved.spec}' ({path}) has only pickle-based weights ({', '.join(pickled[:3])}), which can run "
                "code when loaded; convert them to safetensors, or set allow_pickle: true to load them with "
                "torch.load(weights_only=True)"
            )
    if config.trust_remote_code:
        print(f"tunesmith: warning: trust_remote_code is on: Python code from {path} will run", file=sys.stderr)
        return {"trust_remote_code": True}
    return {}
