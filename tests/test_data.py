"""Tests for data.py: episode layout with GPT-2's real tokenizer, Appendix A truncation, deterministic and sharded
sampling, exact resume, perturbations/selection, one-line errors, and the real ../shared/data files."""
import gzip
import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import data
from conftest import shared_path, write_tiny_metaicl


@pytest.fixture(scope="module")
def gpt2_tok():
    """GPT-2's byte-level BPE from vocab.json + merges.txt (the same tokenizer as HF gpt2)."""
    d = shared_path("gpt2-tokenizer")
    tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_metaicl(root, train, test, ttype="classification", seeds=(100,)):
    """MetaICL folder with setting "s": train/test = {task: rows}; test rows go to train/dev/test of each seed."""
    (root / "config" / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "config" / "s.json").write_text(json.dumps({"train": list(train), "test": list(test)}))
    for task, rows in {**train, **test}.items():
        (root / "config" / "tasks" / f"{task}.json").write_text(json.dumps({"task_type": ttype, "options": None}))
        for seed in seeds:
            for split in ("train", "dev") + (("test",) if task in test else ()):
                write_rows(root / "data" / task / f"{task}_16_{seed}_{split}.jsonl",
                           [dict(task=task, **r) for r in rows])
    return root


def row(x, y, options=("positive", "negative")):
    return dict(input=x, output=y, options=list(options))


# ------------------------------------------------------------------------------------------------ episodes/batches

def test_collate_pads_right_with_masks_and_empty_query():
    eps = [data.Episode([5, 6, 7], [], [8], "a"), data.Episode([9], [], [10, 11], "b")]
    b = data.collate(eps, pad_id=3)
    assert b.demo_ids.tolist() == [[5, 6, 7], [9, 3, 3]] and b.demo_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.query_ids.shape == (2, 0) and b.query_mask.shape == (2, 0)
    assert b.target_ids.tolist() == [[8, 3], [10, 11]] and b.target_mask.tolist() == [[1, 0], [1, 1]]
    assert all(t.dtype == torch.long for t in vars(b).values())
    assert b.to("cpu").target_ids.tolist() == b.target_ids.tolist()
    with pytest.raises(data.DataError, match="expected at least one episode"):
        data.collate([])


def test_meta_test_episode_layout_gpt2_space_and_newline(tmp_path, gpt2_tok):
    demos = [row("great movie", "positive"), row("bad film", "negative")]
    root = make_metaicl(tmp_path, {"tr": demos * 2}, {"te": demos})
    (root / "data" / "te" / "te_16_100_test.jsonl").write_text(
        json.dumps(dict(task="te", **row("fine acting", "positive"))) + "\n")
    (task,), missing = data.load_meta_test(root, "s", gpt2_tok, seeds=(100,), k=2, verbose=False)
    assert missing == [] and task.task_type == "classification" and task.n_demos == 2
    # D = "x1" " y1" " x2" " y2", each piece tokenized on its own; x = " x"; options " y"
    assert task.demo_ids == [18223, 3807, 3967, 2089, 2646, 4633]
    assert task.demo_ids == ids(gpt2_tok, "great movie") + ids(gpt2_tok, " positive") + ids(gpt2_tok, " bad film") \
        + ids(gpt2_tok, " negative")
    q = task.queries[0]
    assert q.query_ids == ids(gpt2_tok, " fine acting") and q.demo_ids is None
    assert q.option_ids == [[3967], [4633]] and q.gold == 0 and q.options == ["positive", "negative"]
    # the teacher reads D + x + option, the distiller D only: the same demonstrations
    b = data.collate([data.Episode(task.demo_ids, q.query_ids, o) for o in q.option_ids])
    teacher = [gpt2_tok.decode(torch.cat([b.demo_ids[i], b.query_ids[i], b.target_ids[i]]).tolist()) for i in range(2)]
    assert teacher == ["great movie positive bad film negative fine acting positive",
                       "great movie positive bad film negative fine acting negative"]
    assert gpt2_tok.decode(b.demo_ids[0].tolist()) == "great movie positive bad film negative"

    (task,), _ = data.load_meta_test(root, "s", gpt2_tok, seeds=(100,), k=2, template="newline", verbose=False)
    q = task.queries[0]
    assert gpt2_tok.decode(task.demo_ids + q.query_ids + q.option_ids[1]) == \
        "great movie\npositive\n\n\nbad film\nnegative\n\n\nfine acting\nnegative"


