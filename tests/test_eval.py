"""Tests for eval.py: MetaICL metrics and aggregation against hand-computed cases, option scoring against a direct
computation with the model, batch-size invariance, cached == uncached prefix, deterministic end-to-end runs on tiny
models for every method (GPT-2 and T5), and a smoke run over two real MetaICL tasks per LLM family."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import mend
import model



# ----------------------------------------------------------------------------------------------------------------
# Metrics and aggregation (hand-computed)

def test_accuracy_hand():
    assert ev.accuracy(["a", "b", "b", "c"], ["a", "a", "b", "b"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ev.accuracy([], [])


def test_macro_f1_averages_over_gold_classes_only():
    # gold a: recall 1/2, precision 1/1 -> F1 2/3; gold b: recall 1/2, precision 1/2 -> F1 1/2.
    # "c" is predicted but never gold: MetaICL ignores it (sklearn would add an F1 = 0 term -> 0.3889).
    golds, preds = ["a", "a", "b", "b"], ["a", "b", "b", "c"]
    assert ev.macro_f1(preds, golds) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_macro_f1_never_predicted_gold_class():
    # gold b is never predicted: precision defaults to 1.0, recall 0 -> F1 0; a: P 1/2, R 1 -> F1 2/3.
    assert ev.macro_f1(["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)
    # all wrong, precision and recall 0 for the predicted gold class -> 0, no division by zero
    assert ev.macro_f1(["b", "a"], ["a", "b"]) == 0.0
    assert ev.macro_f1(["x", "y", "x"], ["x", "y", "x"]) == 1.0


def test_task_metric_by_type():
    preds, golds = ["a", "a", "a", "a"], ["a", "a", "a", "b"]
    assert ev.task_metric(preds, golds, "classification") == pytest.approx(ev.macro_f1(preds, golds))
    assert ev.task_metric(preds, golds, "multi-choice") == pytest.approx(0.75)
    # a: P 3/4, R 1 -> 6/7; b: never predicted -> 0
    assert ev.macro_f1(preds, golds) == pytest.approx((6 / 7) / 2)


def test_summarize_mean_std_and_each_task_once():
    per_seed = {"swag": {100: 50.0, 13: 60.0}, "hellaswag": {100: 40.0, 13: 40.0}, "qasc": {100: 30.0}}
    s = ev.summarize(per_seed)
    assert s["tasks"]["swag"]["mean"] == pytest.approx(55.0)
    assert s["tasks"]["swag"]["std"] == pytest.approx(5.0)  # population std (ddof = 0)
    assert s["tasks"]["hellaswag"]["std"] == 0.0 and s["tasks"]["qasc"]["std"] == 0.0
    assert s["avg"] == pytest.approx((55 + 40 + 30) / 3)  # 'hellaswag' contains 'swag': still counted once


def test_summarize_avg_std_over_seeds_of_the_task_average():
    """Table 2's AVG +- std: per seed the mean over tasks, then mean and population std over seeds."""
    per_seed = {"a": {100: 50.0, 13: 60.0, 21: 70.0}, "b": {100: 20.0, 13: 40.0, 21: 30.0}}
    s = ev.summarize(per_seed)
    assert s["avg_seeds"] == {100: 35.0, 13: 50.0, 21: 50.0}
    assert s["avg"] == pytest.approx(45.0)
    # deviations -10, 5, 5 -> sqrt(150 / 3) = 7.0711 (ddof = 0, like the per-task std; the sample std is 8.6603)
    assert s["avg_std"] == pytest.approx(math.sqrt(50.0))
    assert s["tasks"]["a"]["std"] == pytest.approx(math.sqrt(200 / 3))  # 50, 60, 70: 8.1650
    line = ev.markdown_table({"mend": s}, ["a", "b"]).splitlines()[2]
    assert line == "| MEND | 60.00±8.16 | 30.00±8.16 | 45.00±7.07 |"
    # a demo-free method (one result copied to every seed) has no spread; one seed gives 0 as well
    flat = ev.summarize({"a": {100: 50.0, 13: 50.0}, "b": {100: 10.0, 13: 10.0}})
    assert flat["avg_std"] == 0.0 and flat["avg"] == pytest.approx(30.0)
    assert ev.summarize({"a": {100: 50.0}})["avg_std"] == 0.0
    assert ev.summarize({})["avg_seeds"] == {}


