"""Data for MEND: C4 passages (stage 1, meta-distillation pretraining) and MetaICL tasks (stage 2 meta-train and
the meta-test protocol), turned into token-id `Episode`s and padded `EpisodeBatch`es.

An episode has three segments (paper §3): the demonstrations D (the K examples, formatted and concatenated), the
query x and the target y. The teacher LLM reads D+x+y, the distiller reads D, the student LLM reads S_D+x+y; the
teacher and the distiller get the *same* D (one id list), so they always see the same demonstrations.
- C4 (Appendix A): a passage truncated to 1024 tokens, D = its first int(beta*n) tokens, x = [], y = the rest.
- MetaICL: `data/{task}/{task}_{k}_{seed}_{split}.jsonl` rows {task, input, output, options}; settings in
  `config/{setting}.json`, task types in `config/tasks/{task}.json`. Formats "space" (the paper's default) and
  "newline" (Table 7); Appendix A truncation; perturbations and kNN selection of §5.2 (Table 3).

Knows tokenizers (a `tokenizers.Tokenizer`), never models: train.py and eval.py feed these batches to mend.py.
"""
import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

SETTINGS = ("class_to_class", "non_class_to_class", "qa_to_qa", "non_qa_to_qa", "non_nli_to_nli",
            "non_paraphrase_to_paraphrase", "hr_to_lr")
_ALIASES = {"hr_to_lr": "hr_to_lr", "class_to_class": "class_to_class", "non_class_to_class": "non_class_to_class",
            "qa_to_qa": "qa_to_qa", "non_qa_to_qa": "non_qa_to_qa", "non_nli_to_nli": "non_nli_to_nli",
            "non_para_to_para": "non_paraphrase_to_paraphrase",
            "non_paraphrase_to_paraphrase": "non_paraphrase_to_paraphrase"}
TEMPLATES = ("space", "newline")
PERTURBATIONS = ("none", "no_label", "no_input", "random_label", "wrong_label")
SELECTIONS = ("random", "bm25", "dense")
META_TEST_SEEDS = (100, 13, 21, 42, 87)
MIN_QUERY_LEN = 16  # the query x keeps at least this many tokens even next to very long options


class DataError(ValueError):
    """Bad or missing data: one line, "path:line: expected ..." (or the path that was expected)."""


# ----------------------------------------------------------------------------------------------------------------
# Episodes and batches

@dataclass
class Episode:
    demo_ids: list   # D: the K demonstrations, formatted and concatenated (teacher and distiller share it)
    query_ids: list  # x: the test input; [] in C4 pretraining
    target_ids: list  # y: the gold answer, one option, or the C4 continuation
    task: str = ""


@dataclass
class EpisodeBatch:
    demo_ids: torch.Tensor    # (B, Td) long, right-padded with pad_id
    demo_mask: torch.Tensor   # (B, Td) 1 = real token
    query_ids: torch.Tensor   # (B, Tq), Tq may be 0
    query_mask: torch.Tensor  # (B, Tq)
    target_ids: torch.Tensor  # (B, Ty) the y / option positions
    target_mask: torch.Tensor  # (B, Ty)

    def to(self, device, non_blocking=False) -> "EpisodeBatch":
        return EpisodeBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in fields(self)})