def test_zero_shot_query_has_no_prefix_space_and_newline(tmp_path, gpt2_tok):
    """MetaICL formats the test input as a first input when there are no demonstrations (is_first = not
    use_demonstrations): zero-shot x has no " " / "\n\n\n" prefix; after a context x keeps it."""
    demos = [row("great movie", "positive"), row("bad film", "negative")]
    root = make_metaicl(tmp_path, {}, {"te": demos})
    long_x = " ".join(["fine"] * 300)
    write_rows(root / "data" / "te" / "te_16_100_test.jsonl",
               [dict(task="te", **row("fine acting", "positive")), dict(task="te", **row(long_x, "negative"))])
    (t,), _ = data.load_meta_test(root, "s", gpt2_tok, seeds=(100,), k=2, verbose=False)
    q = t.queries[0]
    assert q.zero_shot_ids == [38125, 7205] and q.query_ids == [3734, 7205]  # "fine acting" / " fine acting"
    assert gpt2_tok.decode(q.zero_shot_ids + q.option_ids[0]) == "fine acting positive"
    long_q = t.queries[1]  # the same cut as x after a context: 256 - 2 - longest option
    assert len(long_q.zero_shot_ids) == len(long_q.query_ids) == 256 - 2 - 1
    assert long_q.zero_shot_ids == ids(gpt2_tok, long_x)[:253]
    (t,), _ = data.load_meta_test(root, "s", gpt2_tok, seeds=(100,), k=2, template="newline", verbose=False)
    q = t.queries[0]
    assert q.zero_shot_ids == [38125, 7205] and q.query_ids == [628, 198, 38125, 7205]  # "\n\n\nfine acting"
    assert gpt2_tok.decode(q.zero_shot_ids + q.option_ids[1]) == "fine acting\nnegative"
    assert gpt2_tok.decode(t.demo_ids + q.query_ids + q.option_ids[1]) == \
        "great movie\npositive\n\n\nbad film\nnegative\n\n\nfine acting\nnegative"


def test_meta_train_episode_layout_gpt2(tmp_path, gpt2_tok):
    rows = [row(f"input{i} word", f"label{i}", ()) for i in range(10)]
    root = make_metaicl(tmp_path, {"tr": rows}, {}, ttype="free-form")
    s = data.MetaTrainSampler(root, "s", gpt2_tok, k=4, seed=3, verbose=False)
    for _ in range(5):
        ep = next(s)
        text = gpt2_tok.decode(ep.demo_ids)
        demo_nums = re.fullmatch(r"input(\d) word label\1(?: input(\d) word label\2)(?: input(\d) word label\3)"
                                 r"(?: input(\d) word label\4)", text).groups()
        (qn,) = re.fullmatch(r" input(\d) word", gpt2_tok.decode(ep.query_ids)).groups()
        assert ep.target_ids == ids(gpt2_tok, f" label{qn}") and ep.task == "tr"
        assert len(set(demo_nums + (qn,))) == 5  # K+1 distinct rows, the query not among the demonstrations
        assert ep.demo_ids[:3] == ids(gpt2_tok, f"input{demo_nums[0]} word")  # first demo without a space


def test_meta_train_pool_keeps_repeats_of_the_big_file_and_dedups_the_fallback(tmp_path, gpt2_tok):
    """{task}_16384_100_train.jsonl is sampled as written (a repeated (x, y) row is a real sample, so the query's
    input can also be among the demonstrations); the k=16 fallback files overlap across seeds, so they are
    deduplicated."""
    rows = [row("red", "alpha", ()), row("blue", "beta", ())]
    root = make_metaicl(tmp_path, {"tr": rows * 2}, {}, ttype="free-form", seeds=(100, 13))
    s = data.MetaTrainSampler(root, "s", gpt2_tok, k=4, seed=0, verbose=False)
    assert s.pools == [[("red", "alpha"), ("blue", "beta")]]  # 2 files x 2 splits x 4 rows -> 2 distinct rows
    write_rows(root / "data" / "tr" / "tr_16384_100_train.jsonl", [dict(task="tr", **r) for r in rows * 8])
    s = data.MetaTrainSampler(root, "s", gpt2_tok, k=4, seed=0, verbose=False)
    assert len(s.pools[0]) == 16
    eps = [next(s) for _ in range(20)]
    assert all(len(gpt2_tok.decode(e.demo_ids).split()) == 8 for e in eps)  # K = 4 (x, y) pairs every time
    # 5 rows drawn from 8 x red + 8 x blue: the query's input is among the demonstrations unless all 4 are the other
    # colour (p = C(8,4)/C(15,4) = 5%); a deduplicated pool would never show it
    seen = sum(gpt2_tok.decode(e.query_ids).strip() in gpt2_tok.decode(e.demo_ids).split() for e in eps)
    assert seen >= 16


# ------------------------------------------------------------------------------------------------ truncation

