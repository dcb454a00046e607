"""The pre-flight report: counts, label distribution and imbalance, duplicates, train/test overlap,
token lengths and truncation, every bad row (20 listed, the rest counted); `train` runs it first."""

import json

import yaml

from conftest import make_texts, write_csv, write_jsonl
from test_cli import assert_user_error
from tunesmith.cli import main


def run_validate(capsys, cfg_path, *overrides):
    rc = main(["validate", str(cfg_path), "--json", *overrides])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if out.out.strip() else None), out.err


def test_report_counts_labels_duplicates_overlap_and_lengths(make_config, tmp_path, data_dir, capsys):
    train = make_texts(60, 0) + [("odd rare words here", "rare")] * 3  # 2 exact repeats
    train += [(make_texts(60, 0)[0][0], "neg")]  # the first text again, with another label
    write_csv(data_dir / "train.csv", train)
    test = make_texts(20, 5) + train[:4]  # 4 test rows also in train
    write_csv(data_dir / "test.csv", test)
    long = [(" ".join(["great"] * 40), "pos")] + make_texts(9, 7)
    write_csv(data_dir / "validation.csv", long)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_config(train={"max_length": 32})))
    rc, rep, err = run_validate(capsys, cfg)
    assert rc == 0 and rep["ok"], err
    f = {x["split"]: x for x in rep["files"]}
    assert [f[s]["rows"] for s in ("train", "validation", "test")] == [64, 10, 24]
    assert f["train"]["labels"] == {"pos": 30, "neg": 31, "rare": 3}
    assert f["train"]["duplicates"] == 3 and f["train"]["conflicts"] == 1
    assert rep["overlap"] == {"validation": 0, "test": 4}
    assert f["validation"]["truncated"] == 1 and f["validation"]["tokens"]["max"] == 42  # 40 words + [CLS] [SEP]
    warnings = "\n".join(rep["warnings"])
    assert "strong class imbalance" in warnings and "'neg' has 31 rows, 'rare' only 3" in warnings
    assert "1 class(es) with fewer than 10 training rows: 'rare' (3)" in warnings
    assert "3 row(s) repeat an earlier row's text" in warnings and "1 text(s) occur with more than one label" in warnings
    assert "4 test row(s) also occur in the training data" in warnings
    assert "1 of 10 rows are longer than train.max_length=32" in warnings
    # the human form says the same, and exits 0
    assert main(["validate", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "strong class imbalance" in text and "ready to train (6 warning(s))" in text


def test_bad_rows_first_20_listed_rest_counted_exit_2(make_config, tmp_path, data_dir, capsys):
    rows = [{"text": t, "label": l} for t, l in make_texts(40, 0)]
    lines = [json.dumps(r) for r in rows]
    for i in range(5, 30):  # 25 broken lines
        lines[i] = lines[i][:-3]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_config(data={"train": str(data_dir / "train.jsonl"),
                                                    "validation": str(data_dir / "validation.csv"),
                                                    "test": str(data_dir / "test.csv")})))
    rc = main(["validate", str(cfg)])
    out = capsys.readouterr()
    assert rc == 2
    listed = [l for l in out.out.splitlines() if l.startswith("  ") and "train.jsonl:" in l and "not valid JSON" in l]
    assert len(listed) == 20 and "train.jsonl:6:" in listed[0] and "train.jsonl:25:" in listed[-1]
    assert "  ... and 5 more" in out.out
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tunesmith: error: ") and "25 bad row(s)" in err[0] and "train.jsonl:6:" in err[0]
    rc, rep, _ = run_validate(capsys, cfg, "data.bad_rows=skip")
    assert rc == 0 and rep["files"][0]["rows"] == 15 and rep["files"][0]["bad_rows"] == 25


def test_train_runs_the_report_first_and_stops_before_the_model(make_config, tmp_path, data_dir, tiny_model_dir, run_cli):
    import shutil

    broken = tmp_path / "model"  # the tokenizer loads; the weights would not: the data report must stop first
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    write_jsonl(data_dir / "bad.jsonl", [{"text": t, "label": l} for t, l in make_texts(30, 0)] + [{"text": 7, "label": "pos"}])
    cfg = make_config(model=str(broken),
                      data={"train": str(data_dir / "bad.jsonl"), "validation": str(data_dir / "validation.csv"),
                            "test": str(data_dir / "test.csv")})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", p)
    assert_user_error(proc, "bad.jsonl:31: text is int, not a string")
    assert not (tmp_path / "run").exists()
    cfg["model"] = str(tiny_model_dir)
    # warnings are printed at the start of training, and training goes on
    write_csv(data_dir / "dup.csv", make_texts(40, 0) * 2)
    cfg["data"]["train"] = str(data_dir / "dup.csv")
    cfg["optim"]["epochs"] = 1
    p.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", p)
    assert proc.returncode == 0, proc.stderr
    assert "warning: " in proc.stdout and "40 row(s) repeat an earlier row's text exactly" in proc.stdout
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["data_report"]["files"][0]["duplicates"] == 40