def _check_state(owner, state, keys):
    """A resume state must hold `keys` (what owner.state_dict() wrote): one clear line instead of a KeyError."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise DataError(f"{owner}.load_state_dict: expected keys {', '.join(keys)} (from {owner}.state_dict()), "
                        f"missing {', '.join(missing)}")


def _pad(seqs, pad_id):
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids, mask


def collate(episodes, pad_id: int = 0) -> EpisodeBatch:
    """Right-pad each segment of a list of episodes into (B, T_segment) long tensors with 0/1 masks."""
    if not episodes:
        raise DataError("collate: expected at least one episode, got an empty list")
    d, dm = _pad([e.demo_ids for e in episodes], pad_id)
    q, qm = _pad([e.query_ids for e in episodes], pad_id)
    y, ym = _pad([e.target_ids for e in episodes], pad_id)
    return EpisodeBatch(d, dm, q, qm, y, ym)


def _encode(tokenizer, texts):
    """Token ids of each text, no special tokens (one Rust batch call)."""
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)] if texts else []


# ----------------------------------------------------------------------------------------------------------------
# C4 stream (stage 1)

_C4_HUB = {"validation": ("en/c4-validation.{:05d}-of-00008.json.gz", 8),
           "train": ("en/c4-train.{:05d}-of-01024.json.gz", 1024)}
_C4_EXTS = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def _expand_c4_sources(sources):
    """Local files / folders / globs -> sorted paths; "hub:allenai/c4[:validation|train]" -> ("hub", repo, file)."""
    out = []
    for src in [sources] if isinstance(sources, (str, Path)) else list(sources):
        src = str(src)
        if src.startswith("hub:"):
            repo, _, split = src[4:].partition(":")
            split = split or "validation"  # MEND pretrained on C4's validation split (notes §3.3)
            if split not in _C4_HUB:
                raise DataError(f"{src}: expected hub:REPO[:validation|train]")
            pattern, n = _C4_HUB[split]
            out += [("hub", repo, pattern.format(i)) for i in range(n)]
        elif os.path.isfile(src):
            out.append(src)
        elif os.path.isdir(src):
            out += sorted(p for p in glob.glob(os.path.join(src, "*")) if p.endswith(_C4_EXTS))
        else:
            hits = sorted(glob.glob(src))
            if not hits:
                raise DataError(f"{src}: expected a file, folder or glob of C4 shards (*.json, *.json.gz, *.jsonl) "
                                f"or hub:allenai/c4")
            out += hits
    if not out:
        raise DataError(f"{sources}: expected at least one C4 shard (*.json, *.json.gz, *.jsonl)")
    return out


def _shard_name(source) -> str:
    """A shard as the user would name it: its path, or hub:REPO/FILE for a hub shard."""
    return f"hub:{source[1]}/{source[2]}" if isinstance(source, tuple) else str(source)


def _open_shard(source):
    if isinstance(source, tuple):  # a hub shard, downloaded into the HF cache only when it is reached
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError
        _, repo, filename = source
        try:
            source = huggingface_hub.hf_hub_download(repo, filename, repo_type="dataset")
        except (OSError, ValueError, HfHubHTTPError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"hub:{repo}/{filename}: expected a downloadable C4 shard, but the hub is unreachable "
                            f"or offline ({type(e).__name__}: {first}); pass local *.json.gz shards instead") from None
    source = str(source)
    return source, (gzip.open(source, "rb") if source.endswith(".gz") else open(source, "rb"))


class C4Stream:
    """Infinite stream of C4 pretraining episodes for one DDP rank.

    Order: epoch e shuffles the shard list with rng(seed, e); each shard's documents (non-blank lines) are
    permuted with rng(seed, e, position of the shard); position j of that permutation goes to rank
    j % world_size, so ranks never share a passage and a rank only parses and tokenizes its own documents.
    Each passage is tokenized (no special tokens), truncated to max_len, skipped if shorter than min_len, and split
    at s = int(beta * n) as in the official code: D = ids[:s], x = [], y = ids[s:].
    state_dict() = (epoch, shard position, document position) of the next document: exact resume.
    """

    def __init__(self, sources, tokenizer, beta=0.8, max_len=1024, min_len=64, seed=0, rank=0, world_size=1,
                 chunk=64):
        if not 0.0 < beta < 1.0:
            raise DataError(f"C4Stream beta={beta}: expected 0 < beta < 1")
        if min_len < 2 or min_len > max_len:
            raise DataError(f"C4Stream min_len={min_len}: expected 2 <= min_len <= max_len={max_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"C4Stream rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        self.shards = _expand_c4_sources(sources)
        self.tokenizer, self.beta, self.max_len, self.min_len = tokenizer, beta, max_len, min_len
        self.seed, self.rank, self.world_size, self.chunk = seed, rank, world_size, chunk
        self.epoch, self.shard, self.doc = 0, 0, 0  # position of the next document to consider
        self.skipped = 0  # documents of this rank shorter than min_len
        self._gen = None

    def state_dict(self):
        return dict(epoch=self.epoch, shard=self.shard, doc=self.doc, skipped=self.skipped, seed=self.seed,
                    rank=self.rank, world_size=self.world_size, n_shards=len(self.shards))

    def load_state_dict(self, state):
        _check_state("C4Stream", state, ("epoch", "shard", "doc"))
        for key in ("seed", "world_size", "n_shards"):
            mine = self.state_dict()[key]
            if state.get(key, mine) != mine:
                raise DataError(f"C4Stream.load_state_dict: expected {key}={mine} (this stream), got {state[key]}")
        self.epoch, self.shard, self.doc = int(state["epoch"]), int(state["shard"]), int(state["doc"])
        self.skipped = int(state.get("skipped", 0))
        self._gen = None

    def __iter__(self):
        return self

    def __next__(self) -> Episode:
        if self._gen is None:
            self._gen = self._generate()
        return next(self._gen)

    def _read(self, source):
        path, f = _open_shard(source)
        try:
            with f:
                lines = f.read().split(b"\n")
        except (OSError, EOFError, zlib.error) as e:  # truncated / not gzip / corrupt: gzip raises all three
            what = "a gzip JSON-lines" if path.endswith(".gz") else "a readable JSON-lines"
            raise DataError(f"{path}: expected {what} C4 shard ({type(e).__name__}: {e})") from None
        keep = np.array([i for i, line in enumerate(lines) if line.strip()], dtype=np.int64)
        return path, lines, keep

    def _generate(self):
        yielded_this_epoch = self.doc > 0 or self.shard > 0
        while True:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
            while self.shard < len(order):
                path, lines, keep = self._read(self.shards[order[self.shard]])
                perm = np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(len(keep))
                first = self.doc + (self.rank - self.doc) % self.world_size  # first own position >= doc
                own = np.arange(first, len(perm), self.world_size)
                for c in range(0, len(own), self.chunk):
                    js = own[c:c + self.chunk]
                    texts = []
                    for j in js:
                        line_no = int(keep[perm[j]])
                        try:
                            row = json.loads(lines[line_no])
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{line_no + 1}: expected a JSON object ({e.msg})") from None
                        except UnicodeDecodeError as e:
                            raise DataError(f"{path}:{line_no + 1}: expected UTF-8 text ({e.reason} at byte "
                                            f"{e.start})") from None
                        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                            raise DataError(f"{path}:{line_no + 1}: expected a JSON object with a 'text' string")
                        texts.append(row["text"])
                    for j, ids in zip(js, _encode(self.tokenizer, texts)):
                        ids = ids[:self.max_len]  # Appendix A: passages truncated to 1024 tokens
                        self.doc = int(j) + 1
                        if len(ids) < self.min_len:
                            self.skipped += 1
                            continue
                        yielded_this_epoch = True
                        s = int(self.beta * len(ids))  # D = first int(beta*n) tokens (notes §3.3)
                        yield Episode(demo_ids=ids[:s], query_ids=[], target_ids=ids[s:], task="c4")
                self.shard, self.doc = self.shard + 1, 0
            if not yielded_this_epoch:
                more = f" (and {len(self.shards) - 1} more shards)" if len(self.shards) > 1 else ""
                raise DataError(f"{_shard_name(self.shards[0])}{more}: expected documents of >= min_len="
                                f"{self.min_len} tokens for rank {self.rank}/{self.world_size}, found none in a "
                                f"whole epoch")
            self.epoch, self.shard, yielded_this_epoch = self.epoch + 1, 0, False


# ----------------------------------------------------------------------------------------------------------------
# MetaICL files

def resolve_setting(name, data_dir=None) -> str:
    """Canonical MetaICL setting name: "HR_to_LR", "hr→lr", "non-Para→Para" ... -> one of SETTINGS. Other names
    (hr_to_lr_inst, a tiny world's setting) are accepted when data_dir/config/{name}.json exists."""
    key = re.sub(r"\s*(→|->)\s*", "_to_", str(name).strip().lower()).replace("-", "_").replace(" ", "_")
    if key in _ALIASES:
        return _ALIASES[key]
    if data_dir is not None and (Path(data_dir) / "config" / f"{key}.json").exists():
        return key
    if data_dir is not None and (Path(data_dir) / "config" / f"{name}.json").exists():
        return str(name)
    raise DataError(f"unknown setting '{name}': expected one of {', '.join(SETTINGS)} (paper labels like HR→LR "
                    f"work too) or a config/<name>.json in the data folder")


def _read_json(path):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: expected this file (MetaICL layout: config/{{setting}}.json, "
                        f"config/tasks/{{task}}.json, data/{{task}}/{{task}}_{{k}}_{{seed}}_{{split}}.jsonl)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: expected valid JSON ({e.msg})") from None


def read_setting(data_dir, setting):
    """(canonical name, train task list, test task list) of config/{setting}.json."""
    name = resolve_setting(setting, data_dir)
    cfg = _read_json(Path(data_dir) / "config" / f"{name}.json")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), list) for k in ("train", "test")):
        raise DataError(f"{Path(data_dir) / 'config' / f'{name}.json'}:1: expected an object with 'train' and "
                        f"'test' task lists")
    return name, cfg["train"], cfg["test"]