def test_truncation_rules(tiny_tokenizer):
    tok = tiny_tokenizer
    long_x = " ".join(["red"] * 300)  # 300+ tokens
    lab = ids(tok, " alpha")
    d, n = data.build_demonstrations(tok, [(long_x, "alpha")], budget=900)
    assert n == 1 and len(d) == 256 + len(lab) and d[-len(lab):] == lab  # x_i cut at its end, label kept
    assert d[:256] == ids(tok, long_x)[:256]
    long_y = " ".join(["beta"] * 300)
    d, _ = data.build_demonstrations(tok, [("red", long_y)], budget=900)
    assert d == ids(tok, "red") + ids(tok, " " + long_y)  # labels are never cut
    one = data.build_demonstrations(tok, [("red cube", "alpha")])[0]
    two = data.build_demonstrations(tok, [("red cube", "alpha")] * 2)[0]
    exact = len(two)
    assert data.build_demonstrations(tok, [("red cube", "alpha")] * 3, budget=exact) == (two, 2)  # exactly fits
    # a demonstration over budget is dropped with every later one, even a later one that would fit
    d, n = data.build_demonstrations(tok, [("red cube", "alpha"), (long_x, "beta"), ("c", "d")], budget=len(one) + 10)
    assert (d, n) == (one, 1)
    assert data.build_demonstrations(tok, [(long_x, "alpha")], budget=5) == ([], 0)
    # query x: cut to 256 - 2 - longest option, never below MIN_QUERY_LEN
    [(x, (o,))] = data._encode_queries(tok, [(long_x, ["alpha"])], "space", 256)
    assert len(x) == 256 - 2 - len(o)
    [(x, _)] = data._encode_queries(tok, [(long_x, [long_y])], "space", 256)
    assert len(x) == data.MIN_QUERY_LEN


def test_meta_test_budget_keeps_teacher_within_max_total(tmp_path, tiny_tokenizer):
    demos = [row(" ".join(["red cube"] * 40), "positive") for _ in range(16)]
    root = make_metaicl(tmp_path, {}, {"te": demos})
    long_q = [row(" ".join(["blue sphere"] * 200), "negative")]
    write_rows(root / "data" / "te" / "te_16_100_test.jsonl", [dict(task="te", **r) for r in long_q + demos[:1]])
    (t,), _ = data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), verbose=False)
    longest = max(len(q.query_ids) + max(map(len, q.option_ids)) for q in t.queries)
    assert len(t.demo_ids) <= min(900, 1024 - longest) and 0 < t.n_demos < 16
    (t2,), _ = data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), max_total=None, max_context=10_000,
                                   verbose=False)
    assert t2.n_demos == 16 and len(t2.demo_ids) > len(t.demo_ids)


def test_meta_test_demonstrations_do_not_depend_on_max_queries(tmp_path, tiny_tokenizer):
    """The long query is last in the file: a smoke run with max_queries=1 must still see the full run's D."""
    demos = [row(" ".join(["red cube"] * 40), "positive") for _ in range(16)]
    root = make_metaicl(tmp_path, {}, {"te": demos})
    write_rows(root / "data" / "te" / "te_16_100_test.jsonl",
               [dict(task="te", **r) for r in demos[:1] + [row(" ".join(["blue sphere"] * 200), "negative")]])
    (full,), _ = data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), verbose=False)
    (smoke,), _ = data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), max_queries=1, verbose=False)
    assert len(smoke.queries) == 1 and len(full.queries) == 2
    assert smoke.demo_ids == full.demo_ids and smoke.n_demos == full.n_demos < 16


# ------------------------------------------------------------------------------------------------ meta-train sampler

def test_meta_train_drops_its_meta_test_tasks(tmp_path, tiny_tokenizer, capsys):
    rows = [row(f"red {i}", "alpha", ("alpha", "beta")) for i in range(4)]
    root = make_metaicl(tmp_path, {"tr": rows, "te": rows}, {"te": rows})
    (root / "config" / "s.json").write_text(json.dumps({"train": ["tr", "te"], "test": ["te"]}))
    s = data.MetaTrainSampler(root, "s", tiny_tokenizer, k=2)
    assert s.tasks == ["tr"] and s.dropped == ["te"] and s.missing == []
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "meta-train s: dropped te from the meta-train tasks (also meta-test tasks of s)"
    assert out[1].startswith("meta-train s: 1 tasks, 4 examples")
    assert {next(s).task for _ in range(10)} == {"tr"}
    with pytest.raises(data.DataError, match="MetaTrainSampler.load_state_dict: expected keys step"):
        s.load_state_dict({"seed": 0})


