"""Checkpoints that a crash cannot corrupt, and exact resume.

A checkpoint is a directory `output_dir/checkpoints/step-000120/` holding:

- `weights.safetensors`: every weight that may train (adapters and head for LoRA, the head for
  feature extraction, everything for full fine-tuning); frozen weights come from the model;
- `best.safetensors`: the best validation weights so far (they are restored at the end);
- `optimizer.pt`: the optimizer state (tensors and numbers only: loaded with weights_only=True);
- `rng.safetensors` + `state.json`: every RNG state, the step, the epoch and the position in it,
  the counters, the scheduler state and the run's config.

It is written into `step-000120.tmp/` and renamed into place: a directory without `.tmp` is
complete, and a crash mid-write leaves the previous checkpoints as they were. Nothing here is
unpickled beyond tensors, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import UserError

DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")

# Config keys that may change between a run and its resumption (dotted; a trailing '.' is a prefix).
RESUME_ALLOWED = (
    "optim.epochs", "train.early_stopping", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_bad_steps", "eval.", "overwrite", "resume", "output_dir",
)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, inner, gauss_next = random.getstate()
    meta = {"numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(inner), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, inner, gauss_next = meta["python"]
    random.setstate((version, tuple(inner), gauss_next))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(out: Path, step: int, weights: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
         optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int, best_step: int | None,
         rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
         stage_start: dict[str, torch.Tensor] | None = None, soup: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically; prune to the newest `keep` plus the best one.

    `rng` holds every process's RNG state in rank order (gathered by the caller); without it, this
    process's own. `stage_start`: the model as this stage began, when the stage must beat the one
    before it (LP-FT's fine-tuning): a resumed run can still go back to it. `soup`: the summed weights of
    the stage's finished fine-tuning runs (strategy.soup)."""
    from safetensors.torch import save_file

    root = out / DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        for name, tensors in (("best", best), ("stage_start", stage_start), ("soup", soup)):
            if tensors is not None:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        ranks = rng if rng is not None else [rng_state()]  # one (tensors, meta) per process, rank order
        for r, (tensors, _) in enumerate(ranks):
            save_file(tensors, str(tmp / ("rng.safetensors" if r == 0 else f"rng-rank{r}.safetensors")))
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({**state, "rng": ranks[0][1], "rng_ranks": [m for _, m in ranks]}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"writing checkpoint {final} failed: {e.strerror or e}; the previous checkpoints are intact") from None
    done = sorted(valid(out), key=lambda p: _step_of(p))
    protected = {f"step-{best_step:06d}"} if best_step else set()
    for old in done[:-keep] if keep > 0 else []:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(p: Path) -> int:
    m = _NAME.match(p.name)
    return int(m.group(1)) if m else -1


def valid(out: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with their state file), oldest first."""
    root = out / DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=_step_of)


def latest(out: Path) -> Path | None:
    for stale in (out / DIR).glob("*.tmp") if (out / DIR).is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # a write that a crash interrupted
    found = valid(out)
    return found[-1] if found else None


def load(path: Path, rank: int = 0) -> dict[str, Any]:
    """A checkpoint's contents; the RNG state is this rank's (rank 0's when it was saved by fewer processes)."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    ranks = state.get("rng_ranks") or [state["rng"]]
    own = rank if rank < len(ranks) else 0
    state["rng"] = ranks[own]
    return {
        "state": state,
        "weights": load_file(str(path / "weights.safetensors")),
        "best": load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None,
        "stage_start": load_file(str(path / "stage_start.safetensors")) if (path / "stage_start.safetensors").exists() else None,
        "soup": load_file(str(path / "soup.safetensors")) if (path / "soup.safetensors").exists() else None,
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "rng_tensors": load_file(str(path / ("rng.safetensors" if own == 0 else f"rng-rank{own}.safetensors"))),
        "rng_world": len(ranks),
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def check_config_change(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume with a changed config, unless every change is on the allow-list."""
    a, b = _flatten(saved), _flatten(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    bad = [k for k in changed if not any(k == allowed or (allowed.endswith(".") and k.startswith(allowed)) for allowed in RESUME_ALLOWED)]
    if bad:
        raise UserError(
            f"cannot resume from {path}: the config changed in {', '.join(bad)} "
            f"(resuming allows changes to {', '.join(a.rstrip('.') for a in RESUME_ALLOWED[:7])}, eval.*); "
            "start a new run with another output_dir, or --overwrite"
        )