def test_markdown_table_shape():
    s = ev.summarize({"t1": {100: 50.0, 13: 60.0}, "t2": {100: 10.0, 13: 10.0}})
    table = ev.markdown_table({"icl": s, "mend": s}, ["t1", "t2"])
    lines = table.splitlines()
    assert lines[0] == "| method | t1 | t2 | AVG |"
    assert lines[2] == "| Vanilla ICL | 55.00±5.00 | 10.00±0.00 | 32.50±2.50 |"  # seed 100: 30, seed 13: 35
    assert lines[3].startswith("| MEND |") and len(lines) == 4


def test_rows_of_never_splits_a_query():
    Q = type("Q", (), {})
    qs = []
    for c in (2, 3, 5, 1):
        q = Q()
        q.option_ids = [[1]] * c
        qs.append(q)
    assert ev._rows_of(qs, 4) == [[0], [1], [2], [3]]
    assert ev._rows_of(qs, 5) == [[0, 1], [2], [3]]
    assert ev._rows_of(qs, 100) == [[0, 1, 2, 3]]


# ----------------------------------------------------------------------------------------------------------------
# Option scoring against a direct computation with the model

@pytest.fixture(scope="module")
def gpt2_llm(tiny_gpt2_dir):
    return model.from_pretrained(tiny_gpt2_dir).eval()


@pytest.fixture(scope="module")
def t5_llm(tiny_t5_dir):
    return model.from_pretrained(tiny_t5_dir).eval()


def _queries(seed=0, n=5, vocab=400):
    """Queries with different x lengths, option counts (2-4) and option lengths (1-4 tokens)."""
    g = np.random.default_rng(seed)
    qs = []
    for i in range(n):
        c = 2 + i % 3
        opts = [g.integers(2, vocab, int(g.integers(1, 5))).tolist() for _ in range(c)]
        qs.append(data.Query(query_ids=g.integers(2, vocab, int(g.integers(3, 9))).tolist(), option_ids=opts,
                             gold=int(g.integers(c)), options=[f"o{j}" for j in range(c)]))
    return qs


def _contexts(llm, l=3):
    g = torch.Generator().manual_seed(1)
    demo = np.random.default_rng(2).integers(2, 400, 20).tolist()
    s_d = torch.randn(1, l, llm.hidden_size, generator=g) * 0.5
    return {"zero_shot": None, "icl": demo, "s_d": s_d}


