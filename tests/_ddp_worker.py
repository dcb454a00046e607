"""Run by tests/test_distributed.py under torchrun: train, then dump this process's weights."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

import tunesmith

config, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
result = tunesmith.train(config, quiet=True)
import torch.distributed as dist  # noqa: E402

rank = dist.get_rank() if dist.is_initialized() else 0
world = dist.get_world_size() if dist.is_initialized() else 1
state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
save_file(state, str(out / f"rank{rank}.safetensors"))
info = {"world": world, "steps": result.eval["train"]["steps"]}
if "soup" in result.eval:
    info["soup"] = result.eval["soup"]["members"]
(out / f"rank{rank}.json").write_text(json.dumps(info))
