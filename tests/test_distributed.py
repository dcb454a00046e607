"""Two CPU processes (gloo) through torchrun: the same loop, identical weights on both ranks,
and the same result as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", [
    {"name": "full"},
    # blocks join every 3 steps: DDP must be re-wrapped so the new weights are all-reduced too
    {"name": "gradual-unfreeze", "unfreeze_every": 3, "freeze_embeddings": False},
    # LP-FT's probe stage on cached features, then a soup of two fine-tuning runs: every process must draw
    # the same batch order for each run and average the same weights
    {"name": "full", "lp_ft": True, "soup": 2},
], ids=["full", "gradual-unfreeze", "lp-ft-soup"])
def test_two_processes_match_each_other_and_one_process(make_config, tmp_path, strategy):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    results = {}
    for world in (2, 1):
        out = tmp_path / f"w{world}"
        out.mkdir()
        # batch 16 splits into 8 + 8: same examples per step as one process with batch 16
        cfg = make_config(output_dir=str(out / "run"), optim={"epochs": 2, "batch_size": 16}, strategy=strategy)
        (out / "cfg.json").write_text(json.dumps(cfg))
        if world == 1:
            cmd = [sys.executable, str(WORKER), str(out / "cfg.json"), str(out)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(out / "cfg.json"), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = out
    info = [json.loads((results[2] / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((results[1] / "rank0.json").read_text())
    assert [i["world"] for i in info] == [2, 2] and info[0]["steps"] == info[1]["steps"] == one["steps"]
    if strategy.get("soup"):  # the probe stage's steps, then two fine-tuning runs of 12
        assert info[0]["soup"] == one["soup"] == 2 and one["steps"] > 2 * 12
    else:
        assert one["steps"] == 12 and "soup" not in one
    r0, r1 = (load_file(str(results[2] / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(results[1] / "rank0.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        torch.testing.assert_close(r0[k], single[k], atol=2e-4, rtol=1e-3, msg=f"1 vs 2 processes differ in {k}")
    assert (results[2] / "run" / "eval.json").exists()


def test_two_processes_end_with_one_batch_norm_model(tiny_timm_dir, tmp_path):
    """A CNN with batch norm under DDP: each process's running statistics move with its own half-batches (DDP
    only broadcasts rank 0's before each forward). Both processes must end holding the same model, the one rank 0
    saves: their evaluations are sharded. (A soup, whose statistics are measured anew on the training rows, passed
    the same check before and after Recipe.share_buffers; left out of the default run for its 12 s.)"""
    from test_images import config, make_images

    make_images(tmp_path / "train", 16, 0)
    make_images(tmp_path / "test", 6, 1)
    cfg = config(tiny_timm_dir, tmp_path, tmp_path, optim={"epochs": 2}, strategy={"lp_ft": False, "soup": 1})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(tmp_path / "cfg.json"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    stats = [k for k in r0 if k.endswith("running_mean")]
    assert stats and all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])][:5]
    assert all(torch.equal(r0[k], saved[k]) for k in stats)
    assert "soup" not in json.loads((tmp_path / "run" / "eval.json").read_text())