def test_real_non_nli_to_nli_does_not_meta_train_on_sick(gpt2_tok):
    """MetaICL's non_nli_to_nli config names sick as a meta-train AND a meta-test task; its k=16 train/dev files
    are the meta-test demonstrations, so the sampler drops it. No other setting has such a task."""
    root = shared_path("metaicl")
    overlap = {}
    for setting in data.SETTINGS:
        _, train, test = data.read_setting(root, setting)
        overlap.update({setting: [t for t in train if t in test]} if set(train) & set(test) else {})
    assert overlap == {"non_nli_to_nli": ["sick"]}
    s = data.MetaTrainSampler(root, "non_nli_to_nli", gpt2_tok, verbose=False)
    assert s.dropped == ["sick"] and "sick" not in s.tasks and (len(s.tasks), len(s.missing)) == (49, 5)  # of 55
    demos = {(r[0], r[1]) for r in data.read_jsonl(root / "data" / "sick" / "sick_16_100_train.jsonl")}
    assert not any(r in demos for pool in s.pools for r in pool)


def test_sampler_deterministic_sharded_and_resumable(tiny_metaicl_dir, tiny_tokenizer):
    def make(**kw):
        return data.MetaTrainSampler(tiny_metaicl_dir, "tiny", tiny_tokenizer, verbose=False, **kw)
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    ea, eb, ec = [next(a) for _ in range(8)], [next(b) for _ in range(8)], [next(c) for _ in range(8)]
    assert ea == eb and ea != ec
    assert {e.task for e in ea} <= {"train_a", "train_b", "train_c"} and len({e.task for e in ea}) > 1
    # two ranks interleave into exactly the single-process stream: disjoint global episode numbers
    r0, r1 = make(seed=1, rank=0, world_size=2), make(seed=1, rank=1, world_size=2)
    inter = [e for pair in zip([next(r0) for _ in range(4)], [next(r1) for _ in range(4)]) for e in pair]
    assert inter == ea
    # resume: the same episodes after load_state_dict, also with another world size
    state = a.state_dict()
    rest = [next(a) for _ in range(3)]
    d = make(seed=1)
    d.load_state_dict(state)
    assert [next(d) for _ in range(3)] == rest
    e = make(seed=1, rank=0, world_size=2)
    e.load_state_dict(state)  # global position 8 -> step 4 of 2 ranks
    assert next(e) == rest[0]


# ------------------------------------------------------------------------------------------------ C4 stream

def write_c4(tmp_path, n_files=2, n_docs=15):
    paths = []
    for f in range(n_files):
        lines = [json.dumps({"text": f"doc{f}x{i} " + " ".join(["red cube"] * (3 + i)), "url": "u"})
                 for i in range(n_docs)]
        p = tmp_path / f"c4-{f}.json.gz"
        with gzip.open(p, "wt") as fh:
            fh.write("\n".join(lines) + "\n\n")
        paths.append(str(p))
    return paths


def doc_id(tok, ep):
    return re.match(r"doc\d+x\d+", tok.decode(ep.demo_ids + ep.target_ids)).group(0)


