"""Adding a task or a strategy is one file plus its registration: a toy task and a two-stage toy
strategy, defined and registered here alone, train through the unchanged loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.loop import run
from tunesmith.observers import Observer
from tunesmith.registry import STRATEGIES, TASKS
from tunesmith.strategies.base import BaseStrategy, ModelParts, ParamGroup, Stage, freeze, unfreeze
from tunesmith.tasks.base import Accumulator, Prepared, Runtime, Task
from tunesmith.validate import DataReport, FileReport

# -- the toy task: points in the plane, two classes split by a line --------------------------------


@dataclass
class Points:
    name: str
    source: str
    x: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0
    truncated: int = 0

    @property
    def lengths(self) -> list[int]:
        return [1] * len(self)

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: list[int]) -> "Points":
        return Points(self.name, self.source, self.x[idx], self.labels[idx])


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.body(x)))


class ToyTask(Task):
    name = "toy-points"
    metrics_better = {"accuracy": "max", "loss": "min"}
    refuses = {"lora": "toy-points has no attention layers for LoRA"}

    def validate(self, tokenizer=None) -> DataReport:
        rep = DataReport()
        self.sets = {}
        for split in ("train", "validation", "test"):
            path = getattr(self.config.data, split)
            raw = json.loads(Path(path).read_text())
            self.sets[split] = Points(split, path, torch.tensor(raw["x"]), torch.tensor(raw["y"]))
            rep.files.append(FileReport(split, path, rows=len(raw["y"])))
        self.labels = ["below", "above"]
        return rep

    def load_data(self) -> Prepared:
        return Prepared(self.sets["train"], self.sets["validation"], self.sets["test"], self.labels)

    def load_model(self, resolved):
        torch.manual_seed(0)
        model = ToyNet()
        return model, [n for n, _ in model.named_parameters() if n.startswith("head.")], []

    def resolve(self):
        from tunesmith.models.resolve import ResolvedModel

        return ResolvedModel("toy", Path("."), "local")

    def encode(self, s: Points) -> Points:
        return s

    def collate(self, enc: Points, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        return {"x": enc.x[idx], "labels": enc.labels[idx]}

    def step(self, model, batch):
        labels = batch.pop("labels")
        return {"loss": nn.functional.cross_entropy(model(**batch).logits, labels)}

    def accumulator(self, enc: Points) -> Accumulator:
        def compute(logits: np.ndarray) -> dict:
            y = enc.labels.numpy()
            loss = float(nn.functional.cross_entropy(torch.tensor(logits), enc.labels))
            return {"accuracy": float((logits.argmax(1) == y).mean()), "loss": loss}

        return Accumulator(len(enc), 2, compute)

    @torch.no_grad()
    def predict(self, model, enc: Points, acc: Accumulator, rt: Runtime, features: bool = False) -> None:
        rows = list(range(len(enc)))[rt.rank :: rt.world]
        acc.update(rows, model(x=enc.x[rows]).logits.numpy())

    def save(self, model, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(directory / "model.safetensors"))


# -- the toy strategy: the head alone first, then every weight (LP-FT's shape) -----------------------


class HeadFirst(BaseStrategy):
    name = "toy-head"
    default_lr = 0.05

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        freeze(parts.named("backbone"))
        unfreeze(parts.named("head"))
        return [ParamGroup("head", parts.named("head"))]


class Everything(BaseStrategy):
    name = "toy-all"
    default_lr = 0.01

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        unfreeze(list(parts.model.named_parameters()))
        return [ParamGroup("backbone", parts.named("backbone")), ParamGroup("head", parts.named("head"))]


class HeadThenAll(BaseStrategy):
    name = "toy-head-then-all"

    def stages(self, task) -> list[Stage]:
        return [Stage(HeadFirst(self.config), epochs=2), Stage(Everything(self.config), epochs=3)]

    def apply(self, parts: ModelParts) -> list[ParamGroup]:  # pragma: no cover - its stages do the work
        raise AssertionError("a staged strategy is applied stage by stage")


@pytest.fixture
def registered():
    TASKS.register("toy-points")(ToyTask)
    STRATEGIES.register("toy-head-then-all")(HeadThenAll)
    yield
    TASKS.unregister("toy-points")
    STRATEGIES.unregister("toy-head-then-all")


def points(path: Path, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (x[:, 1] > 0.5 * x[:, 0]).astype(int)
    path.write_text(json.dumps({"x": x.tolist(), "y": y.tolist()}))
    return str(path)


class Recorder(Observer):
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.records: list[dict] = []
        self.validations = 0

    def fit_start(self, run, stage) -> None:
        self.stages.append(stage.strategy.name)

    def log(self, run, record) -> None:
        self.records.append(record)

    def validation_end(self, run, metrics, improved) -> None:
        self.validations += 1


def test_a_task_and_a_staged_strategy_from_one_file_train(registered, tmp_path):
    cfg = load_config({
        "task": "toy-points", "model": "toy",
        "data": {s: points(tmp_path / f"{s}.json", n, i) for i, (s, n) in enumerate([("train", 256), ("validation", 64), ("test", 128)])},
        "strategy": {"name": "toy-head-then-all"},
        "optim": {"batch_size": 32, "warmup": 0}, "train": {"precision": "fp32", "log_every": 1},
        "output_dir": str(tmp_path / "run"),
    })
    assert cfg.train.metric == "accuracy"  # the task's first declared metric
    rec = Recorder()
    res = run(cfg, quiet=True, observers=[rec])
    assert rec.stages == ["toy-head", "toy-all"]  # two stages, in order, through the same loop
    assert [g["strategy"] for g in res.eval["optimizer"]] == ["toy-head", "toy-all"]
    assert [g["lr"] for g in res.eval["optimizer"]] == [0.05, 0.01]  # each stage's own default rate
    assert res.eval["train"]["steps"] == 2 * 8 + 3 * 8 and rec.validations == 5
    losses = [r["loss"] for r in rec.records if r["type"] == "train"]
    assert len(losses) == 40 and np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
    assert res.eval["after"]["accuracy"] >= 0.9 > res.eval["before"]["accuracy"]
    assert (res.run_dir / "model" / "model.safetensors").exists() and (res.run_dir / "eval.json").exists()
    lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len([1 for line in lines if json.loads(line)["type"] == "train"]) == 40


def test_declared_refusals_and_options_are_checked_when_the_config_is_read(registered, tmp_path):
    base = {"task": "toy-points", "model": "toy", "data": {"train": "t.json"}}
    with pytest.raises(UserError, match="toy-points has no attention layers for LoRA"):
        load_config({**base, "strategy": {"name": "lora"}})
    with pytest.raises(UserError, match="strategy.train_last_n applies to strategy 'freeze', not 'toy-head-then-all'"):
        load_config({**base, "strategy": {"name": "toy-head-then-all", "train_last_n": 2}})
    with pytest.raises(UserError, match="train.metric: 'macro_f1' is not a validation metric"):
        load_config({**base, "train": {"metric": "macro_f1"}})
    assert "toy-points" in TASKS and "toy-head-then-all" in STRATEGIES.names()
