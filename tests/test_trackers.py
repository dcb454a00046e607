"""train.report_to: the numbers of metrics.jsonl reach TensorBoard's event files and MLflow's local store,
read back here with their own readers; a tracker that is not installed is one line before training."""

import json
import struct

import pytest

import tunesmith
from tunesmith.errors import UserError


def tensorboard_scalars(folder):
    """tag -> [(step, value)] from TFRecord event files (length, crc, Event proto, crc), tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metrics_reach_tensorboard_and_mlflow(make_config, tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = tunesmith.train(make_config(train={"report_to": ["tensorboard", "mlflow"]}), quiet=True)
    run = res.run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    val = [(r["step"], r["macro_f1"]) for r in records if r["type"] == "eval"]

    tb = tensorboard_scalars(run / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [s for s, _ in train]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([v for _, v in train], rel=1e-6)
    assert [v for _, v in tb["validation/macro_f1"]] == pytest.approx([v for _, v in val], rel=1e-6)
    assert tb["test/after/accuracy"][0][1] == pytest.approx(res.eval["after"]["accuracy"])
    assert {"train/lr/head", "train/lr/backbone"} <= set(tb)

    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / "trackers.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(run / 'mlflow.db').resolve()}")
    history = client.get_metric_history(run_id, "train/loss")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [s for s, _ in train]
    assert [m.value for m in history] == pytest.approx([v for _, v in train])
    got = client.get_run(run_id)
    assert got.data.params["optim.lr"] == str(res.config.optim.lr) and got.info.status == "FINISHED"
    assert got.data.metrics["test/after/macro_f1"] == pytest.approx(res.eval["after"]["macro_f1"])


def test_a_tracker_that_is_not_installed_stops_before_training(make_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"train.report_to: wandb needs the wandb package: pip install wandb"):
        tunesmith.train(make_config(train={"report_to": ["wandb"]}), quiet=True)
    assert not (tmp_path / "run").exists()