def test_c4_split_shard_shuffle_resume(tmp_path, tiny_tokenizer):
    tok, paths = tiny_tokenizer, write_c4(tmp_path)
    all_lens = {}
    for p in paths:
        for line in gzip.open(p, "rt"):
            if line.strip():
                t = json.loads(line)["text"]
                all_lens[t.split()[0]] = len(ids(tok, t))
    kept = {k for k, n in all_lens.items() if n >= 16}
    assert 0 < len(kept) < len(all_lens)
    s = data.C4Stream(str(tmp_path / "*.json.gz"), tok, beta=0.8, max_len=20, min_len=16, seed=0)
    epoch1 = [next(s) for _ in range(len(kept))]
    for ep in epoch1:
        n = len(ep.demo_ids) + len(ep.target_ids)
        assert n <= 20 and ep.query_ids == [] and len(ep.demo_ids) == int(0.8 * n) and ep.task == "c4"
    assert sorted(doc_id(tok, e) for e in epoch1) == sorted(kept)  # each passage once per epoch
    epoch2 = [next(s) for _ in range(len(kept))]
    assert sorted(doc_id(tok, e) for e in epoch2) == sorted(kept) and epoch2 != epoch1  # reshuffled
    assert s.state_dict()["epoch"] >= 1
    # ranks: disjoint, together all of them
    shards = [data.C4Stream(paths, tok, max_len=20, min_len=16, seed=0, rank=r, world_size=3) for r in range(3)]
    seen = [[doc_id(tok, next(sh)) for _ in range(len(kept) // 3 - 1)] for sh in shards]
    assert not (set(seen[0]) & set(seen[1]) or set(seen[0]) & set(seen[2]) or set(seen[1]) & set(seen[2]))
    full = [data.C4Stream(paths, tok, max_len=20, min_len=16, seed=0, rank=r, world_size=2) for r in range(2)]
    per_rank = [[], []]
    for r, f in enumerate(full):  # one epoch of each rank (per-epoch reshuffling reassigns passages, like
        while f.state_dict()["epoch"] == 0:  # torch's DistributedSampler)
            per_rank[r].append(doc_id(tok, next(f)))
        per_rank[r].pop()  # the first passage of epoch 1
    assert sorted(per_rank[0] + per_rank[1]) == sorted(kept)
    # exact resume, across a shard and an epoch boundary
    a = data.C4Stream(paths, tok, max_len=20, min_len=16, seed=5, rank=1, world_size=2)
    for n_before in (3, 11):
        [next(a) for _ in range(n_before)]
        state = a.state_dict()
        rest = [next(a) for _ in range(12)]
        b = data.C4Stream(paths, tok, max_len=20, min_len=16, seed=5, rank=1, world_size=2)
        b.load_state_dict(state)
        assert [next(b) for _ in range(12)] == rest
    with pytest.raises(data.DataError, match="expected seed=0"):
        data.C4Stream(paths, tok, seed=0).load_state_dict(state)


def test_c4_errors(tmp_path, tiny_tokenizer, monkeypatch):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok fine"}\n{"txt": "no"}\n')
    with pytest.raises(data.DataError) as e:
        [next(data.C4Stream(str(p), tiny_tokenizer, min_len=2)) for _ in range(2)]
    assert str(e.value) == f"{p}:2: expected a JSON object with a 'text' string"
    p.write_text('{"text": "ok"\n')
    with pytest.raises(data.DataError, match=re.escape(f"{p}:1: expected a JSON object (")):
        next(data.C4Stream(str(p), tiny_tokenizer))
    with pytest.raises(data.DataError, match="expected documents of >= min_len=64"):
        p.write_text('{"text": "short"}\n')
        next(data.C4Stream(str(p), tiny_tokenizer))
    with pytest.raises(data.DataError) as e:
        data.C4Stream(str(tmp_path / "none*.json.gz"), tiny_tokenizer)
    assert str(e.value) == (f"{tmp_path / 'none*.json.gz'}: expected a file, folder or glob of C4 shards "
                            f"(*.json, *.json.gz, *.jsonl) or hub:allenai/c4")
    # the hub path exists but cannot run offline: one clear line
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(data.DataError) as e:
        next(data.C4Stream("hub:allenai/c4", tiny_tokenizer))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hub:allenai/c4/en/c4-validation.") and "offline" in msg
    assert msg.endswith("pass local *.json.gz shards instead")


def test_c4_corrupt_shards_and_bad_resume_state(tmp_path, tiny_tokenizer, monkeypatch):
    """Corrupt shards raise DataError (train.py catches only that) naming the file, and the line when known."""
    def first_error(source, **kw):
        with pytest.raises(data.DataError) as e:
            next(data.C4Stream(source, tiny_tokenizer, **kw))
        return str(e.value)
    raw = gzip.compress(("\n".join(json.dumps({"text": "red cube " * 50}) for _ in range(50)) + "\n").encode())
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(raw[:len(raw) // 2])
    assert first_error(str(cut)) == (f"{cut}: expected a gzip JSON-lines C4 shard (EOFError: Compressed file ended "
                                     f"before the end-of-stream marker was reached)")
    plain = tmp_path / "plain.json.gz"
    plain.write_text('{"text": "red cube"}\n')
    assert first_error(str(plain)) == \
        f"{plain}: expected a gzip JSON-lines C4 shard (BadGzipFile: Not a gzipped file (b'{{\"'))"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "red cube"}\n{"text": "\xff\xfe red"}\n')
    s = data.C4Stream(str(latin), tiny_tokenizer, min_len=2)
    with pytest.raises(data.DataError) as e:
        [next(s) for _ in range(2)]
    assert str(e.value) == f"{latin}:2: expected UTF-8 text (invalid start byte at byte 10)"
    # "found none in a whole epoch" names the shard, a hub shard as hub:REPO/FILE (not a Python tuple)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "short"}\n')
    assert first_error(str(short)) == (f"{short}: expected documents of >= min_len=64 tokens for rank 0/1, found "
                                       f"none in a whole epoch")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, repo_type: str(short))
    assert first_error("hub:allenai/c4") == (
        "hub:allenai/c4/en/c4-validation.00000-of-00008.json.gz (and 7 more shards): expected documents of >= "
        "min_len=64 tokens for rank 0/1, found none in a whole epoch")
    s = data.C4Stream(str(short), tiny_tokenizer)
    with pytest.raises(data.DataError) as e:
        s.load_state_dict({"epoch": 0, "seed": 0})
    assert str(e.value) == ("C4Stream.load_state_dict: expected keys epoch, shard, doc (from C4Stream.state_dict()), "
                            "missing shard, doc")


# ------------------------------------------------------------------------------------------------ settings, errors

def test_resolve_setting_aliases(tiny_metaicl_dir):
    for name, want in [("HR_to_LR", "hr_to_lr"), ("HR→LR", "hr_to_lr"), ("hr->lr", "hr_to_lr"),
                       ("Class→Class", "class_to_class"), ("non-Class→Class", "non_class_to_class"),
                       ("non-NLI→NLI", "non_nli_to_nli"), ("QA→QA", "qa_to_qa"), ("non-QA→QA", "non_qa_to_qa"),
                       ("non-Para→Para", "non_paraphrase_to_paraphrase"),
                       ("NON_PARAPHRASE_TO_PARAPHRASE", "non_paraphrase_to_paraphrase")]:
        assert data.resolve_setting(name) == want
    assert data.resolve_setting("tiny", tiny_metaicl_dir) == "tiny"
    with pytest.raises(data.DataError) as e:
        data.resolve_setting("lr_to_hr")
    assert str(e.value) == ("unknown setting 'lr_to_hr': expected one of class_to_class, non_class_to_class, "
                            "qa_to_qa, non_qa_to_qa, non_nli_to_nli, non_paraphrase_to_paraphrase, hr_to_lr "
                            "(paper labels like HR→LR work too) or a config/<name>.json in the data folder")


@pytest.mark.parametrize("line,message", [
    ('{"task": "t", "input": "a", "output": "positive", "options": ["positive"]', "expected a JSON object ("),
    ('{"task": "t", "input": "a", "options": ["positive"]}', "expected field 'output' (fields input, output, options)"),
    ('{"task": "t", "input": "a", "output": "x", "options": []}',
     "expected non-empty 'options' for a classification task"),
    ('{"task": "t", "input": "a", "output": "maybe", "options": ["yes", "no"]}',
     "expected 'output' 'maybe' to be one of 'options' ['yes', 'no']"),
    ('{"task": "t", "input": 3, "output": "yes", "options": ["yes"]}', "expected 'input' to be a str, got int"),
])
def test_bad_metaicl_rows(tmp_path, tiny_tokenizer, line, message):
    root = make_metaicl(tmp_path, {}, {"te": [row("a", "positive")]})
    p = root / "data" / "te" / "te_16_100_test.jsonl"
    p.write_text(json.dumps(dict(task="te", **row("b", "negative"))) + "\n" + line + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), verbose=False)
    assert str(e.value).startswith(f"{p}:2: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("ttype,options,output,message", [
    ("classification", ["yes"], "yes", "expected >= 2 options for a meta-test query, got 1"),
    ("multi-choice", [], "yes", "expected >= 2 options for a meta-test query, got 0"),
    ("free-form", [], "yes", "expected >= 2 options for a meta-test query, got 0"),
    ("multi-choice", [1, "yes"], "yes", "expected every option to be a str, got int 1"),
])
def test_meta_test_query_needs_two_string_options(tmp_path, tiny_tokenizer, ttype, options, output, message):
    """MetaICL asserts >= 2 options per test row: with 0 or 1 the prediction is always "correct"."""
    root = make_metaicl(tmp_path, {}, {"te": [row("a", "yes", ("yes", "no"))] * 16}, ttype=ttype)
    p = root / "data" / "te" / "te_16_100_test.jsonl"
    write_rows(p, [dict(task="te", **row("b", "no", ("yes", "no"))), dict(task="te", input="c", output=output,
                                                                        options=options)])
    with pytest.raises(data.DataError) as e:
        data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), verbose=False)
    assert str(e.value) == f"{p}:2: {message}"
    # dev files as validation queries: the same rule
    (root / "data" / "te" / "te_16_100_dev.jsonl").write_text(p.read_text())
    with pytest.raises(data.DataError, match=re.escape(f"te_16_100_dev.jsonl:2: {message}")):
        data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), split="dev", verbose=False)
    # a non-string option is refused in any file (here a demonstration), with its line
    write_rows(p, [dict(task="te", **row("b", "no", ("yes", "no")))])
    train = root / "data" / "te" / "te_16_100_train.jsonl"
    write_rows(train, [dict(task="te", **row("a", "yes", ("yes", "no")))] * 2 + [
        dict(task="te", input="c", output="yes", options=["yes", None])])
    with pytest.raises(data.DataError) as e:
        data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), k=3, verbose=False)
    assert str(e.value) == f"{train}:3: expected every option to be a str, got NoneType None"


