import pytest

from tunesmith.config import load_config
from tunesmith.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


BASE = "task: text-classification\nmodel: m\ndata:\n  train: t.csv\n"


def test_defaults_and_override_types(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "optim:\n  lr: 2e-5\n"), ["optim.lr=3e-5", "train.max_length=64"])
    assert cfg.optim.lr == pytest.approx(3e-5)  # "3e-5" is a string to YAML 1.1; still a float here
    assert cfg.train.max_length == 64
    assert cfg.optim.batch_size == 32 and cfg.strategy.name == "full" and cfg.train.precision == "auto"


def test_unknown_key_names_line_and_nearest_key(tmp_path):
    p = write(tmp_path, BASE + "optim:\n  lrr: 1e-4\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:6:" in msg and "optim.lrr" in msg and "did you mean 'lr'" in msg


def test_unknown_top_level_key_from_override(tmp_path):
    with pytest.raises(UserError, match="unknown key 'optimm'.*did you mean 'optim'"):
        load_config(write(tmp_path, BASE), ["optimm.lr=1"])


def test_missing_required_key(tmp_path):
    with pytest.raises(UserError, match="missing required key 'data.train'"):
        load_config(write(tmp_path, "task: text-classification\nmodel: m\ndata: {}\n"))


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(UserError, match=r"optim\.batch_size: .*greater than 0.*got 0"):
        load_config(write(tmp_path, BASE), ["optim.batch_size=0"])
    with pytest.raises(UserError, match=r"train\.precision"):
        load_config(write(tmp_path, BASE), ["train.precision=fp8"])


def test_unknown_strategy_lists_known(tmp_path):
    with pytest.raises(UserError, match="unknown strategy 'ful'.*did you mean 'full'.*known: auto, contrastive, feature-extraction, freeze, full, gradual-unfreeze, head-only, lora"):
        load_config(write(tmp_path, BASE), ["strategy.name=ful"])


def test_unknown_task_and_metric(tmp_path):
    with pytest.raises(UserError, match="unknown task 'text-clasification'"):
        load_config(write(tmp_path, BASE.replace("text-classification", "text-clasification")))
    with pytest.raises(UserError, match="train.metric.*accuracy, macro_f1"):
        load_config(write(tmp_path, BASE), ["train.metric=f1"])


def test_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(UserError, match=r"run.yaml:\d+: not valid YAML"):
        load_config(write(tmp_path, "task: [unclosed\n"))
    with pytest.raises(UserError, match="not key=value"):
        load_config(write(tmp_path, BASE), ["optim.lr"])
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_data_paths_relative_to_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.csv").write_text("text,label\n")
    p = tmp_path / "sub" / "run.yaml"
    p.write_text(BASE)
    assert load_config(p).data.train == str(tmp_path / "sub" / "t.csv")


def test_python_kwargs_overrides():
    cfg = load_config({"task": "text-classification", "model": "m", "data": {"train": "x.csv"}}, optim__lr=1e-4,
                      **{"strategy.name": "head-only"})
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.strategy.name == "head-only"


def test_auto_precision_keeps_float32_for_convolutional_networks_on_a_cpu(monkeypatch):
    """`train.precision: auto` on a CPU with fast bf16: bf16 autocast for transformers, float32 for CNNs (measured
    slower in bf16); on a CPU without fast bf16, float32 for both; an explicit choice is kept."""
    import torch
    from torch import nn

    from tunesmith import precision

    cpu = torch.device("cpu")
    cnn = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3, groups=64), nn.Conv2d(64, 128, 1), nn.Flatten(), nn.Linear(128, 10))
    encoder = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 128), nn.Linear(128, 32))
    assert precision.convolutional(cnn) and not precision.convolutional(encoder)
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)
    assert precision.resolve_precision("auto", cpu, encoder)[0] == "bf16"
    chosen, why = precision.resolve_precision("auto", cpu, cnn)
    assert chosen == "fp32" and "convolutional" in why
    assert precision.resolve_precision("bf16", cpu, cnn) == ("bf16", "")  # asked for: kept
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: False)
    assert precision.resolve_precision("auto", cpu, encoder)[0] == "fp32"
