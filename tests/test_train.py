"""Tests for train.py: both stages end to end (GPT-2 and T5), the baselines, exact resume, DDP equality (2 gloo
processes), the bf16 / fp16 loop paths on CPU, atomic checkpoints and the one-line user errors. Tiny models from
conftest; a tiny C4 file written here. Everything offline, deterministic, CPU."""
import gzip
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mend
import model
import train

INIT_STD = 0.1
ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the red cube is heavy . label : alpha the blue sphere is light . label : beta question : what colour is "
         "the sky ? answer : blue sentence 1 : a cat sat . sentence 2 : a dog ran . entailment positive negative "
         "neutral yes no true false").split()



@pytest.fixture(scope="module")
def sharp_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny GPT-2 LLM with larger random weights (init std 0.1): peaked, context-dependent next-token
    distributions, so the teacher (with D) and the student (with S_D) differ and the losses have room to fall."""
    cfg = dict(model_type="gpt2", vocab_size=tiny_tokenizer.get_vocab_size(), n_positions=512, n_embd=64,
               n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1, initializer_range=INIT_STD)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sharp-gpt2")
    model.save_pretrained(model.build_model(cfg), out, tokenizer=tiny_tokenizer)
    return out


@pytest.fixture(scope="module")
def tiny_c4(tmp_path_factory):
    """A C4-format shard (json.gz, one {"text": ...} per line) of 64 passages of ~90-140 tokens."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("c4") / "c4-train.00000-of-00001.json.gz"
    with gzip.open(path, "wt") as f:
        for i in range(64):
            # a repeated phrase per passage: the continuation is predictable from D (the teacher copies)
            phrase = " ".join(rng.choice(WORDS) for _ in range(6))
            f.write(json.dumps({"text": " ".join([phrase] * 12), "url": f"u{i}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def flat_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny GPT-2 LLM with init std 1e-4: nearly uniform next-token distributions, so L_distill and its
    gradients are tiny (grad norm ~3e-7), below what fp16 activations hold without loss scaling."""
    cfg = dict(model_type="gpt2", vocab_size=tiny_tokenizer.get_vocab_size(), n_positions=512, n_embd=64,
               n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1, initializer_range=1e-4)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("flat-gpt2")
    model.save_pretrained(model.build_model(cfg), out, tokenizer=tiny_tokenizer)
    return out


@pytest.fixture(scope="module")
def tiny_gpt2_nodrop_dir(tmp_path_factory, tiny_tokenizer):
    """A d=32 GPT-2 distiller without dropout (so DDP and single-process runs draw no random masks)."""
    cfg = dict(model_type="gpt2", vocab_size=tiny_tokenizer.get_vocab_size(), n_positions=512, n_embd=32,
               n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1, embd_pdrop=0.0, attn_pdrop=0.0,
               resid_pdrop=0.0)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-gpt2-nodrop")
    model.save_pretrained(model.build_model(cfg), out, tokenizer=tiny_tokenizer)
    return out


def common(llm, distiller, metaicl, out, *extra):
    return ["--llm", str(llm), "--distiller", str(distiller), "--data_dir", str(metaicl), "--out", str(out),
            "--l", "4", "--k", "4", "--val_max_queries", "4", "--log_every", "1", "--device", "cpu", *extra]


def train_losses(out):
    return [r["loss"] for r in map(json.loads, open(Path(out) / "log.jsonl")) if r["type"] == "train"]


def mean(xs):
    return sum(xs) / len(xs)


def first_last(losses, n=10):
    return mean(losses[:n]), mean(losses[-n:])


# ----------------------------------------------------------------------------------------------------------------
# both stages, both families, the baselines

def test_pretrain_then_finetune_gpt2(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tiny_c4, tmp_path):
    import eval as meval
    import mend

    pre = tmp_path / "pre"
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, pre, "--stage", "pretrain",
                          "--split", "tiny", "--c4", str(tiny_c4), "--max_steps", "60", "--lr", "1e-2",
                          "--schedule", "constant", "--eval_every", "30", "--save_every", "30"))
    a, b = first_last(train_losses(pre), 20)
    assert b < 0.95 * a, (a, b)                     # L_distill falls (measured: 0.298 -> 0.261)
    recs = [json.loads(x) for x in open(pre / "log.jsonl")]
    keys = {"step", "loss", "distill", "lr", "tokens_per_s", "eta_s", "grad_norm", "skipped"}
    assert keys <= set(recs[0]) and "pred" not in recs[0] and recs[0]["lr"] == pytest.approx(1e-2)
    assert [x["step"] for x in recs if x["type"] == "val"] == [30, 60]
    assert r["step"] == 60 and (pre / "last" / train.STATE_FILE).is_file()
    assert (pre / "best" / "config.json").is_file() and json.load(open(pre / "best" / "train_info.json"))["step"] in (30, 60)

    ft = tmp_path / "ft"
    train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, ft, "--stage", "finetune",
                      "--split", "tiny", "--init", str(pre / "best"), "--max_steps", "60", "--lr", "1e-2",
                      "--schedule", "constant", "--eval_every", "30"))
    a, b = first_last(train_losses(ft), 20)
    assert b < 0.97 * a, (a, b)                     # L_pred + L_distill falls
    rec = json.loads(open(ft / "log.jsonl").readline())
    assert rec["loss"] == pytest.approx(rec["pred"] + rec["distill"], rel=1e-5)   # lam = 1
    # the best module is what eval.py loads and scores
    module = mend.load(ft / "best", llm_name=str(sharp_gpt2_dir))
    assert isinstance(module, mend.MEND) and module.l == 4 and module.projection == "tanh"  # auto: widths differ
    assert meval.load_module("mend", ft / "best", str(sharp_gpt2_dir), torch.float32, "cpu").l == 4


def test_t5_family_both_stages(tiny_t5_dir, tiny_t5_distiller_dir, tiny_metaicl_dir, tiny_c4, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    train.main(common(tiny_t5_dir, tiny_t5_distiller_dir, tiny_metaicl_dir, pre, "--stage", "pretrain",
                      "--split", "tiny", "--c4", str(tiny_c4), "--max_steps", "40", "--lr", "1e-2",
                      "--schedule", "constant", "--eval_every", "20"))
    a, b = first_last(train_losses(pre), 10)
    assert b < 0.8 * a, (a, b)                      # measured: 9.5 -> 7.1
    train.main(common(tiny_t5_dir, tiny_t5_distiller_dir, tiny_metaicl_dir, ft, "--stage", "finetune",
                      "--split", "tiny", "--init", str(pre / "best"), "--max_steps", "40", "--lr", "1e-2",
                      "--schedule", "constant", "--eval_every", "20"))
    a, b = first_last(train_losses(ft), 10)
    assert b < 0.9 * a, (a, b)
    assert (ft / "best" / "config.json").is_file()


def test_baselines_and_default_run_folders(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tiny_c4,
                                           tmp_path, monkeypatch):
    """HyperTuning = pretrain --objective clm, then finetune --objective pred; PromptTuning = finetune --method
    prompt_tuning. Default folders are the ones eval.py reads: runs/finetune-{method}-{split}/best."""
    monkeypatch.chdir(tmp_path)
    base = ["--llm", str(sharp_gpt2_dir), "--distiller", str(tiny_gpt2_distiller_dir), "--data_dir",
            str(tiny_metaicl_dir), "--l", "4", "--k", "4", "--log_every", "1", "--device", "cpu", "--lr", "1e-2",
            "--eval_every", "0", "--split", "tiny"]
    train.main(base + ["--stage", "pretrain", "--objective", "clm", "--c4", str(tiny_c4), "--max_steps", "20",
                       "--projection", "linear"])
    pre = Path("runs/pretrain-hypertuning-c4")
    a, b = first_last(train_losses(pre), 5)
    assert b < a and "clm" in json.loads(open(pre / "log.jsonl").readline())
    assert json.load(open(pre / "best" / "config.json"))["projection"] == "linear"  # --projection reaches MEND
    train.main(base + ["--stage", "finetune", "--objective", "pred", "--init", str(pre / "best"), "--max_steps", "5"])
    assert (Path("runs/finetune-hypertuning-tiny/best") / "config.json").is_file()
    train.main(base + ["--stage", "finetune", "--init", str(pre / "best"), "--max_steps", "2"])  # Table 4's CLM row
    assert set(json.loads(open("runs/finetune-mend-clm-tiny/log.jsonl").readline())) >= {"pred", "distill"}
    train.main(base + ["--stage", "finetune", "--objective", "distill", "--max_steps", "2"])     # w/o L_pred
    rec = json.loads(open("runs/finetune-mend-distill-tiny/log.jsonl").readline())
    assert set(rec) >= {"distill", "loss"} and "pred" not in rec and rec["loss"] == rec["distill"]
    (pre / "best").rename(pre / ".best.old")  # a crash between the renames of a save: --init reads the old copy
    r = train.main(base + ["--stage", "finetune", "--init", str(pre / "best"), "--max_steps", "1", "--overwrite"])
    assert r["out"] == str(Path("runs/finetune-mend-clm-tiny")) and r["step"] == 1  # objective read from it too
    train.main(base + ["--stage", "finetune", "--method", "prompt_tuning", "--max_steps", "40"])
    pt = Path("runs/finetune-prompt_tuning-tiny")
    assert json.load(open(pt / "best" / "config.json"))["kind"] == "prompt_tuning"
    rec = json.loads(open(pt / "log.jsonl").readline())
    assert set(rec) >= {"pred", "loss"} and "distill" not in rec   # PromptTuning's default objective: pred
    a, b = first_last(train_losses(pt))
    assert b < 0.95 * a, (a, b)


def test_run_names_keep_ablations_apart_from_baselines(tmp_path):
    """Every trained variant gets its own default folder: the no-L_distill ablation never lands where eval.py
    looks for HyperTuning."""
    clm = tmp_path / "clm"
    clm.mkdir()
    (clm / "train_info.json").write_text(json.dumps({"config": {"objective": "clm"}}))
    cfg = lambda **kw: train.TrainConfig(**kw)  # noqa: E731
    assert cfg(stage="pretrain", objective="distill").run_name() == "mend"
    assert cfg(stage="pretrain", objective="clm").run_name() == "hypertuning"
    assert cfg(stage="pretrain", objective="clm+distill").run_name() == "mend-clm_distill"
    assert cfg(stage="finetune", objective="finetune").run_name() == "mend"
    assert cfg(stage="finetune", objective="pred", init=str(clm)).run_name() == "hypertuning"
    assert cfg(stage="finetune", objective="pred", init=str(tmp_path / "distill-run")).run_name() == "mend-pred"
    assert cfg(stage="finetune", method="prompt_tuning", objective="pred").run_name() == "prompt_tuning"
    assert cfg(stage="finetune", objective="distill").run_name() == "mend-distill"        # Table 4: w/o L_pred
    assert cfg(stage="finetune", objective="finetune", init=str(clm)).run_name() == "mend-clm"  # Table 4: CLM row


def test_single_gpu_device_gets_an_index(monkeypatch):
    """torch.cuda.set_device needs an indexed device: plain --device cuda on one GPU must become cuda:0; and the
    cuDNN SDPA backend (a new plan per episode length: 4x slower steps on an H200) is switched off there."""
    seen, cudnn_sdp = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(torch.device(d)))
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", cudnn_sdp.append)
    for flag in ("", "cuda"):
        rank, world, device = train.setup_distributed(train.TrainConfig(device=flag))
        assert (rank, world, str(device)) == (0, 1, "cuda:0")
    assert seen == [torch.device("cuda:0")] * 2
    assert cudnn_sdp == [False, False]
    train.setup_distributed(train.TrainConfig(device="cpu"))
    assert cudnn_sdp == [False, False]


def test_truncate_log_drops_a_half_written_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n{"type": "train", "st')
    train._truncate_log(log, 1)
    assert log.read_text() == '{"type": "train", "step": 1}\n'


def _val_steps(out):
    return [r["step"] for r in map(json.loads, open(Path(out) / "log.jsonl")) if r["type"] == "val"]


def test_the_final_step_is_always_validated(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tmp_path,
                                            capsys):
    """Validation on: the last step is validated even when --eval_every does not divide --max_steps or exceeds it,
    so best/ exists and covers the whole run, and the final summary names it truthfully."""
    def run(out, *a):
        return train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, "--stage",
                                 "finetune", "--split", "tiny", "--lr", "1e-2", *a))

    once = tmp_path / "once"                          # --eval_every 10 > --max_steps 3: the cadence never fires
    r = run(once, "--max_steps", "3", "--eval_every", "10")
    info = json.load(open(once / "best" / "train_info.json"))
    assert _val_steps(once) == [3] and r["best_step"] == info["step"] == 3 and info["val_score"] == r["best"]
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"best module in {once / 'best'}")
    tail = tmp_path / "tail"                          # 5 steps, every 2: steps 2, 4 and the final 5
    r = run(tail, "--max_steps", "5", "--eval_every", "2", "--patience", "0")
    assert _val_steps(tail) == [2, 4, 5] and torch.load(tail / "last" / train.STATE_FILE,
                                                        weights_only=False)["val_step"] == 5
    r = run(tail, "--max_steps", "5", "--eval_every", "2", "--patience", "0", "--resume")  # a finished run
    assert r["step"] == 5 and _val_steps(tail) == [2, 4, 5]                              # ... is not re-validated


# ----------------------------------------------------------------------------------------------------------------
# exact resume, DDP equality

def _log(out):
    return {r["step"]: r for r in map(json.loads, open(Path(out) / "log.jsonl")) if r["type"] == "train"}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_continues_exactly(stage, sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tiny_c4,
                                  tmp_path):
    """A run killed at step 5 (last checkpoint: step 3) and resumed gives the uninterrupted run's log line for line.
    The distiller has dropout on (torch RNG), the data position matters (C4 stream / meta-train sampler), Adam
    moments, the linear schedule, the early-stopping state and the progress window (--log_every 2: the step-4 line
    averages steps 3 and 4 across the restart) are all restored."""
    args = ["--stage", stage, "--split", "tiny", "--c4", str(tiny_c4), "--max_steps", "8", "--lr", "1e-2",
            "--save_every", "3", "--eval_every", "2", "--log_every", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, full, *args))
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, cut, *args, "--stop_at", "5"))
    assert r["stopped"] == "stop_at" and max(_log(cut)) == 4
    state = torch.load(cut / "last" / train.STATE_FILE, weights_only=False)
    assert state["step"] == 3 and state["per_rank"][0]["n_win"] == 1 and set(state["per_rank"][0]["window"]) >= \
        {"loss", "distill"}                                # step 3's terms, not yet logged
    train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, cut, *args, "--resume"))
    lines = lambda out: [r for r in map(json.loads, open(out / "log.jsonl")) if r["type"] == "train"]
    a, b = lines(full), lines(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]   # step 4 recomputed, not logged twice
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key in ("loss", "distill", "pred", "lr", "grad_norm", "skipped"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-6, rel=0), (ra["step"], key)
    from safetensors.torch import load_file
    wa, wb = load_file(full / "last" / "model.safetensors"), load_file(cut / "last" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    vals = lambda out: [(r["step"], r["val_score"], r["bad_evals"]) for r in map(json.loads, open(out / "log.jsonl"))
                        if r["type"] == "val"]
    assert vals(full) == vals(cut)


def test_resume_refuses_changed_settings(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tmp_path):
    """--resume continues the same run: every flag that changes the steps' math must match the checkpoint (each
    difference named, saved vs given); cadence and logging flags may change; the same folder spelled differently
    is the same --data_dir."""
    import shutil

    out = tmp_path / "run"

    def run(data_dir, *a):
        return common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, data_dir, out, "--stage", "finetune", "--split", "tiny",
                      "--max_steps", "4", "--eval_every", "0", "--save_every", "2", *a)

    train.main(run(tiny_metaicl_dir, "--stop_at", "3"))                 # last/ at step 2
    before = (out / "log.jsonl").read_text()
    last, tail = out / "last", ("expected the same values (only --log_every, --eval_every, --save_every, --stop_at, "
                                "--device, --val_batch_size, --patience may change on resume)")
    msg = _exits(run(tiny_metaicl_dir, "--resume", "--max_steps", "6", "--warmup_steps", "1", "--grad_clip", "0.5",
                     "--weight_decay", "0.1", "--llm_dtype", "bf16"))
    assert msg == (f"train.py: --resume: {last} was trained with --weight_decay 0.0 (given 0.1), --warmup_steps 0 "
                   f"(given 1), --max_steps 4 (given 6), --grad_clip 1.0 (given 0.5), --llm_dtype 'fp32' (given "
                   f"'bf16'): {tail}")
    assert _exits(run(tiny_metaicl_dir, "--resume", "--precision", "bf16", "--adam_eps", "1e-6")) == (
        f"train.py: --resume: {last} was trained with --adam_eps 1e-08 (given 1e-06), --precision 'fp32' (given "
        f"'bf16'): {tail}")
    other = tmp_path / "other-metaicl"
    shutil.copytree(tiny_metaicl_dir, other)
    assert _exits(run(other, "--resume", "--init", str(out / "last"))) == (
        f"train.py: --resume: {last} was trained with --init '' (given '{out / 'last'}'), --data_dir "
        f"'{tiny_metaicl_dir}' (given '{other}'): {tail}")
    assert (out / "log.jsonl").read_text() == before                      # nothing written by the refusals
    assert sorted(p.name for p in out.iterdir()) == ["last", "log.jsonl"]
    # allowed: the cadence and logging flags; --precision auto is what it resolved to (fp32 on CPU)
    r = train.main(run(f"{tiny_metaicl_dir}/.", "--resume", "--log_every", "2", "--save_every", "1",
                       "--precision", "fp32", "--patience", "9"))
    assert r["step"] == 4 and sorted(_log(out)) == [1, 2, 4]
    # a bf16 run resumed with the default --precision auto (fp32 on this CPU): the message says what auto became
    out = tmp_path / "bf16"
    train.main(run(tiny_metaicl_dir, "--precision", "bf16", "--stop_at", "3"))
    assert _exits(run(tiny_metaicl_dir, "--resume")) == (
        f"train.py: --resume: {out / 'last'} was trained with --precision 'bf16' (given 'auto, i.e. fp32 on this "
        f"device'): {tail}")


def test_ddp_two_gloo_processes_match_one_process(sharp_gpt2_dir, tiny_gpt2_nodrop_dir, tiny_metaicl_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo) x batch 1 == 1 process x batch 1 x grad_accum 2: the same global batch of
    the same episodes (MetaTrainSampler: rank r takes global episode n*2+r), the same losses and weights."""
    args = ["--stage", "finetune", "--split", "tiny", "--max_steps", "4", "--lr", "1e-2", "--eval_every", "2",
            "--save_every", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(common(sharp_gpt2_dir, tiny_gpt2_nodrop_dir, tiny_metaicl_dir, one, *args, "--grad_accum", "2"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = ["--virtual_demo_len" if a == "--l" else a for a in common(sharp_gpt2_dir, tiny_gpt2_nodrop_dir,
                                                                      tiny_metaicl_dir, two, *args)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *cli]  # torchrun reads "--l" as an abbreviation of its own flags
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world=2" in p.stdout and "global batch=2" in p.stdout
    a, b = _log(one), _log(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        for key in ("loss", "pred", "distill"):
            assert b[s][key] == pytest.approx(a[s][key], abs=1e-5, rel=0), (s, key)
    from safetensors.torch import load_file
    wa, wb = load_file(one / "last" / "model.safetensors"), load_file(two / "last" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert json.load(open(one / "best" / "train_info.json"))["step"] == json.load(open(two / "best" / "train_info.json"))["step"]


# ----------------------------------------------------------------------------------------------------------------
# precision paths on CPU: bf16 autocast, fp16 autocast + GradScaler, skipped non-finite steps

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_paths_on_cpu(precision, sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tmp_path):
    import mend
    from safetensors.torch import load_file

    torch.manual_seed(0)
    init = tmp_path / "init"
    mend.MEND(model.from_pretrained(tiny_gpt2_distiller_dir), 64, l=4, llm_name=str(sharp_gpt2_dir)).save(init)
    args = ["--stage", "finetune", "--split", "tiny", "--max_steps", "6", "--lr", "1e-2", "--eval_every", "3",
            "--init", str(init)]
    ref, amp = tmp_path / "fp32", tmp_path / precision
    train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, ref, *args, "--precision", "fp32"))
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, amp, *args,
                          "--precision", precision, "--llm_dtype", precision))
    a, b = _log(ref), _log(amp)
    assert b[1]["loss"] != a[1]["loss"]                                   # autocast really ran in half precision
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=0.05)         # ... and agrees with fp32 at step 1
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in b.values())
    state = torch.load(amp / "last" / train.STATE_FILE, weights_only=False)
    assert (state["scaler"] is not None) == (precision == "fp16")      # GradScaler only for fp16
    assert r["skipped"] == state["skipped"] == b[6]["skipped"] < 6                # at least one step was taken
    w, w0 = load_file(amp / "last" / "model.safetensors"), load_file(init / "model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())  # fp32 master weights
    assert (w["placeholders"] - w0["placeholders"]).abs().max() > 1e-3          # ... and it moved the weights
    assert (w["proj.weight"] - w0["proj.weight"]).abs().max() > 1e-3


def test_fp16_llm_weights_use_the_grad_scaler(flat_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tmp_path):
    """--llm_dtype fp16 under --precision fp32 backpropagates through fp16 LLM activations: without loss scaling
    these L_distill gradients (norm ~3e-7) flush to exactly 0 (measured: grad norm 0.0 at both steps, the weights
    never move). The GradScaler runs whenever fp16 is involved, so they match the fp32 LLM's."""
    args = ["--stage", "finetune", "--split", "tiny", "--objective", "distill", "--max_steps", "2", "--eval_every",
            "0", "--precision", "fp32"]
    ref, half = tmp_path / "fp32", tmp_path / "fp16"
    train.main(common(flat_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, ref, *args))
    r = train.main(common(flat_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, half, *args,
                          "--llm_dtype", "fp16"))
    a, b = _log(ref), _log(half)
    for s in (1, 2):
        assert 1e-7 < a[s]["grad_norm"] < 1e-6                              # measured: 2.96e-7, 2.01e-7
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=0.01), s   # measured: within 1e-3
    assert r["skipped"] == 0
    assert torch.load(half / "last" / train.STATE_FILE, weights_only=False)["scaler"] is not None


@pytest.mark.parametrize("use_scaler", [False, True])
def test_non_finite_gradients_skip_the_step(use_scaler):
    """A step whose gradients hold inf/NaN is skipped (weights and Adam state untouched) and reported as skipped;
    with GradScaler (fp16) the scale is lowered, the next finite step is taken."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    params = list(lin.parameters())
    opt = torch.optim.AdamW(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if use_scaler else None
    before = [p.detach().clone() for p in params]
    loss = lin(torch.full((2, 4), float("inf"))).sum()
    (scaler.scale(loss) if scaler else loss).backward()
    norm, skipped = train.optimizer_step(params, opt, scaler, grad_clip=1.0)
    assert skipped and not math.isfinite(norm)
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and not opt.state
    assert all(p.grad is None for p in params)
    if scaler:
        assert scaler.get_scale() == 2.0 ** 7
    loss = lin(torch.ones(2, 4)).sum()
    (scaler.scale(loss) if scaler else loss).backward()
    norm, skipped = train.optimizer_step(params, opt, scaler, grad_clip=1.0)
    assert not skipped and math.isfinite(norm)
    assert not torch.equal(before[0], params[0]) and torch.isfinite(params[0]).all()


def test_nan_loss_in_the_loop_is_skipped_and_logged(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir,
                                                     tmp_path, monkeypatch):
    import mend
    real, calls = mend.mend_loss, []

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:  # step 2's loss is NaN
            out = {key: v * float("nan") for key, v in out.items()}
        return out

    monkeypatch.setattr(mend, "mend_loss", poisoned)
    out = tmp_path / "nan"
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, "--stage", "finetune",
                          "--split", "tiny", "--max_steps", "4", "--eval_every", "0"))
    log = _log(out)
    assert r["skipped"] == 1 and [log[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert math.isfinite(log[3]["loss"]) and math.isfinite(log[4]["loss"])
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(out / "last" / "model.safetensors").values())


# ----------------------------------------------------------------------------------------------------------------
# atomic checkpoints

def test_atomic_save_keeps_the_previous_checkpoint(tmp_path):
    dst = tmp_path / "last"
    train.atomic_save_dir(dst, lambda d: (d / "a.txt").write_text("one"))

    def crash(d):
        (d / "a.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train.atomic_save_dir(dst, crash)
    assert (dst / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    train.atomic_save_dir(dst, lambda d: (d / "a.txt").write_text("two"))
    assert (dst / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    # a crash between the two renames (dst already moved aside): the previous checkpoint is still found
    os.replace(dst, tmp_path / ".last.old")
    assert mend.saved_dir(dst) == tmp_path / ".last.old"


def test_atomic_writes_fsync_before_the_rename(tmp_path, monkeypatch):
    """Every temp file (and every file of a temp folder) is fsynced before os.replace puts it in place, and the
    parent folder after it: a power loss never leaves a checkpoint name pointing at empty or partial files."""
    import mend

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root = Path(os.path.realpath(tmp_path))
    mend._write_json_atomic(root / "a.json", {"x": 1})
    mend._save_weights_atomic(torch.nn.Linear(2, 2), root / "w.safetensors")
    (root / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    train._truncate_log(root / "log.jsonl", 1)

    def write(d):
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("b")
        (d / "c.txt").write_text("c")

    train.atomic_save_dir(root / "last", write)
    train.atomic_save_dir(root / "last", write)     # the second save moves the first aside (.last.old)
    synced, renamed = set(), []
    for kind, path in events:
        if kind == "fsync":
            synced.add(path)
        elif path.endswith(".tmp"):
            inside = [f"{path}/c.txt", f"{path}/sub/b.txt", f"{path}/sub"] if path.endswith(".last.tmp") else []
            assert {path, *inside} <= synced, (path, synced)
            renamed.append(Path(path).name)
            synced.clear()                           # the next save must sync its own files again
    assert renamed == ["a.json.tmp", "w.safetensors.tmp", "log.jsonl.tmp", ".last.tmp", ".last.tmp"]
    assert events[-1] == ("fsync", str(root))       # the renames are flushed too
    assert (root / "last" / "c.txt").read_text() == "c" and (root / "log.jsonl").read_text() == '{"step": 1}\n'


def test_crash_while_saving_in_the_loop_then_resume(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir,
                                                    tmp_path, monkeypatch):
    args = ["--stage", "finetune", "--split", "tiny", "--max_steps", "6", "--save_every", "2", "--eval_every", "0"]
    out, n = tmp_path / "run", []
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        n.append(1)
        if len(n) == 2:  # the step-4 checkpoint dies half-written
            open(f, "wb").write(b"garbage")
            raise OSError("simulated crash while saving")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, *args))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / "last" / train.STATE_FILE, weights_only=False)["step"] == 2   # the previous one, intact
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, *args, "--resume"))
    assert r["step"] == 6 and sorted(_log(out)) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------------------------
# user errors: one line naming the flag and what was expected, exit code != 0, nothing written

def _exits(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("train.py: ") and "\n" not in msg  # exit status 1, one line
    return msg


def test_user_errors(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tiny_c4, tmp_path, monkeypatch):
    import huggingface_hub.constants
    import mend

    out = tmp_path / "out"
    base = lambda *a: common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, *a)
    msg = _exits(base("--stage", "finetune", "--split", "LR_to_HR"))
    assert msg == ("train.py: --split 'LR_to_HR': expected one of class_to_class, non_class_to_class, qa_to_qa, "
                   "non_qa_to_qa, non_nli_to_nli, non_paraphrase_to_paraphrase, hr_to_lr (paper labels like HR_to_LR "
                   f"work too) or a setting with config/<name>.json under --data_dir '{tiny_metaicl_dir}'")
    missing = tmp_path / "no-such-folder"
    msg = _exits(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, missing, out, "--stage", "finetune", "--split", "tiny"))
    assert msg == (f"train.py: --data_dir '{missing}' does not exist: expected a MetaICL folder with config/ and data/ "
                   "(needed for meta-train episodes)")
    # a checkpoint trained for another LLM
    torch.manual_seed(0)
    other = tmp_path / "xl-ckpt"
    mend.MEND(model.from_pretrained(tiny_gpt2_distiller_dir), 64, l=4, llm_name="gpt2-xl").save(other)
    msg = _exits(base("--stage", "finetune", "--split", "tiny", "--init", str(other)))
    assert msg == (f"train.py: --init '{other}' holds a checkpoint for LLM 'gpt2-xl': expected one trained for "
                   f"--llm '{sharp_gpt2_dir}'")
    # a hub id that cannot be fetched offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = _exits(common("no-such-org/no-such-llm", tiny_gpt2_distiller_dir, tiny_metaicl_dir, out,
                        "--stage", "finetune", "--split", "tiny"))
    assert msg.startswith("train.py: --llm 'no-such-org/no-such-llm': expected a local model folder or a Hugging "
                          "Face hub id that can be fetched now ('no-such-org/no-such-llm' is neither a local folder")
    msg = _exits(base("--stage", "pretrain", "--distiller", "no-such-org/no-such-distiller", "--c4", str(tiny_c4)))
    assert msg.startswith("train.py: --distiller 'no-such-org/no-such-distiller': expected a local model folder or a "
                          "Hugging Face hub id that can be fetched now (")
    assert not out.exists()  # nothing was written by any of the above
    # --resume of a run made for another LLM; a finished run is not overwritten by accident
    train.main(base("--stage", "finetune", "--split", "tiny", "--max_steps", "2", "--eval_every", "0"))
    before = (out / "last" / "model.safetensors").read_bytes(), (out / "log.jsonl").read_text()
    msg = _exits(common(tiny_gpt2_distiller_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, "--stage",
                        "finetune", "--split", "tiny", "--resume"))
    assert msg == (f"train.py: --resume: {out / 'last'} was trained for --llm '{sharp_gpt2_dir}': expected --llm "
                   f"'{tiny_gpt2_distiller_dir}'")
    msg = _exits(base("--stage", "finetune", "--split", "tiny", "--max_steps", "2"))
    assert msg == (f"train.py: --out '{out}' already holds a run: expected --resume to continue it or --overwrite "
                   "to restart")
    assert ((out / "last" / "model.safetensors").read_bytes(), (out / "log.jsonl").read_text()) == before
    assert _exits(base("--stage", "finetune")) == ("train.py: --split: expected a setting for --stage finetune "
                                                   "(e.g. HR_to_LR, class_to_class)")
    assert _exits(base("--stage", "pretrain", "--objective", "pred")) == (
        "train.py: --objective 'pred': expected one of distill, clm, clm+distill for --stage pretrain")
    assert _exits(base("--stage", "finetune", "--split", "tiny", "--projection", "mlp")) == (
        "train.py: --projection 'mlp': expected one of auto, tanh, linear, identity")


def test_user_error_exit_code_from_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", "finetune", "--split", "tiny",
                        "--data_dir", str(tmp_path / "missing"), "--llm", "x", "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"train.py: --data_dir '{tmp_path / 'missing'}' does not exist: expected a MetaICL "
                                "folder with config/ and data/ (needed for meta-train episodes)")


def test_a_run_without_a_checkpoint_is_refused_not_wiped(sharp_gpt2_dir, tiny_gpt2_distiller_dir,
                                                         tiny_metaicl_dir, tmp_path):
    """A run killed before its first --save_every leaves best/ and log.jsonl only: a fresh run there is refused
    (they are not deleted), --resume says why it cannot continue, --overwrite restarts. Any single leftover of a
    run (last/, best/, their .old fallbacks, log.jsonl) counts."""
    out = tmp_path / "run"
    args = common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, "--stage", "finetune", "--split",
                  "tiny", "--max_steps", "100", "--eval_every", "2", "--save_every", "50")
    train.main(args + ["--stop_at", "2"])            # killed at step 2: validated, never saved
    files = lambda: {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}  # noqa: E731
    assert sorted(p.name for p in out.iterdir()) == ["best", "log.jsonl"]
    before = files()
    assert _exits(args) == (f"train.py: --out '{out}' already holds a run without a checkpoint (best, log.jsonl): "
                            "expected --overwrite to restart it (or another --out)")
    assert _exits(args + ["--resume"]) == (f"train.py: --resume: expected a checkpoint at {out / 'last'} (none "
                                           "found; --out holds only best, log.jsonl): use --overwrite to restart "
                                           "the run")
    assert files() == before
    for name in train.RUN_FILES:
        only = tmp_path / f"only{name}"
        only.mkdir()
        if name == "log.jsonl":
            (only / name).write_text('{"type": "train", "step": 1}\n')
        else:
            (only / name).mkdir()
        msg = _exits(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, only, "--stage", "finetune",
                            "--split", "tiny"))
        assert msg == (f"train.py: --out '{only}' already holds a run without a checkpoint ({name}): expected "
                       "--overwrite to restart it (or another --out)")
    train.main(args + ["--overwrite", "--stop_at", "1"])   # the old best/ and log go; nothing validated yet
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"] and sorted(_log(out)) == [1]


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "0"], "--temperature: expected > 0, got 0.0"),
    (["--temperature", "-1"], "--temperature: expected > 0, got -1.0"),
    (["--lam", "-1"], "--lam: expected >= 0, got -1.0"),
    (["--gamma", "-0.5"], "--gamma: expected >= 0, got -0.5"),
    (["--weight_decay", "-0.01"], "--weight_decay: expected >= 0, got -0.01"),
    (["--adam_eps", "0"], "--adam_eps: expected > 0, got 0.0"),
    (["--lr", "0"], "--lr: expected > 0, got 0.0"),
    (["--lr", "nan"], "--lr: expected > 0, got nan"),
    (["--grad_clip", "-1"], "--grad_clip: expected >= 0 (0 = no clipping), got -1.0"),
    (["--min_len", "2000"], "--min_len: expected 2 <= min_len <= --max_len (1024), got 2000"),
    (["--min_len", "1"], "--min_len: expected 2 <= min_len <= --max_len (1024), got 1"),
    (["--max_len", "0"], "--max_len: expected >= 1, got 0"),
    (["--beta", "1"], "--beta: expected 0 < beta < 1, got 1.0"),
    (["--l", "0"], "--l: expected >= 1, got 0"),
    (["--eval_every", "-1"], "--eval_every: expected >= 0, got -1"),
])
def test_numeric_flags_are_checked_one_by_one(flags, expected):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--stage", "pretrain", *flags])
    assert e.value.code == f"train.py: argument {expected}"


def test_c4_lengths_are_checked_for_pretraining_only():
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "pretrain", "--max_len", "32"])     # min_len 64 > max_len
    assert train.parse_args(["--stage", "finetune", "--split", "tiny", "--max_len", "32"]).max_len == 32


# ----------------------------------------------------------------------------------------------------------------
# real files: the shared C4 sample and MetaICL folder, a real GPT-2 checkpoint layout and tokenizer

def test_real_data_both_stages(tmp_path):
    from conftest import shared_path

    c4 = shared_path("c4", "c4-train.00000-of-01024.head1000.jsonl")
    metaicl, gpt2 = shared_path("metaicl"), shared_path("hf-tiny-gpt2")
    base = ["--llm", str(gpt2), "--distiller", str(gpt2), "--data_dir", str(metaicl), "--l", "4",
            "--log_every", "1", "--device", "cpu", "--lr", "1e-2", "--eval_every", "2", "--val_tasks", "2",
            "--val_max_queries", "2"]
    pre = train.main(base + ["--stage", "pretrain", "--c4", str(c4), "--max_steps", "2", "--out", str(tmp_path / "p")])
    assert pre["step"] == 2 and (tmp_path / "p" / "best" / "config.json").is_file()
    ft = train.main(base + ["--stage", "finetune", "--split", "HR→LR", "--init", str(tmp_path / "p" / "best"),
                            "--max_steps", "2", "--out", str(tmp_path / "f")])
    assert ft["step"] == 2 and all(math.isfinite(r["loss"]) for r in ft["log"])
    info = json.load(open(tmp_path / "f" / "best" / "train_info.json"))
    assert info["split"] == "hr_to_lr" and info["val_score"] is not None


def test_lr_schedules():
    cfg = train.TrainConfig(max_steps=10)
    assert cfg.schedule == "linear" and cfg.warmup_steps == 0 and cfg.lr == 5e-5   # the official HF defaults
    f = train.lr_lambda(cfg)
    assert [f(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    f = train.lr_lambda(train.TrainConfig(max_steps=10, schedule="cosine", warmup_steps=2))
    assert [round(f(s), 6) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert train.lr_lambda(train.TrainConfig(schedule="constant"))(29999) == 1.0
    d = train.parse_args(["--stage", "finetune", "--split", "HR_to_LR"])
    assert (d.llm, d.distiller, d.l, d.k, d.beta, d.lam, d.patience, d.eval_every, d.objective) == \
        ("gpt2-large", "gpt2", 100, 16, 0.8, 1.0, 5, 2000, "finetune")
    assert train.default_out(d, "hr_to_lr") == Path("runs/finetune-mend-hr_to_lr")
    assert train.parse_args(["--virtual_demo_len", "7"]).l == 7


def test_early_stopping(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tmp_path):
    """With a vanishing LR the dev score never improves after the first validation: patience 2 stops at step 3."""
    out = tmp_path / "es"
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, "--stage", "finetune",
                          "--split", "tiny", "--max_steps", "50", "--lr", "1e-12", "--eval_every", "1",
                          "--patience", "2"))
    assert r["early_stopped"] and r["step"] == 3 and r["best_step"] == 1
    assert json.load(open(out / "best" / "train_info.json"))["step"] == 1
    state = torch.load(out / "last" / train.STATE_FILE, weights_only=False)
    assert (state["step"], state["bad_evals"], state["best_step"], state["early_stopped"]) == (3, 2, 1, True)
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, out, "--stage", "finetune",
                          "--split", "tiny", "--max_steps", "50", "--lr", "1e-12", "--eval_every", "1",
                          "--patience", "2", "--resume"))
    assert r["early_stopped"] and r["step"] == 3 and r["log"] == []   # a finished run stays finished