def test_k_above_the_train_file_is_refused(tmp_path, tiny_tokenizer):
    root = make_metaicl(tmp_path, {}, {"te": [row(f"red {i}", "positive") for i in range(16)]})
    (t,), _ = data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), k=16, verbose=False)
    assert t.n_demos == 16
    with pytest.raises(data.DataError) as e:
        data.load_meta_test(root, "s", tiny_tokenizer, seeds=(100,), k=17, verbose=False)
    p = root / "data" / "te" / "te_16_100_train.jsonl"
    assert str(e.value) == f"{p}: --k 17: expected k <= 16, the number of rows of this train file"


def test_missing_files_and_tasks(tmp_path, tiny_tokenizer, capsys):
    root = write_tiny_metaicl(tmp_path)
    import shutil
    shutil.rmtree(root / "data" / "test_b")
    tasks, missing = data.load_meta_test(root, "tiny", tiny_tokenizer)
    assert missing == ["test_b"] and [t.seed for t in tasks] == [100, 13, 21, 42, 87]
    out = capsys.readouterr().out
    assert "4 (task, seed) pairs without their own test file use seed 100's" in out
    assert "meta-test tiny/test: 1 of 2 tasks missing: test_b (no folder)" in out
    assert all(t.queries[0].query_ids == tasks[0].queries[0].query_ids for t in tasks)
    assert len({tuple(t.demo_ids) for t in tasks}) == 5  # each seed its own demonstrations
    dev, _ = data.load_meta_test(root, "tiny", tiny_tokenizer, split="dev", seeds=(100,), verbose=False)
    assert dev[0].split == "dev" and len(dev[0].queries) == 16
    shutil.rmtree(root / "data" / "train_c")
    s = data.MetaTrainSampler(root, "tiny", tiny_tokenizer, k=16)
    assert s.missing == ["train_c"] and "1 of 3 tasks missing: train_c" in capsys.readouterr().out
    p = root / "data" / "test_a" / "test_a_16_13_train.jsonl"
    p.unlink()
    with pytest.raises(data.DataError) as e:
        data.load_meta_test(root, "tiny", tiny_tokenizer, verbose=False)
    assert str(e.value) == f"{p}: expected this MetaICL file (fields task, input, output, options)"
    with pytest.raises(data.DataError, match=re.escape(f"{root / 'config' / 'hr_to_lr.json'}: expected this file")):
        data.MetaTrainSampler(root, "HR→LR", tiny_tokenizer)


