"""Run by tests/test_resume.py: train (resume: auto), optionally SIGKILL itself at a chosen step
or in the middle of writing a chosen checkpoint, and dump the final weights."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import tunesmith
import tunesmith.checkpoint as ckpt
from tunesmith.errors import Interrupted
from tunesmith.tasks.text_classification import TextClassification

config, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
kill_at_call = int(os.environ.get("KILL_AT_CALL", "-1"))  # the Nth forward pass (0-based)
# under torchrun: rank 0 kills torchrun and every worker at once (a machine dying; Linux /proc)
kill_group_at_call = int(os.environ.get("KILL_GROUP_AT_CALL", "-1"))
rank = int(os.environ.get("RANK", "0"))
kill_in_checkpoint = int(os.environ.get("KILL_IN_CHECKPOINT", "-1"))  # a checkpoint's step number
delay = float(os.environ.get("STEP_DELAY", "0"))
original_step = TextClassification.step
calls = {"n": 0}


def step(self, model, batch):
    if calls["n"] == kill_at_call:
        os.kill(os.getpid(), signal.SIGKILL)
    if calls["n"] == kill_group_at_call and rank == 0:  # torchrun gives each worker a session of its own
        parent = os.getppid()
        siblings = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        for pid in [int(x) for x in siblings if int(x) != os.getpid()] + [parent, os.getpid()]:
            os.kill(pid, signal.SIGKILL)
    calls["n"] += 1
    time.sleep(delay)
    return original_step(self, model, batch)


TextClassification.step = step
if kill_in_checkpoint >= 0:
    original_save = torch.save

    def save(obj, f, *args, **kwargs):
        original_save(obj, f, *args, **kwargs)
        if str(f).endswith(f"step-{kill_in_checkpoint:06d}.tmp/optimizer.pt"):
            os.kill(os.getpid(), signal.SIGKILL)  # files half written, the directory not yet renamed

    ckpt.torch.save = save

try:
    result = tunesmith.train(config, quiet=True)
except tunesmith.UserError as e:
    print(f"tunesmith: error: {e}", file=sys.stderr)
    sys.exit(2)
except Interrupted as e:
    print(f"tunesmith: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
save_file(state, str(out / ("final.safetensors" if "WORLD_SIZE" not in os.environ else f"final-rank{rank}.safetensors")))