@torch.no_grad()
def _direct(llm, context, q):
    """Mean log p(option tokens) from one full forward per (query, option), log_softmax, mean over option tokens."""
    out = []
    for opt in q.option_ids:
        prefix = (context if isinstance(context, list) else []) + q.query_ids
        if llm.is_encoder_decoder:
            emb = llm.embed_tokens(torch.tensor([prefix]))
            if isinstance(context, torch.Tensor):
                emb = torch.cat([context, emb], 1)
            y = torch.tensor([opt])
            logits = llm(inputs_embeds=emb, decoder_input_ids=llm.shift_right(y)).logits[0]  # (Ty, V)
            logp = F.log_softmax(logits.float(), -1)[torch.arange(len(opt)), y[0]]
        else:
            ids = torch.tensor([prefix + opt])
            emb = llm.embed_tokens(ids)
            n0 = len(prefix)
            if isinstance(context, torch.Tensor):
                emb = torch.cat([context, emb], 1)
                n0 += context.size(1)
            logits = llm(inputs_embeds=emb).logits[0]  # (T, V)
            pos = torch.arange(n0 - 1, n0 - 1 + len(opt))  # the positions that predict the option tokens
            logp = F.log_softmax(logits.float(), -1)[pos, torch.tensor(opt)]
        out.append(logp.mean().item())
    return np.array(out)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("ctx", ["zero_shot", "icl", "s_d"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_score_queries_matches_direct(family, ctx, use_cache, request):
    llm = request.getfixturevalue(f"{family}_llm")
    context = _contexts(llm)[ctx]
    qs = _queries()
    got = ev.score_queries(llm, qs, context, batch_size=7, use_cache=use_cache)
    assert [len(s) for s in got] == [len(q.option_ids) for q in qs]
    for q, s in zip(qs, got):
        np.testing.assert_allclose(s, _direct(llm, context, q), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_batch_size_invariance_and_cache(family, request):
    llm = request.getfixturevalue(f"{family}_llm")
    qs = _queries(seed=3, n=7)
    for ctx in _contexts(llm).values():
        ref = ev.score_queries(llm, qs, ctx, batch_size=1, use_cache=False)
        for bs in (2, 1000):
            for use_cache in (True, False):
                got = ev.score_queries(llm, qs, ctx, batch_size=bs, use_cache=use_cache)
                for a, b in zip(got, ref):  # fp32 sums of ~30 nats: batch shape changes the reduction order,
                    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-6)  # 1.1e-5 measured on an AMD EPYC
                assert ev.predict(got) == ev.predict(ref)


def test_option_loglik_masks_padding():
    logits = torch.randn(2, 3, 5)
    ids = torch.tensor([[1, 2, 0], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp = F.log_softmax(logits, -1)
    want = torch.stack([(logp[0, 0, 1] + logp[0, 1, 2]) / 2, logp[1, 0, 4]])
    torch.testing.assert_close(ev.option_loglik(logits, ids, mask), want)


# ----------------------------------------------------------------------------------------------------------------
# End to end on tiny models and the tiny MetaICL folder: every method, deterministic, skipped / missing reporting

def _save_checkpoints(root, llm_dir, distiller_dir, d_llm, l=4):
    """Random (untrained) MEND, HyperTuning (also a MEND) and PromptTuning checkpoints, saved with mend.py."""
    dirs = {}
    for i, m in enumerate(("mend", "hypertuning")):
        torch.manual_seed(10 + i)
        module = mend.MEND(model.from_pretrained(distiller_dir), d_llm=d_llm, l=l, llm_name=str(llm_dir),
                           distiller_name=str(distiller_dir))
        dirs[m] = root / m
        module.save(dirs[m])
    torch.manual_seed(12)
    dirs["prompt_tuning"] = root / "prompt_tuning"
    mend.PromptTuning(l, d_llm, llm_name=str(llm_dir)).save(dirs["prompt_tuning"])
    return dirs


def _run(args, out):
    return ev.main([str(a) for a in args] + ["--out", str(out), "--device", "cpu"])


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_end_to_end_every_method_deterministic(family, tmp_path, tiny_metaicl_dir, request, capsys):
    llm_dir = request.getfixturevalue(f"tiny_{family}_dir")
    dirs = _save_checkpoints(tmp_path, llm_dir, request.getfixturevalue(f"tiny_{family}_distiller_dir"), 64)
    args = ["--llm", llm_dir, "--data_dir", tiny_metaicl_dir, "--split", "tiny", "--seeds", "2", "--max_queries", "4",
            "--mend", dirs["mend"], "--hypertuning", dirs["hypertuning"], "--prompt_tuning", dirs["prompt_tuning"]]
    r1 = _run(args + ["--batch_size", "3"], tmp_path / "a")
    text = capsys.readouterr().out
    r2 = _run(args + ["--batch_size", "64"], tmp_path / "b")
    assert list(r1["methods"]) == list(ev.METHODS) and r1["skipped"] == {} and r1["missing_tasks"] == []
    assert r1["tasks"] == ["test_a", "test_b"]
    for m in ev.METHODS:
        runs1, runs2 = r1["methods"][m]["runs"], r2["methods"][m]["runs"]
        assert [(r["task"], r["seed"]) for r in runs1] == [(t, s) for t in ("test_a", "test_b") for s in ev.SEEDS[:2]]
        assert [r["preds"] for r in runs1] == [r["preds"] for r in runs2]  # any batch size: the same predictions
        assert [r["score"] for r in runs1] == pytest.approx([r["score"] for r in runs2], abs=1e-9)
        for t, s in r1["methods"][m]["tasks"].items():
            assert s["metric"] == "macro_f1" and 0 <= s["mean"] <= 100
            assert s["mean"] == pytest.approx(np.mean(list(s["seeds"].values())))
            if m in ev.DEMO_FREE_METHODS:
                assert s["std"] == 0.0  # no demonstrations: one result copied to every seed
        means = [s["mean"] for s in r1["methods"][m]["tasks"].values()]
        assert r1["methods"][m]["avg"] == pytest.approx(np.mean(means))
        per_seed = [np.mean([r["score"] for r in runs1 if r["seed"] == seed]) for seed in ev.SEEDS[:2]]
        assert r1["methods"][m]["avg_seeds"] == pytest.approx(dict(zip(ev.SEEDS[:2], per_seed)))
        assert r1["methods"][m]["avg_std"] == pytest.approx(np.std(per_seed), abs=1e-12)  # population std
        if m in ev.DEMO_FREE_METHODS:
            assert r1["methods"][m]["avg_std"] == 0.0
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert saved["config"]["batch_size"] == 3 and saved["config"]["seeds_used"] == list(ev.SEEDS[:2])
    assert saved["methods"]["mend"]["runs"] == r1["methods"]["mend"]["runs"]
    for label in ("zero-shot", "PromptTuning", "Vanilla ICL", "HyperTuning", "MEND"):
        assert f"| {label} |" in text
    assert "| method | test_a | test_b | AVG |" in text and "ETA" in text
    # S_D is what conditions the LLM: a different MEND checkpoint gives different option scores
    tasks, _ = data.load_meta_test(tiny_metaicl_dir, "tiny", model.load_tokenizer(llm_dir), seeds=(100,), verbose=False)
    llm = model.from_pretrained(llm_dir)
    a = [ev.method_context(llm, "mend", ev.load_module(m, dirs[m], str(llm_dir)), tasks[0].demo_ids)
         for m in ("mend", "hypertuning")]
    assert not torch.allclose(a[0], a[1])


def test_skipped_methods_and_missing_tasks(tmp_path, tiny_gpt2_dir, capsys):
    from conftest import write_tiny_metaicl

    root = write_tiny_metaicl(tmp_path / "metaicl")
    (root / "config" / "tiny_missing.json").write_text(json.dumps({"train": ["train_a"],
                                                                   "test": ["test_a", "no_such_task"]}))
    r = _run(["--llm", tiny_gpt2_dir, "--data_dir", root, "--split", "tiny_missing", "--seeds", "2",
              "--mend", tmp_path / "nothing_here"], tmp_path / "out")
    out = capsys.readouterr().out
    assert list(r["methods"]) == ["zero_shot", "icl"]
    assert set(r["skipped"]) == {"prompt_tuning", "hypertuning", "mend"}
    assert "nothing_here" in r["skipped"]["mend"] and "no checkpoint" in r["skipped"]["mend"]
    assert "runs/finetune-hypertuning-tiny_missing/best" in r["skipped"]["hypertuning"]
    assert r["missing_tasks"] == ["no_such_task"] and r["tasks"] == ["test_a"]
    assert "no_such_task" in out and "skipped mend" in out


def test_checkpoint_of_another_llm_is_refused(tmp_path, tiny_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir):
    dirs = _save_checkpoints(tmp_path, "some-other-llm", tiny_gpt2_distiller_dir, 64)
    with pytest.raises(ValueError, match="some-other-llm"):
        _run(["--llm", tiny_gpt2_dir, "--data_dir", tiny_metaicl_dir, "--split", "tiny", "--seeds", "1",
              "--methods", "mend", "--mend", dirs["mend"]], tmp_path / "out")
    with pytest.raises(ValueError, match="expected a PromptTuning checkpoint"):
        ev.load_module("prompt_tuning", dirs["mend"], None)


def test_a_checkpoint_caught_mid_save_is_read_from_its_old_copy(tmp_path, tiny_gpt2_dir, tiny_gpt2_distiller_dir,
                                                                tiny_metaicl_dir):
    """A crash between the two renames of train.py's atomic save leaves run/.best.old and no run/best: eval.py
    (and train.py --init) read the old copy, as --resume does for last/, instead of skipping the method."""
    import shutil

    dirs = _save_checkpoints(tmp_path, tiny_gpt2_dir, tiny_gpt2_distiller_dir, 64)
    shutil.copytree(dirs["mend"], tmp_path / "run" / ".best.old")
    args = ["--llm", tiny_gpt2_dir, "--data_dir", tiny_metaicl_dir, "--split", "tiny", "--seeds", "1",
            "--methods", "mend", "--max_queries", "4"]
    a = _run(args + ["--mend", dirs["mend"]], tmp_path / "a")
    b = _run(args + ["--mend", tmp_path / "run" / "best"], tmp_path / "b")
    assert b["skipped"] == {} and b["methods"]["mend"]["avg"] == a["methods"]["mend"]["avg"]
    assert ev.checkpoint_dir(ev.parse_args(["--mend", str(tmp_path / "run" / "best")]), "mend", "tiny") == \
        tmp_path / "run" / ".best.old"


@pytest.mark.parametrize("flags", [["--k", "4", "--perturb", "random_label", "--template", "newline"],
                                   ["--select", "bm25", "--perturb", "no_label"],
                                   ["--select", "dense", "--eval_split", "dev"]])
def test_analysis_flags(flags, tmp_path, tiny_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, monkeypatch):
    """Each analysis flag reaches data.load_meta_test (whose effect on D is tested in test_data.py) and shows in
    the run's configuration."""
    dirs = _save_checkpoints(tmp_path, tiny_gpt2_dir, tiny_gpt2_distiller_dir, 64)
    calls, real = [], ev.data.load_meta_test
    monkeypatch.setattr(ev.data, "load_meta_test", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    r = _run(["--llm", tiny_gpt2_dir, "--data_dir", tiny_metaicl_dir, "--split", "tiny", "--seeds", "2",
              "--methods", "icl", "mend", "--mend", dirs["mend"], "--batch_size", "4", "--max_queries", "5"] + flags,
             tmp_path / "out")
    assert list(r["methods"]) == ["icl", "mend"]
    for i in range(0, len(flags), 2):
        key = flags[i][2:]
        assert str(r["config"][key]) == flags[i + 1]
    assert all(run["n_queries"] == 5 for run in r["methods"]["icl"]["runs"])
    wiring = {"--k": ("k", int), "--perturb": ("perturb", str), "--template": ("template", str),
              "--select": ("select", str), "--eval_split": ("split", str)}
    (kw,) = calls
    for i in range(0, len(flags), 2):
        name, conv = wiring[flags[i]]
        assert kw[name] == conv(flags[i + 1])
    assert (kw["embed_fn"] is not None) == ("dense" in flags)


# ----------------------------------------------------------------------------------------------------------------
# Smoke run over two real MetaICL tasks (classification + multi-choice) per LLM family, tiny random models

def _real_two_tasks(tmp_path):
    """A MetaICL folder holding two real tasks of ../shared/data/metaicl (symlinked) and a setting that also names
    a task with no file (dbpedia_14, absent from the shared copy)."""
    src = shared_path("metaicl")
    root = tmp_path / "metaicl"
    (root / "config").mkdir(parents=True)
    (root / "data").mkdir()
    os.symlink(src / "config" / "tasks", root / "config" / "tasks")
    for task in ("superglue-cb", "superglue-copa"):
        os.symlink(src / "data" / task, root / "data" / task)
    (root / "config" / "smoke.json").write_text(json.dumps({"train": [], "test": ["superglue-cb", "dbpedia_14",
                                                                                  "superglue-copa"]}))
    return root


def shared_path(*parts):
    from conftest import shared_path as sp
    return sp(*parts)


def _check_smoke(r, n_seeds):
    assert r["tasks"] == ["superglue-cb", "superglue-copa"] and r["missing_tasks"] == ["dbpedia_14"]
    assert list(r["methods"]) == list(ev.METHODS)
    for m in ev.METHODS:
        tasks = r["methods"][m]["tasks"]
        assert tasks["superglue-cb"]["metric"] == "macro_f1" and tasks["superglue-copa"]["metric"] == "accuracy"
        runs = r["methods"][m]["runs"]
        assert len(runs) == 2 * n_seeds and all(x["n_queries"] == 2 for x in runs)
        assert all(0 <= x["score"] <= 100 and math.isfinite(x["score"]) for x in runs)


def test_smoke_real_tasks_gpt2_real_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    root = _real_two_tasks(tmp_path)
    tok = Tokenizer.from_file(str(shared_path("hf-tiny-gpt2", "tokenizer.json")))  # GPT-2's real BPE
    assert tok.encode("Hello world").ids == [15496, 995]
    for name, d in (("llm", 16), ("distiller", 8)):
        torch.manual_seed(0)
        lm = model.build_model(dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=d, n_layer=1,
                                    n_head=2, bos_token_id=50256, eos_token_id=50256))
        model.save_pretrained(lm, tmp_path / name, tokenizer=tok)
    dirs = _save_checkpoints(tmp_path, tmp_path / "llm", tmp_path / "distiller", 16)
    r = _run(["--llm", tmp_path / "llm", "--data_dir", root, "--split", "smoke", "--seeds", "2", "--max_queries", "2",
              "--mend", dirs["mend"], "--hypertuning", dirs["hypertuning"], "--prompt_tuning", dirs["prompt_tuning"],
              "--batch_size", "8"], tmp_path / "out")
    _check_smoke(r, 2)


def test_smoke_real_tasks_t5(tmp_path, tiny_t5_dir, tiny_t5_distiller_dir):
    root = _real_two_tasks(tmp_path)
    dirs = _save_checkpoints(tmp_path, tiny_t5_dir, tiny_t5_distiller_dir, 64)
    r = _run(["--llm", tiny_t5_dir, "--data_dir", root, "--split", "smoke", "--seeds", "1", "--max_queries", "2",
              "--mend", dirs["mend"], "--hypertuning", dirs["hypertuning"], "--prompt_tuning", dirs["prompt_tuning"],
              "--batch_size", "8"], tmp_path / "out")
    _check_smoke(r, 1)


def test_per_query_demonstrations_use_their_own_context(gpt2_llm, tiny_gpt2_dir, tiny_metaicl_dir):
    """--select bm25: each query is scored with its own D (not the task's shared D); demo-free methods ignore it."""
    tok = model.load_tokenizer(tiny_gpt2_dir)
    task = data.load_meta_test(tiny_metaicl_dir, "tiny", tok, seeds=(13,), select="bm25", max_queries=4,
                               verbose=False)[0][0]
    assert all(q.demo_ids is not None for q in task.queries)
    assert any(q.demo_ids != task.demo_ids for q in task.queries)
    r = ev.evaluate_task(gpt2_llm, "icl", None, task, batch_size=4)
    want = [int(np.argmax(ev.score_queries(gpt2_llm, [q], list(q.demo_ids), use_cache=False)[0])) for q in task.queries]
    assert r["preds"] == want
    z = ev.evaluate_task(gpt2_llm, "zero_shot", None, task)
    assert z["preds"] == ev.predict(ev.score_queries(gpt2_llm, ev.zero_shot_queries(task.queries), None))


def test_zero_shot_scores_x_without_its_prefix(monkeypatch):
    """Zero-shot scores Query.zero_shot_ids (x as MetaICL's first input: no " " prefix); every method with a
    context (ICL's tokens or soft vectors) scores query_ids (" x")."""
    seen = {}

    def fake_score_queries(llm, queries, context, batch_size, use_cache):
        seen.setdefault(method, []).extend(q.query_ids for q in queries)
        return [np.arange(len(q.option_ids), dtype=float) for q in queries]
    monkeypatch.setattr(ev, "score_queries", fake_score_queries)
    monkeypatch.setattr(ev, "method_context", lambda llm, method, module, demo_ids: list(demo_ids))
    queries = [data.Query(query_ids=[10, 11], option_ids=[[5], [6]], gold=1, options=["a", "b"],
                          zero_shot_ids=[20, 11]),
               data.Query(query_ids=[12], option_ids=[[5], [6]], gold=0, options=["a", "b"])]  # None: query_ids
    task = data.MetaTestTask("t", 100, "test", "multi-choice", demo_ids=[1, 2], queries=queries)
    for method in ev.METHODS:
        r = ev.evaluate_task(None, method, None, task)
        assert r["preds"] == [1, 1] and r["score"] == 50.0
    assert seen.pop("zero_shot") == [[20, 11], [12]]
    assert seen == {m: [[10, 11], [12]] for m in ("prompt_tuning", "icl", "hypertuning", "mend")}
    assert task.queries[0].query_ids == [10, 11]  # the task itself is left as it is


@pytest.mark.parametrize("flag,value,message", [
    ("--batch_size", "0", "argument --batch_size: expected an integer >= 1, got 0"),
    ("--max_queries", "-1", "argument --max_queries: expected an integer >= 0 (0 = all), got -1"),
    ("--k", "0", "argument --k: expected an integer >= 1, got 0"),
    ("--seeds", "6", "argument --seeds: expected an integer in 1..5, got 6"),
])
def test_parse_args_errors_name_the_argument_and_value(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args([flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"eval.py: error: {message}"


def test_k_above_the_train_file_is_refused(tmp_path, tiny_gpt2_dir, tiny_metaicl_dir):
    """The tiny folder's train files hold 16 rows: --k 17 would silently use 16 while eval.json records 17."""
    with pytest.raises(data.DataError) as e:
        _run(["--llm", tiny_gpt2_dir, "--data_dir", tiny_metaicl_dir, "--split", "tiny", "--seeds", "1",
              "--methods", "icl", "--k", "17"], tmp_path / "out")
    p = tiny_metaicl_dir / "data" / "test_a" / "test_a_16_100_train.jsonl"
    assert str(e.value) == f"{p}: --k 17: expected k <= 16, the number of rows of this train file"
    assert not (tmp_path / "out" / "eval.json").exists()


def test_evaluate_tasks_restores_modes_and_logs(tiny_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir):
    llm = model.from_pretrained(tiny_gpt2_dir)
    module = mend.MEND(model.from_pretrained(tiny_gpt2_distiller_dir), d_llm=64, l=2)
    tasks, _ = data.load_meta_test(tiny_metaicl_dir, "tiny", model.load_tokenizer(tiny_gpt2_dir), seeds=(100, 13),
                                   max_queries=3, verbose=False)
    llm.train()
    module.train()
    lines = []
    runs = ev.evaluate_tasks(llm, "mend", module, tasks, batch_size=4, log=lines.append)
    assert llm.training and module.training  # modes restored (train.py validates mid-training)
    assert len(runs) == len(lines) == len(tasks) and all("ETA" in line for line in lines)
    llm.eval()
    module.eval()
    assert [r["preds"] for r in ev.evaluate_tasks(llm, "mend", module, tasks, log=None)] == [r["preds"] for r in runs]


def test_checkpoint_of_another_width_is_refused(tmp_path, tiny_gpt2_dir):
    """Same LLM name, different width (e.g. two local folders called 'llm'): refused before any scoring."""
    mend.PromptTuning(4, 32, llm_name=str(tiny_gpt2_dir)).save(tmp_path / "pt")
    with pytest.raises(ValueError, match=r"produces vectors of width 32: expected the width of --llm .* \(64\)"):
        ev.load_module("prompt_tuning", tmp_path / "pt", str(tiny_gpt2_dir), d_llm=64)