# ------------------------------------------------------------------------------------------------ perturb, select, K

def test_perturbations_and_k(tmp_path, gpt2_tok):
    opts = ("alpha", "beta", "gamma")
    demos = [row(f"in{i}", opts[i % 3], opts) for i in range(16)]
    root = make_metaicl(tmp_path, {}, {"te": demos})
    load = lambda **kw: data.load_meta_test(root, "s", gpt2_tok, seeds=(100,), verbose=False, **kw)[0][0]
    dec = lambda t: gpt2_tok.decode(t.demo_ids)
    assert dec(load(k=2)) == "in0 alpha in1 beta" and load(k=2).n_demos == 2  # first k in file order
    assert dec(load(k=3, perturb="no_label")) == "in0 in1 in2"
    assert dec(load(k=3, perturb="no_input")) == " alpha beta gamma"
    gold = [opts[i % 3] for i in range(16)]
    rand = dec(load(perturb="random_label")).split()[1::2]
    assert set(rand) <= set(opts) and rand != gold and rand == dec(load(perturb="random_label")).split()[1::2]
    wrong = dec(load(perturb="wrong_label")).split()[1::2]
    assert all(w != g and w in opts for w, g in zip(wrong, gold)) and len(wrong) == 16
    one = make_metaicl(tmp_path / "one", {}, {"te": [row("a", "only", ["only"])]})  # a one-option demonstration
    write_rows(one / "data" / "te" / "te_16_100_test.jsonl", [dict(task="te", **row("b", "only", ["only", "no"]))])
    (t,), _ = data.load_meta_test(one, "s", gpt2_tok, seeds=(100,), k=1, perturb="wrong_label", verbose=False)
    assert gpt2_tok.decode(t.demo_ids) == "a only"


