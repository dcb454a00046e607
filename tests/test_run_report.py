"""report.html and `tunesmith compare`: every figure present and a real PNG, the mistakes are mistakes,
a rebuilt report is identical, overfitting is flagged only when it happens, configs are diffed."""

import base64
import json
import re
import shutil

import pytest

import tunesmith
from conftest import text_config, write_text_data
from test_cli import cli
from tunesmith.run_report import RunRecord, overfitting

PNG = b"\x89PNG\r\n\x1a\n"


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Two finished runs on the tiny model, trained once for this module: one with its report and the
    linear probe, one with another rate and epochs (what compare diffs)."""
    root = tmp_path_factory.mktemp("report-runs")
    data = write_text_data(root / "data")
    tunesmith.train(text_config(tiny_model_dir, data, root / "run", optim={"epochs": 4, "head_lr": 1e-2},
                                eval={"report": True, "linear_probe": True}), quiet=True)
    tunesmith.train(text_config(tiny_model_dir, data, root / "run2", optim={"epochs": 3, "lr": 1e-3}), quiet=True)
    return root / "run", root / "run2"


@pytest.fixture
def text_run(runs):
    return runs[0]


def test_text_run_writes_a_self_contained_report(text_run):
    page = (text_run / "report.html").read_text(encoding="utf-8")
    ev = json.loads((text_run / "eval.json").read_text())
    figures = sorted(p.name for p in (text_run / "report").iterdir())
    assert figures == ["confusion_matrix.png", "curves.png", "learning_rate.png", "test_metrics.png"]
    images = embedded_images(page)
    assert len(images) == 4 and all(i.startswith(PNG) and len(i) > 2000 for i in images)
    assert {(text_run / "report" / f).read_bytes() for f in figures} == set(images)  # the PNGs beside it are the same
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing fetched, nothing run
    assert (text_run / "report.html").stat().st_size < 5 * 2**20
    for section in ("Held-out test set", "Training and validation", "Learning rate", "Classes", "Data", "Runtime", "Config (resolved)"):
        assert f"<h2>{section}</h2>" in page, section
    # the most confident mistakes: wrong, sorted by confidence, as many as the confusion matrix has errors (at most 16)
    cm = ev["after"]["confusion_matrix"]
    wrong = sum(cm[i][j] for i in range(len(cm)) for j in range(len(cm)) if i != j)
    mistakes = ev["mistakes"]
    assert len(mistakes) == min(16, wrong)
    assert all(m["label"] != m["predicted"] and m["where"].startswith(str(text_run.parent / "data" / "test.csv")) for m in mistakes)
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    if mistakes:
        assert "Most confident mistakes" in page and page.count("<tr>") >= len(mistakes)
    # head_lr: the head and the body have their own rates, logged per group every step
    groups = [json.loads(line).get("lr_groups") for line in (text_run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert len(groups[0]) == 2 and len(set(groups[0].values())) == 2


def test_report_command_rebuilds_the_same_page(text_run):
    first = (text_run / "report.html").read_bytes()
    shutil.rmtree(text_run / "report")
    (text_run / "report.html").unlink()
    p = cli("report", text_run)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"report: {text_run / 'report.html'}"
    assert (text_run / "report.html").read_bytes() == first


def test_compare_lists_config_differences_and_overlays_curves(runs, tmp_path):
    text_run, run2 = runs
    out = tmp_path / "cmp.html"
    p = cli("compare", text_run, run2, "--output", out, "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert set(got["differences"]) == {"optim.epochs", "optim.lr", "optim.head_lr", "eval.linear_probe", "eval.report"}
    assert got["differences"]["optim.epochs"] == [4, 3]
    assert [r["run"] for r in got["runs"]] == ["run", "run2"]
    assert got["runs"][0]["linear_probe"] is not None and got["runs"][1]["linear_probe"] is None
    page = out.read_text()
    assert len(embedded_images(page)) == 1 and "optim.lr" in page
    table = cli("compare", text_run, run2, "--output", out)  # the console table
    assert table.returncode == 0 and "config differences" in table.stdout and "optim.epochs" in table.stdout


def record(tmp_path, train_losses, val_losses, metric="loss"):
    steps = range(1, len(train_losses) + 1)
    records = [{"type": "train", "step": s, "loss": l, "lr": 1e-3} for s, l in zip(steps, train_losses)]
    records += [{"type": "eval", "step": s, metric: v} for s, v in zip(steps, val_losses)]
    return RunRecord(tmp_path, {"train": {"metric": metric}}, {}, records)


def test_overfitting_is_flagged_only_when_validation_worsens_while_training_improves(tmp_path):
    falling = [1.0, 0.8, 0.6, 0.4, 0.3, 0.2]
    over = overfitting(record(tmp_path, falling, [1.0, 0.7, 0.6, 0.65, 0.7, 0.8]))
    assert (over["from_step"], over["to_step"], over["best"], over["last"]) == (3, 6, 0.6, 0.8)
    assert over["train_loss_fall_pct"] == pytest.approx(100 * (1 - 0.2 / 0.6))
    assert overfitting(record(tmp_path, falling, [1.0, 0.7, 0.6, 0.55, 0.5, 0.45])) is None  # both fall
    assert overfitting(record(tmp_path, [1.0, 0.8, 0.6, 0.6, 0.7, 0.8], [1.0, 0.7, 0.6, 0.65, 0.7, 0.8])) is None  # both rise
    assert overfitting(record(tmp_path, falling, [1.0, 0.7, 0.6, 0.6, 0.6, 0.605])) is None  # within 2%
    assert overfitting(record(tmp_path, falling, [0.5, 0.7, 0.8, 0.78, 0.75, 0.74], "accuracy"))["best"] == 0.8  # a score falls
    assert overfitting(record(tmp_path, falling, [0.5, 0.7, 0.8, 0.8, 0.8, 0.795], "accuracy")) is None  # within 0.01
    assert overfitting(record(tmp_path, falling, [0.5, 0.7, 0.8, 0.75, 0.74, 0.74][:4], "accuracy")) is None  # one eval after


def test_image_report_shows_mistakes_as_thumbnails(tiny_timm_dir, tmp_path):
    from test_images import config, make_images

    make_images(tmp_path / "train", 8, 0)
    make_images(tmp_path / "test", 6, 1)
    cfg = config(tiny_timm_dir, tmp_path, tmp_path, optim={"epochs": 1, "lr": 1e-4}, eval={"report": True})
    tunesmith.train(cfg, quiet=True)
    run = tmp_path / "run"
    ev, page = json.loads((run / "eval.json").read_text()), (run / "report.html").read_text()
    assert ev["mistakes"], "an untrained tiny model gets some test images wrong"
    thumbs = re.findall(r'<figure><img alt="([^"]+)" src="data:image/jpeg;base64,', page)
    assert thumbs == [m["where"] for m in ev["mistakes"]]


def test_lm_report_shows_base_and_tuned_answers(make_lm_config, tmp_path):
    tunesmith.train(make_lm_config(optim={"epochs": 2}, eval={"report": True}, lm={"samples": 2, "max_new_tokens": 8}), quiet=True)
    page = (tmp_path / "lmrun" / "report.html").read_text()
    assert "<h2>Base and tuned answers</h2>" in page and "perplexity" in page
    assert "Confusion" not in page and "mistakes" not in page


CHECK = ("<script>window.addEventListener('load',()=>{document.body.setAttribute('data-check',JSON.stringify("
         "[...document.images].map(i=>[i.alt,i.naturalWidth,i.naturalHeight])))});</script>")


def browser_images(page_path, tmp_path):
    """Each <img> of the page as a real browser decodes it: (alt, width, height)."""
    import html
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium: scripts/install.sh installs it (apt-get install chromium)")
    probe = tmp_path / f"probe-{page_path.name}"
    probe.write_text(page_path.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'data-check="([^"]*)"', out.stdout)
    assert found, out.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_report_and_compare_pages_render_in_a_headless_browser(runs, tmp_path):
    text_run, run2 = runs
    images = browser_images(text_run / "report.html", tmp_path)
    assert [alt for alt, _, _ in images] == ["test metrics before, linear probe, after", "loss and metric curves",
                                             "learning rate per parameter group", "confusion matrix"]
    assert all(w > 100 and h > 100 for _, w, h in images), images
    assert cli("compare", text_run, run2, "--output", tmp_path / "c.html").returncode == 0
    (alt, w, h), = browser_images(tmp_path / "c.html", tmp_path)
    assert alt == "validation curves of every run" and w > 100 and h > 100
