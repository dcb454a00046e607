"""task: preference on a tiny Llama built in code: the losses against hand computations, the shared-
prompt rows against one-by-one forwards, the reference (disabled adapters, the disk cache, resume),
training that raises held-out preference accuracy, every data format, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LM_CORPUS, with_sections, write_jsonl
from tunesmith import train
from tunesmith.config import load_config
from tunesmith.registry import TASKS
from tunesmith.tasks import preference_loss as L

PAIRS = [(LM_CORPUS[i], LM_CORPUS[i + 1], LM_CORPUS[(i + 5) % 12]) for i in range(0, 10, 2)]


def chat_pair(q: str, c: str, r: str) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}]}


def write_pref_data(d: Path) -> Path:
    """The five pairs: 8 times over for training, two for validation, all five for test."""
    d.mkdir()
    rows = [chat_pair(*p) for p in PAIRS]
    write_jsonl(d / "train.jsonl", rows * 8)
    write_jsonl(d / "validation.jsonl", rows[:2])
    write_jsonl(d / "test.jsonl", rows)
    return d


@pytest.fixture
def pref_dir(tmp_path) -> Path:
    return write_pref_data(tmp_path / "prefdata")


@pytest.fixture
def make_pref_config(tiny_llama_dir, pref_dir, tmp_path):
    def make(**sections) -> dict:
        cfg = {
            "task": "preference", "model": str(tiny_llama_dir),
            "data": {k: str(pref_dir / f"{k}.jsonl") for k in ("train", "validation", "test")},
            "strategy": {"name": "lora"},
            "optim": {"lr": 3e-3, "batch_size": 4, "epochs": 3, "warmup": 0, "min_steps": 0},
            "train": {"max_length": 64, "seed": 0, "log_every": 1, "precision": "fp32"},
            "lm": {"forgetting": None, "max_new_tokens": 4, "samples": 2},
            "eval": {"report": False},
            "output_dir": str(tmp_path / "prefrun"),
        }
        return with_sections(cfg, sections)

    return make


# -- the losses, against hand computations on fixed log-probabilities ------------------------------
PC, PR, RC, RR, NC, NR = -10.0, -14.0, -11.0, -12.0, 5.0, 8.0
T = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_and_conservative_dpo():
    h = 0.1 * ((PC - RC) - (PR - RR))  # 0.1 * (1 - (-2)) = 0.3
    loss, (c, r) = L.dpo(T(PC), T(PR), T(RC), T(RR), beta=0.1)
    assert loss.item() == pytest.approx(-logsig(0.3)) and h == pytest.approx(0.3)
    assert (c - r).item() == pytest.approx(0.3)
    loss, _ = L.dpo(T(PC), T(PR), T(RC), T(RR), beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * logsig(0.3) - 0.2 * logsig(-0.3))


def test_ipo_on_mean_token_log_probabilities():
    x = (PC - RC) / NC - (PR - RR) / NR  # 0.2 + 0.25
    loss, _ = L.ipo(T(PC), T(PR), T(RC), T(RR), T(NC), T(NR), beta=0.1)
    assert loss.item() == pytest.approx((x - 1 / 0.2) ** 2) and x == pytest.approx(0.45)


def test_simpo_and_orpo_need_no_reference():
    loss, _ = L.simpo(T(PC), T(PR), T(NC), T(NR), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(-logsig(2.0 * (PC / NC - PR / NR) - 0.5))  # 2 * (-2 + 1.75) - 0.5 = -1.0
    ac, ar = PC / NC, PR / NR
    odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
    loss, _ = L.orpo(T(PC), T(PR), T(NC), T(NR), beta=0.1)
    assert loss.item() == pytest.approx(-ac - 0.1 * logsig(odds))


def test_kto_with_the_kl_estimate_held_fixed():
    p = torch.tensor([-10.0, -12.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-11.0, -11.0], dtype=torch.float64)
    good = torch.tensor([True, False])
    kl_p, kl_r = torch.tensor([-20.0, -21.0]), torch.tensor([-20.5, -21.1])  # mean difference 0.3
    loss, reward, z0 = L.kto(p, r, good, kl_p.double(), kl_r.double(), beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert z0.item() == pytest.approx(0.3)
    assert loss[0].item() == pytest.approx(1 - sig(0.1 * (1.0 - 0.3)))
    assert loss[1].item() == pytest.approx(2.0 * (1 - sig(0.1 * (0.3 - (-1.0)))))
    assert reward.tolist() == pytest.approx([0.1, -0.1])
    z = L.kto(p, r, good, torch.tensor([-20.0, -21.0]).double(), torch.tensor([-19.0, -20.0]).double(), 0.1)[2]
    assert z.item() == 0.0  # clamped at zero
    loss.sum().backward()
    assert p.grad[0] < 0 < p.grad[1]  # the good answer's log-probability goes up, the bad one's down


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_token_log_probabilities_match_the_plain_ones_and_their_gradients(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).double()
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)
    plain = -torch.nn.functional.cross_entropy(head(h), tgt, reduction="none")
    (plain * weights).sum().backward()
    want = [h.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    h.grad = None
    head.zero_grad()
    got = L.token_logps(h, head, tgt, chunk=8)  # 5 chunks, the last one short
    (got * weights).sum().backward()
    assert torch.allclose(got.double(), plain, atol=1e-5)
    for a, b in zip([h.grad, head.weight.grad] + ([head.bias.grad] if bias else []), want):
        assert torch.allclose(a, b, atol=1e-5)


# -- the shared-prompt row equals two separate forwards ---------------------------------------------
def _task(cfg: dict):
    from tunesmith.models import resolve_model

    task = TASKS.get("preference")(load_config(cfg))
    resolved = resolve_model(cfg["model"])
    task.load_tokenizer(resolved)
    model, _, _ = task.load_model(resolved)
    return task, model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_row_per_pair_gives_the_log_probabilities_of_separate_sequences(make_pref_config, attn):
    task, model = _task(make_pref_config())
    model.config._attn_implementation = attn
    task.validate(task.tokenizer)
    enc = task.encode(task.load_data().test)
    batch = task.collate(enc, list(range(len(enc))), train=False)
    with torch.no_grad():
        got = task.logps(model, batch)
        for i, r in enumerate(enc.rows):
            for k, answer in enumerate((r.first, r.second)):
                ids = torch.tensor([r.prompt + answer])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                want = logp[torch.arange(len(r.prompt) - 1, ids.shape[1] - 1), torch.tensor(answer)].sum()
                assert got[i, k].item() == pytest.approx(want.item(), abs=1e-4)
    assert len({len(r.prompt) + len(r.first) + len(r.second) for r in enc.rows}) > 1  # padding was exercised


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, tmp_path_factory):
    """One LoRA DPO run, and a second on the same model and data (the reference read from the cache)."""
    tmp = tmp_path_factory.mktemp("pref-lora")
    d = write_pref_data(tmp / "data")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNESMITH_CACHE", str(tmp / "cache"))
    cfg = {"task": "preference", "model": str(tiny_llama_dir),
           "data": {k: str(d / f"{k}.jsonl") for k in ("train", "validation", "test")},
           "optim": {"lr": 3e-3, "batch_size": 4, "epochs": 3, "warmup": 0, "min_steps": 0},
           "train": {"max_length": 64, "seed": 0, "log_every": 1, "precision": "fp32"},
           "lm": {"forgetting": None, "max_new_tokens": 4, "samples": 2}, "eval": {"report": False}}
    first = train({**cfg, "output_dir": str(tmp / "a")}, quiet=True)
    second = train({**cfg, "output_dir": str(tmp / "b"), "optim": {**cfg["optim"], "epochs": 1}}, quiet=True)
    yield first, second, tmp
    mp.undo()


def test_lora_dpo_raises_held_out_preference_accuracy(lora_run):
    res, _, tmp = lora_run
    ev = json.loads((res.run_dir / "eval.json").read_text())
    assert ev["strategy"] == "lora" and ev["task"] == "preference"
    b, a = ev["before"], ev["after"]
    assert b["loss"] == pytest.approx(math.log(2))  # the policy is the reference: margin 0
    assert b["reward_margin"] == 0.0
    assert a["loss"] < b["loss"] and a["reward_margin"] > 0 and a["reward_accuracy"] == 1.0
    assert a["preference_accuracy"] > b["preference_accuracy"]
    assert 0 < a["kl"] < 1.0
    assert ev["preference"]["accuracy_after"] == a["preference_accuracy"] and ev["preference"]["beta"] == 0.1
    assert len(a["samples"]) == 2 and a["samples"][0]["reference"] == PAIRS[0][1]
    assert [ev["reference"][s]["cached"] for s in ("train", "validation", "test")] == [False] * 3
    assert len(list((tmp / "cache" / "reference").glob("*.safetensors"))) == 3
    steps = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [s["loss"] for s in steps if s["type"] == "train"]
    assert train_losses[-1] < train_losses[0]


def test_the_second_run_reads_the_reference_from_the_cache(lora_run):
    first, second, _ = lora_run
    ev1 = json.loads((first.run_dir / "eval.json").read_text())
    ev2 = json.loads((second.run_dir / "eval.json").read_text())
    assert [ev2["reference"][s]["cached"] for s in ("train", "validation", "test")] == [True] * 3
    assert ev2["reference"]["train"]["key"] == ev1["reference"]["train"]["key"]
    assert ev2["before"]["loss"] == ev1["before"]["loss"]


def test_the_reference_is_the_base_model_with_adapters_disabled(lora_run, tiny_llama_dir, make_pref_config):
    """The trained LoRA model with adapters off scores exactly like the untouched base model."""
    from peft import PeftModel

    from tunesmith.tasks.preference import adapters_off

    res, _, _ = lora_run
    task, base = _task(make_pref_config())
    task.validate(task.tokenizer)
    enc = task.encode(task.load_data().test)
    batch = task.collate(enc, list(range(len(enc))), train=False)
    _, fresh = _task(make_pref_config())
    tuned = PeftModel.from_pretrained(fresh, res.run_dir / "model" / "adapter")
    with torch.no_grad():
        want = task.logps(base, batch)
        on = task.logps(tuned, batch)
        with adapters_off(tuned):
            off = task.logps(tuned, batch)
    assert torch.allclose(off, want, atol=1e-5) and not torch.allclose(on, want, atol=1e-3)


def test_full_fine_tuning_resumes_with_the_cached_reference(make_pref_config, monkeypatch, tmp_path):
    """Killed at step 5 of 12 under full fine-tuning; the reference cache deleted; resumed: the same weights
    as the run that never stopped (the reference comes from the starting weights, not the resumed ones)."""
    from tunesmith.tasks.preference import Preference

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    cfg = make_pref_config(strategy={"name": "full"}, optim={"lr": 1e-3},
                           train={"checkpoint_every": 4, "keep_checkpoints": 2})
    plain = train({**cfg, "output_dir": str(tmp_path / "plain")}, quiet=True)
    original, calls = Preference.step, {"n": 0}

    def step(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("the machine broke")
        return original(self, model, batch)

    monkeypatch.setattr(Preference, "step", step)
    out = str(tmp_path / "broken")
    with pytest.raises(RuntimeError):
        train({**cfg, "output_dir": out}, quiet=True)
    monkeypatch.setattr(Preference, "step", original)
    for f in (tmp_path / "cache" / "reference").glob("*"):
        f.unlink()
    resumed = train({**cfg, "output_dir": out, "resume": True}, quiet=True)
    a, b = load_file(str(plain.run_dir / "model" / "model.safetensors")), load_file(str(resumed.run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ev = json.loads((resumed.run_dir / "eval.json").read_text())
    assert ev["after"]["preference_accuracy"] == json.loads((plain.run_dir / "eval.json").read_text())["after"]["preference_accuracy"]


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo", "kto"])
def test_every_loss_trains_and_ranks_the_chosen_answer_higher(make_pref_config, loss, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    res = train(make_pref_config(preference={"loss": loss}, optim={"epochs": 2}), quiet=True)
    ev = json.loads((res.run_dir / "eval.json").read_text())
    assert ev["after"]["preference_accuracy"] >= ev["before"]["preference_accuracy"]
    assert ev["after"]["loss"] < ev["before"]["loss"]
    cached = (tmp_path / "cache" / "reference").exists()
    assert cached == (loss not in ("simpo", "orpo"))  # reference-free losses compute no reference
    if loss == "kto":
        assert ev["data"]["train"]["rows"] == 40 and "kl_estimate_z0" in ev["after"]


# -- data formats and bad input -----------------------------------------------------------------
def _rows(task, path):
    s = task.read_set(str(path), "train")
    return s, s.examples


def test_trl_openai_implicit_and_unpaired_formats(make_pref_config, tmp_path):
    task, _ = _task(make_pref_config())
    q, c, r = PAIRS[0]
    files = {
        "strings.jsonl": [{"prompt": q, "chosen": c, "rejected": r}],
        "chat.jsonl": [chat_pair(q, c, r)],
        "implicit.jsonl": [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
                            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}],
        "openai.jsonl": [{"input": {"messages": [{"role": "user", "content": q}]},
                          "preferred_output": [{"role": "assistant", "content": c}],
                          "non_preferred_output": [{"role": "assistant", "content": r}]}],
    }
    formats = {}
    for name, rows in files.items():
        s, (e,) = _rows(task, write_jsonl(tmp_path / name, rows))
        formats[name] = s.format
        assert e.reference() == c and not s.bad
        t, n = task._pair_tokens(e)
        assert task.tokenizer.decode(t.first).startswith(c) and task.tokenizer.decode(t.second).startswith(r)
        assert t.first[-1] == task.tokenizer.eos_token_id == t.second[-1]
    assert formats == {"strings.jsonl": "paired", "chat.jsonl": "paired", "implicit.jsonl": "paired", "openai.jsonl": "openai"}
    # the chat renderings of the pair share their prompt tokens exactly
    s, (chat,) = _rows(task, tmp_path / "chat.jsonl")
    _, (openai,) = _rows(task, tmp_path / "openai.jsonl")
    _, (implicit,) = _rows(task, tmp_path / "implicit.jsonl")
    assert task._pair_tokens(chat)[0] == task._pair_tokens(openai)[0] == task._pair_tokens(implicit)[0]
    kto_task, _ = _task(make_pref_config(preference={"loss": "kto"}))
    s, ex = _rows(kto_task, write_jsonl(tmp_path / "kto.jsonl", [{"prompt": q, "completion": c, "label": True},
                                                                 {"prompt": q, "completion": r, "label": False}]))
    assert s.format == "unpaired" and [e.label for e in ex] == [True, False]
    with pytest.raises(Exception, match="preference.loss dpo needs pairs: set preference.loss=kto"):
        task.read_set(str(tmp_path / "kto.jsonl"), "train")


GOOD = chat_pair(*PAIRS[0])
BAD = [
    ({"prompt": "a", "chosen": "same answer", "rejected": "same answer"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "a", "chosen": "fine", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "a", "chosen": "fine"}, "no 'rejected' field"),
    ({**GOOD, "chosen": [{"role": "user", "content": "x"}]}, "'chosen'[0] must be an assistant message"),
    ({**GOOD, "prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]},
     "turns must alternate user / assistant"),
    ({**GOOD, "prompt": [{"role": "system", "content": "be brief"}]}, "the prompt has no user message"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "text", "rejected": "other"},
     "the answers must be lists of assistant messages too"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", "content": "a"}]},
     "no 'non_preferred_output' field"),
]


@pytest.mark.parametrize("row,problem", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_rows_are_named_by_file_and_line_exit_2(make_pref_config, tmp_path, run_cli, row, problem):
    import yaml

    first = row if "input" in row else GOOD  # one format per file: the bad row follows a good one of its own format
    if "input" in row:
        first = {"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", "content": "a"}],
                 "non_preferred_output": [{"role": "assistant", "content": "b"}]}
    elif isinstance(row.get("prompt"), str):
        first = {"prompt": "q", "chosen": "a", "rejected": "b"}
    write_jsonl(tmp_path / "bad.jsonl", [first, row] + [first] * 3)
    cfg = make_pref_config(data={"train": str(tmp_path / "bad.jsonl")}, output_dir=str(tmp_path / "out"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("train", tmp_path / "c.yaml", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("tunesmith: error:"), r.stderr
    assert f"{tmp_path / 'bad.jsonl'}:2" in r.stderr and problem in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_prompt_that_leaves_no_room_is_an_error_or_cut_or_skipped(make_pref_config, tmp_path, run_cli):
    import yaml

    long = chat_pair(" ".join(LM_CORPUS) * 3, "paris is the capital of france", "hello there")
    write_jsonl(tmp_path / "t.jsonl", [GOOD, long] + [GOOD] * 4)
    base = make_pref_config(data={"train": str(tmp_path / "t.jsonl")}, output_dir=str(tmp_path / "out"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    r = run_cli("train", tmp_path / "c.yaml", "--quiet")
    assert r.returncode == 2 and "the prompt leaves no room for the answers" in r.stderr and f"{tmp_path / 't.jsonl'}:2" in r.stderr
    assert "preference.cut_prompt=true" in r.stderr and not (tmp_path / "out").exists()
    task, _ = _task(with_sections(copy.deepcopy(base), {"preference": {"cut_prompt": True}}))
    rep = task.validate(task.tokenizer)
    assert rep.ok
    enc = task.encode(task.load_data().train)
    assert enc.truncated == 1 and max(len(r.prompt) + len(r.first) for r in enc.rows) <= 64
    task, _ = _task(with_sections(copy.deepcopy(base), {"lm": {"too_long": "skip"}}))
    assert task.validate(task.tokenizer).ok
    assert len(task.encode(task.load_data().train)) == len(task.load_data().train) - 1


def test_config_refusals(make_pref_config):
    with pytest.raises(Exception, match="lm.packing does not apply to preference data"):
        load_config(make_pref_config(lm={"packing": True}))
    with pytest.raises(Exception, match="strategy 'head-only' does not apply to task preference"):
        load_config(make_pref_config(strategy={"name": "head-only"}))
    cfg = load_config(make_pref_config(strategy=None))
    assert cfg.strategy.name == "lora" and cfg.train.metric == "loss"


def test_over_optimisation_is_warned_about_with_the_fix(make_pref_config):
    task = TASKS.get("preference")(load_config(make_pref_config()))
    w = task._warnings({"kl": 2.6169, "samples": [{"base": "a long answer", "tuned": ""}, {"base": "x", "tuned": "y"}]})
    assert len(w) == 2 and w[0].startswith("1 of 2 sample answers are empty after tuning") and "KL 2.62 nats/token" in w[1]
    assert all("lower optim.lr, raise preference.beta" in x for x in w)
    assert task._warnings({"kl": 0.11, "samples": [{"base": "a", "tuned": "b"}]}) == []


def test_eval_on_new_pairs_reports_the_ranking_without_a_reference(lora_run, tmp_path, run_cli):
    """`tunesmith eval RUN --data pairs.jsonl`: no reference log-probabilities for new pairs, so no loss or
    rewards (they would be against zeros), but the model's own ranking."""
    res, _, _ = lora_run
    write_jsonl(tmp_path / "new.jsonl", [chat_pair(*p) for p in PAIRS])
    r = run_cli("eval", res.run_dir, "--data", tmp_path / "new.jsonl", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["preference_accuracy"] == 1.0 and m["pairs"] == 5 and "loss" not in m and "reward_margin" not in m
    r = run_cli("eval", res.run_dir, "--data", tmp_path / "new.jsonl")
    assert r.returncode == 0 and "preference_accuracy" in r.stdout and "1.0000" in r.stdout, r.stderr


def test_generate_answers_from_a_preference_run(lora_run, run_cli):
    res, _, _ = lora_run
    r = run_cli("generate", res.run_dir, LM_CORPUS[0], "--temperature", "0", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout and "error" not in r.stderr, r.stderr  # the tiny model answers with newlines
    assert (res.run_dir / "model" / "adapter" / "adapter_config.json").exists()  # LoRA: the adapter alone too