def test_knn_selection_bm25_and_dense(tmp_path, gpt2_tok):
    pool = [row(f"apple banana {w}", "positive") for w in ("cherry", "grape", "melon", "kiwi")]
    root = make_metaicl(tmp_path, {}, {"te": pool})
    (root / "data" / "te" / "te_16_100_dev.jsonl").write_text(
        json.dumps(dict(task="te", **row("zebra lion tiger", "negative"))) + "\n")
    write_rows(root / "data" / "te" / "te_16_100_test.jsonl",
               [dict(task="te", **row("zebra lion", "negative")),
                dict(task="te", **row("melon kiwi melon", "positive"))])
    (t,), _ = data.load_meta_test(root, "s", gpt2_tok, seeds=(100,), k=2, select="bm25", verbose=False)
    q0, q1 = t.queries
    assert gpt2_tok.decode(q0.demo_ids).endswith(" zebra lion tiger negative")  # the most similar is last
    assert gpt2_tok.decode(q1.demo_ids) == "apple banana kiwi positive apple banana melon positive"
    assert gpt2_tok.decode(t.demo_ids) == "apple banana cherry positive apple banana grape positive"
    scores = data.bm25_scores([[1, 2]], [[1, 1, 3], [2], [4]])
    assert scores.shape == (1, 3) and scores[0, 2] == 0 and scores[0, 0] > 0 and scores[0, 1] > 0

    def embed(seqs):  # bag of token ids, hashed: cosine similarity = token overlap
        out = np.zeros((len(seqs), 64))
        for i, s in enumerate(seqs):
            np.add.at(out[i], np.asarray(s) % 64, 1.0)
        return out
    (t,), _ = data.load_meta_test(root, "s", gpt2_tok, seeds=(100,), k=1, select="dense", embed_fn=embed,
                                  verbose=False)
    assert gpt2_tok.decode(t.queries[0].demo_ids) == "zebra lion tiger negative"
    with pytest.raises(data.DataError, match="expected an embed_fn"):
        data.load_meta_test(root, "s", gpt2_tok, select="dense")
    with pytest.raises(data.DataError, match="perturb 'odd': expected one of none, no_label"):
        data.load_meta_test(root, "s", gpt2_tok, perturb="odd")


# ------------------------------------------------------------------------------------------------ real files

def test_every_real_metaicl_file_parses_for_every_setting(gpt2_tok):
    root = shared_path("metaicl")
    n_rows = 0
    for path in sorted((root / "data").glob("*/*.jsonl")):  # every file, validated
        n_rows += len(data.read_jsonl(path, data.task_type(root, path.parent.name)))
    assert n_rows > 100_000
    for setting in data.SETTINGS:
        s = data.MetaTrainSampler(root, setting, gpt2_tok, seed=0, verbose=False)
        assert len(s.tasks) >= 20 and s.missing
        for t in range(len(s.tasks)):  # an episode of every meta-train task
            ep = s.episode(t, task_index=t)
            assert ep.demo_ids and ep.query_ids and ep.target_ids and ep.task == s.tasks[t]
            assert len(ep.demo_ids) <= 900 and len(ep.demo_ids + ep.query_ids + ep.target_ids) <= 1024
        for split in ("test", "dev"):
            tasks, missing = data.load_meta_test(root, setting, gpt2_tok, split=split, max_queries=2, verbose=False)
            assert tasks and len({t.task for t in tasks}) + len(missing) == len(data.read_setting(root, setting)[2])
            for t in tasks:
                assert 0 < len(t.demo_ids) <= 900 and t.n_demos >= 1 and len(t.queries) == 2
                for q in t.queries:
                    assert 0 <= q.gold < len(q.option_ids) == len(q.options)
                    assert len(t.demo_ids) + len(q.query_ids) + max(map(len, q.option_ids)) <= 1024


def test_real_c4_sample_streams_with_gpt2(gpt2_tok):
    path = shared_path("c4", "c4-train.00000-of-01024.head1000.jsonl")
    texts = [json.loads(line)["text"] for line in open(path)]
    want = sorted(min(len(e.ids), 1024) for e in gpt2_tok.encode_batch(texts, add_special_tokens=False))
    want = [n for n in want if n >= 64]
    s = data.C4Stream(str(path), gpt2_tok, seed=0, min_len=64)
    eps = [next(s) for _ in range(len(want))]
    assert s.state_dict()["epoch"] == 0 and s.skipped == 1000 - len(want)
    lens = [len(e.demo_ids) + len(e.target_ids) for e in eps]
    assert sorted(lens) == want and max(lens) == 1024 and len(want) > 800
    assert all(len(e.demo_ids) == int(0.8 * n) for e, n in zip(eps, lens))


def test_non_utf8_and_unicode_line_separator(tmp_path):
    p = tmp_path / "t_16_100_test.jsonl"
    p.write_bytes(json.dumps(row("a\u2028b", "positive"), ensure_ascii=False).encode() + b"\n")
    assert data.read_jsonl(p, "classification") == [("a\u2028b", "positive", ["positive", "negative"], 0)]
    p.write_bytes(b'{"input": "\xff"}\n')
    with pytest.raises(data.DataError) as e:
        data.read_jsonl(p)
    assert str(e.value) == f"{p}: expected UTF-8 text (invalid start byte at byte 11)"