def task_type(data_dir, task) -> str:
    """"classification" | "multi-choice" | "free-form", from config/tasks/{task}.json (picks the metric)."""
    path = Path(data_dir) / "config" / "tasks" / f"{task}.json"
    cfg = _read_json(path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task_type"), str):
        raise DataError(f"{path}:1: expected an object with a 'task_type' string")
    return cfg["task_type"]


def read_jsonl(path, ttype="free-form", min_options=0):
    """Rows (input, output, options, gold) of one MetaICL file, validated; gold = options.index(output) or -1
    when options is empty (free-form). min_options=2 for meta-test queries (MetaICL asserts >= 2 options: with
    fewer, the option "chosen" is always the gold). Errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: expected this MetaICL file (fields task, input, output, options)")
    rows = []
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines(): U+2028 may be in a string
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: expected UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: expected a JSON object ({e.msg})") from None
        if not isinstance(d, dict):
            raise DataError(f"{path}:{n}: expected a JSON object with fields input, output, options")
        for key, typ in (("input", str), ("output", str), ("options", list)):
            if key not in d:
                raise DataError(f"{path}:{n}: expected field '{key}' (fields input, output, options)")
            if not isinstance(d[key], typ):
                raise DataError(f"{path}:{n}: expected '{key}' to be a {typ.__name__}, "
                                f"got {type(d[key]).__name__}")
        options = d["options"]
        for o in options:
            if not isinstance(o, str):
                raise DataError(f"{path}:{n}: expected every option to be a str, got {type(o).__name__} {o!r}")
        if not options and ttype == "classification":
            raise DataError(f"{path}:{n}: expected non-empty 'options' for a classification task")
        if len(options) < min_options:
            raise DataError(f"{path}:{n}: expected >= {min_options} options for a meta-test query, "
                            f"got {len(options)}")
        gold = -1
        if options:
            if d["output"] in options:
                gold = options.index(d["output"])
            else:  # MetaICL compares stripped strings
                stripped = [o.strip() for o in options]
                if d["output"].strip() not in stripped:
                    raise DataError(f"{path}:{n}: expected 'output' {d['output']!r} to be one of 'options' "
                                    f"{options!r}")
                gold = stripped.index(d["output"].strip())
        rows.append((d["input"], d["output"], options, gold))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Templates and Appendix A truncation

def _input_text(x, first, template):
    if template == "space":  # MetaICL's space format: non-first inputs get " "
        return x if first else " " + x
    return x if first else ("\n\n\n" + x if x else "\n\n")  # MetaICL add_newlines


def _answer_text(y, template):
    return (" " if template == "space" else "\n") + y


def _check_template(template):
    if template not in TEMPLATES:
        raise DataError(f"template '{template}': expected one of {', '.join(TEMPLATES)}")


def build_demonstrations(tokenizer, demos, template="space", max_len_per_example=256, budget=900):
    """D for a list of (x_i or None, y_i or None) (None = dropped by a perturbation) -> (ids, n_kept).
    Appendix A: x_i over max_len_per_example tokens is cut at its end, labels are never cut, and the first
    demonstration that would push D over `budget` tokens is dropped together with all later ones."""
    _check_template(template)
    texts, slots = [], []
    for i, (x, y) in enumerate(demos):
        slots.append((len(texts) if x is not None else None, len(texts) + (x is not None) if y is not None else None))
        if x is not None:
            texts.append(_input_text(x, i == 0, template))
        if y is not None:
            texts.append(_answer_text(y, template))
    enc = _encode(tokenizer, texts)
    ids, n_kept = [], 0
    for xs, ys in slots:
        demo = (enc[xs][:max_len_per_example] if xs is not None else []) + (enc[ys] if ys is not None else [])
        if len(ids) + len(demo) > budget:
            break
        ids += demo
        n_kept += 1
    return ids, n_kept


def _query_cap(answer_ids, max_len_per_example):
    """Tokens x keeps: max_len_per_example - 2 - longest answer (MetaICL's rule), but never below MIN_QUERY_LEN."""
    return max(max_len_per_example - 2 - max((len(a) for a in answer_ids), default=0), MIN_QUERY_LEN)


def _encode_queries(tokenizer, pairs, template, max_len_per_example):
    """[(x, answers)] -> [(x_ids, [answer_ids])]. x is a non-first input (it follows a context: demonstrations or
    soft vectors) and is cut at its end to _query_cap tokens."""
    texts = []
    for x, answers in pairs:
        texts.append(_input_text(x, False, template))
        texts += [_answer_text(a, template) for a in answers]
    enc, out, p = _encode(tokenizer, texts), [], 0
    for _, answers in pairs:
        x_ids, ans = enc[p], enc[p + 1:p + 1 + len(answers)]
        p += 1 + len(answers)
        out.append((x_ids[:_query_cap(ans, max_len_per_example)], ans))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Meta-train (stage 2)

def _missing_line(what, missing, total):
    return f"{what}: {len(missing)} of {total} tasks missing: {', '.join(missing)}" if missing else ""


class MetaTrainSampler:
    """Infinite stream of meta-train episodes of a setting for one DDP rank.

    Pool per meta-train task: {task}_16384_100_train.jsonl when present, taken as written (repeated (x, y) rows are
    real samples and MetaICL samples them as such), else every k=16 train and dev file of every seed (rows
    deduplicated: those files overlap across seeds). Episode number i (global, over all ranks) is drawn with
    rng(seed, i): a task uniformly among the tasks with >= 2 rows, then K+1 distinct rows (fewer if the pool is
    smaller), the first K as demonstrations in drawn order and the last as (x, y). Rank r takes
    i = n * world_size + r at its n-th step, so the union over ranks equals one process's stream (same global
    batch, same episodes). A meta-train task that is also a meta-test task of the setting (sick in
    non_nli_to_nli, in both lists of MetaICL's config) is dropped, with one printed line (self.dropped).
    state_dict() = the step n: exact resume.
    """

    def __init__(self, data_dir, setting, tokenizer, k=16, seed=0, template="space", rank=0, world_size=1,
                 max_len_per_example=256, max_context=900, max_total=1024, verbose=True):
        _check_template(template)
        if not 0 <= rank < world_size:
            raise DataError(f"MetaTrainSampler rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        data_dir = Path(data_dir)
        self.setting, train_tasks, test_tasks = read_setting(data_dir, setting)
        # a task in both lists (non_nli_to_nli names sick in both, as MetaICL's config does) is a meta-test task:
        # its k=16 files are the meta-test demonstrations, so meta-training on it would leak them
        self.dropped = [t for t in train_tasks if t in set(test_tasks)]
        train_tasks = [t for t in train_tasks if t not in self.dropped]
        self.tokenizer, self.k, self.seed, self.template = tokenizer, k, seed, template
        self.rank, self.world_size = rank, world_size
        self.max_len_per_example, self.max_context, self.max_total = max_len_per_example, max_context, max_total
        self.tasks, self.pools, self.missing, small, fallback = [], [], [], [], 0
        for task in train_tasks:
            folder = data_dir / "data" / task
            big = folder / f"{task}_16384_100_train.jsonl"
            files = [big] if big.exists() else sorted(
                folder.glob(f"{task}_16_*_*.jsonl"), key=lambda p: (int(p.stem.split("_")[-2]), p.stem))
            files = [p for p in files if p == big or p.stem.split("_")[-1] in ("train", "dev")]
            if not files:
                self.missing.append(task)
                continue
            fallback += not big.exists()
            ttype = task_type(data_dir, task)
            rows = [(r[0], r[1]) for p in files for r in read_jsonl(p, ttype)]
            if not big.exists():  # the k=16 files of different seeds share rows: count each example once
                rows = list(dict.fromkeys(rows))
            if len(rows) < 2:
                small.append(f"{task}({len(rows)})")
                continue
            if len(rows) < k + 1:
                small.append(f"{task}({len(rows)})")
            self.tasks.append(task)
            self.pools.append(rows)
        if not self.tasks:
            raise DataError(f"{data_dir / 'data'}: expected files of the meta-train tasks of {self.setting} "
                            f"(data/{{task}}/{{task}}_16384_100_train.jsonl or _16_{{seed}}_train/dev.jsonl)")
        self.step = 0
        if verbose and rank == 0 and self.dropped:
            print(f"meta-train {self.setting}: dropped {', '.join(self.dropped)} from the meta-train tasks "
                  f"(also meta-test tasks of {self.setting})")
        if verbose and rank == 0:
            n = sum(len(p) for p in self.pools)
            print(f"meta-train {self.setting}: {len(self.tasks)} tasks, {n:,} examples"
                  + (f"; {fallback} tasks without {{task}}_16384_100_train.jsonl use their k=16 train+dev files"
                     if fallback else ""))
            if self.missing:
                print(_missing_line(f"meta-train {self.setting}", self.missing, len(train_tasks)))
            if small:
                print(f"meta-train {self.setting}: pools with fewer than K+1={k + 1} rows use all but one as "
                      f"demonstrations (<2 rows: skipped): {', '.join(small)}")

    def state_dict(self):
        return dict(step=self.step, seed=self.seed, rank=self.rank, world_size=self.world_size, k=self.k)

    def load_state_dict(self, state):
        _check_state("MetaTrainSampler", state, ("step",))
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"MetaTrainSampler.load_state_dict: expected seed={self.seed}, got {state['seed']}")
        # a different world size resumes at the same global position
        self.step = int(state["step"]) * int(state.get("world_size", self.world_size)) // self.world_size

    def __iter__(self):
        return self

    def __next__(self) -> Episode:
        ep = self.episode(self.step * self.world_size + self.rank)
        self.step += 1
        return ep

    def episode(self, index, task_index=None) -> Episode:
        """Global episode number `index` (task_index forces the task, for tests and task-balanced use)."""
        rng = np.random.default_rng([self.seed, index])
        t = int(rng.integers(len(self.tasks))) if task_index is None else task_index
        pool = self.pools[t]
        idx = rng.choice(len(pool), size=min(self.k + 1, len(pool)), replace=False)
        x, y = pool[idx[-1]]
        x_ids, (y_ids,) = _encode_queries(self.tokenizer, [(x, [y])], self.template, self.max_len_per_example)[0]
        budget = self.max_context if self.max_total is None else \
            min(self.max_context, self.max_total - len(x_ids) - len(y_ids))
        demo_ids, _ = build_demonstrations(self.tokenizer, [pool[i] for i in idx[:-1]], self.template,
                                           self.max_len_per_example, max(budget, 0))
        return Episode(demo_ids=demo_ids, query_ids=x_ids, target_ids=y_ids, task=self.tasks[t])


# ----------------------------------------------------------------------------------------------------------------
# Meta-test (evaluation and validation)

@dataclass
class Query:
    query_ids: list          # x
    option_ids: list         # one id list per option (the target segment of each scored sequence)
    gold: int                # options.index(output)
    options: list            # option strings
    demo_ids: list = None    # per-query D (select = bm25 | dense); None: use MetaTestTask.demo_ids
    zero_shot_ids: list = None  # x with nothing before it (zero-shot): MetaICL's first input, without the " " /
                                # three-newline prefix (is_first = not use_demonstrations); None: as query_ids


@dataclass
class MetaTestTask:
    task: str
    seed: int
    split: str
    task_type: str           # "classification" (macro-F1) | "multi-choice" | "free-form" (accuracy)
    demo_ids: list           # D shared by every query of this (task, seed): the first k train rows, file order
    queries: list
    n_demos: int = 0         # demonstrations kept in demo_ids after the 900-token budget


def _perturb(rows, perturb, rng):
    """Demonstration (x, y) pairs under a perturbation of §5.2 (None = dropped)."""
    out = []
    for x, y, options, gold in rows:
        if perturb == "no_label":
            y = None
        elif perturb == "no_input":
            x = None
        elif perturb == "random_label" and options:
            y = options[int(rng.integers(len(options)))]
        elif perturb == "wrong_label" and len(options) > 1:
            wrong = [o for i, o in enumerate(options) if i != gold]
            y = wrong[int(rng.integers(len(wrong)))]
        out.append((x, y))
    return out


def bm25_scores(queries, docs, k1=1.5, b=0.75) -> np.ndarray:
    """Okapi BM25 of each query (token-id list) against each document (token-id list) -> (Q, N)."""
    vocab = {t: j for j, t in enumerate(sorted({t for d in docs for t in d}))}
    tf = np.zeros((len(docs), max(len(vocab), 1)))
    for i, d in enumerate(docs):
        np.add.at(tf[i], [vocab[t] for t in d], 1.0)
    df = (tf > 0).sum(0)
    idf = np.log((len(docs) - df + 0.5) / (df + 0.5) + 1.0)
    dl = tf.sum(1, keepdims=True)
    w = idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / max(dl.mean(), 1e-9)))  # (N, V)
    q = np.zeros((len(queries), tf.shape[1]))
    for i, d in enumerate(queries):
        cols = [vocab[t] for t in d if t in vocab]
        np.add.at(q[i], cols, 1.0)
    return q @ w.T


def _select(scores, pool_inputs, query_inputs, k):
    """Top-k pool rows per query, least similar first and the most similar last (next to the query);
    rows whose input equals the query's input are excluded."""
    scores = np.where(np.asarray(query_inputs)[:, None] == np.asarray(pool_inputs)[None, :], -np.inf, scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[int(i) for i in row[::-1] if np.isfinite(s[i])] for row, s in zip(top, scores)]


def load_meta_test(data_dir, setting, tokenizer, seeds=META_TEST_SEEDS, split="test", k=16, template="space",
                   perturb="none", select="random", embed_fn=None, max_queries=None, max_len_per_example=256,
                   max_context=900, max_total=1024, perturb_seed=0, verbose=True):
    """The MetaICL protocol for the test tasks of `setting` -> (list of MetaTestTask, missing task names).

    Per (task, seed): demonstrations = the first k rows of {task}_16_{seed}_train.jsonl in file order (perturbed
    if asked); queries = every row of {task}_16_{seed}_{split}.jsonl (split "dev" for validation), the seed-100
    test file standing in for a seed without one; all rows are parsed and validated, the first max_queries are
    tokenized. One D serves all queries of a (task, seed); its budget is min(max_context, max_total - longest
    x + option) so that the teacher's D+x+option fits max_total. select = bm25 | dense gives each query its own D
    chosen among that seed's train + dev rows (embed_fn(list of id lists) -> (N, d) array for dense).
    Each query row needs >= 2 string options (MetaICL asserts it); k above the rows of a train file is refused.
    Query.query_ids is x after a context (" x"); Query.zero_shot_ids is x with nothing before it (zero-shot).
    """
    _check_template(template)
    if perturb not in PERTURBATIONS:
        raise DataError(f"perturb '{perturb}': expected one of {', '.join(PERTURBATIONS)}")
    if select not in SELECTIONS:
        raise DataError(f"select '{select}': expected one of {', '.join(SELECTIONS)}")
    if select == "dense" and embed_fn is None:
        raise DataError("select 'dense': expected an embed_fn(list of id lists) -> (N, d) array")
    data_dir = Path(data_dir)
    name, _, test_tasks = read_setting(data_dir, setting)
    tasks, missing, reasons, fallbacks = [], [], [], 0
    for task in test_tasks:
        folder = data_dir / "data" / task
        if not folder.is_dir():
            missing.append(task)
            reasons.append(f"{task} (no folder)")
            continue
        ttype, cache, found = task_type(data_dir, task), {}, []
        for seed in seeds:
            qpath = folder / f"{task}_16_{seed}_{split}.jsonl"
            if not qpath.exists() and split == "test":
                others = sorted(folder.glob(f"{task}_16_*_test.jsonl"), key=lambda p: p.stem.split("_")[-2] != "100")
                qpath = others[0] if others else qpath
                fallbacks += qpath.exists()
            if not qpath.exists():
                continue
            found.append((seed, qpath))
        if not found:
            missing.append(task)
            reasons.append(f"{task} (no {split} file)")
            continue
        for seed, qpath in found:
            if qpath not in cache:  # parse and tokenize each query file once (the test file is shared by seeds)
                rows = read_jsonl(qpath, ttype, min_options=2)
                enc = _encode_queries(tokenizer, [(r[0], r[2]) for r in rows], template, max_len_per_example)
                # D's budget leaves room for the longest x + option of the WHOLE file, so D does not depend on
                # --max_queries (smoke runs and validation see the demonstrations of the full evaluation)
                longest = max((len(x) + max(len(o) for o in opts) for x, opts in enc), default=0)
                n = len(rows) if max_queries is None else max_queries
                rows, enc = rows[:n], enc[:n]
                # zero-shot: nothing precedes x, so MetaICL formats it as a first input (no prefix), same cut
                zero = _encode(tokenizer, [_input_text(r[0], True, template) for r in rows])
                zero = [z[:_query_cap(opts, max_len_per_example)] for z, (_, opts) in zip(zero, enc)]
                cache[qpath] = (rows, enc, zero, longest)
            rows, enc, zero, longest = cache[qpath]
            tpath = folder / f"{task}_16_{seed}_train.jsonl"
            train = read_jsonl(tpath, ttype)
            if k > len(train):  # would silently use fewer demonstrations than the run records
                raise DataError(f"{tpath}: --k {k}: expected k <= {len(train)}, the number of rows of this train "
                                f"file")
            rng = np.random.default_rng([perturb_seed, seed, zlib.crc32(task.encode())])
            budget = max(0, max_context if max_total is None else min(max_context, max_total - longest))
            demo_ids, n_demos = build_demonstrations(tokenizer, _perturb(train[:k], perturb, rng), template,
                                                     max_len_per_example, budget)
            per_query = [None] * len(rows)
            if select != "random" and rows:
                dev = folder / f"{task}_16_{seed}_dev.jsonl"
                pool = list({r[0]: r for r in train + (read_jsonl(dev, ttype) if dev.exists() else [])}.values())
                pool_x = [ids for ids, _ in _encode_queries(tokenizer, [(r[0], []) for r in pool], template,
                                                             max_len_per_example)]
                if select == "bm25":
                    scores = bm25_scores([x for x, _ in enc], pool_x)
                else:
                    qe, pe = np.asarray(embed_fn([x for x, _ in enc]), float), np.asarray(embed_fn(pool_x), float)
                    qe /= np.linalg.norm(qe, axis=1, keepdims=True) + 1e-12
                    pe /= np.linalg.norm(pe, axis=1, keepdims=True) + 1e-12
                    scores = qe @ pe.T  # cosine similarity (Q, N)
                chosen = _select(scores, [r[0] for r in pool], [r[0] for r in rows], k)
                for qi, sel in enumerate(chosen):
                    per_query[qi] = build_demonstrations(tokenizer, _perturb([pool[i] for i in sel], perturb, rng),
                                                         template, max_len_per_example, budget)[0]
            queries = [Query(query_ids=x, option_ids=opts, gold=r[3], options=r[2], demo_ids=d, zero_shot_ids=z)
                       for (x, opts), z, r, d in zip(enc, zero, rows, per_query)]
            tasks.append(MetaTestTask(task=task, seed=seed, split=split, task_type=ttype, demo_ids=demo_ids,
                                      queries=queries, n_demos=n_demos))
    if verbose:
        note = (f"; {fallbacks} (task, seed) pairs without their own test file use seed 100's (MetaICL's test "
                f"split does not depend on the seed)") if fallbacks else ""
        print(f"meta-test {name}/{split}: {len(test_tasks) - len(missing)} of {len(test_tasks)} tasks, "
              f"{len(tasks)} (task, seed) pairs{note}")
        if missing:
            print(_missing_line(f"meta-test {name}/{split}", reasons, len(test_tasks)))
    return tasks, missing
