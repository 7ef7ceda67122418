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


# ----------------------------------------------------------------------------------------------------------------
# exact resume, DDP equality

def _log(out):
    return {r["step"]: r for r in map(json.loads, open(Path(out) / "log.jsonl")) if r["type"] == "train"}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_continues_exactly(stage, sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, tiny_c4,
                                  tmp_path):
    """A run killed at step 5 (last checkpoint: step 3) and resumed gives the uninterrupted run's losses. The
    distiller has dropout on (torch RNG), the data position matters (C4 stream / meta-train sampler), Adam moments,
    the linear schedule and the early-stopping state are all restored."""
    args = ["--stage", stage, "--split", "tiny", "--c4", str(tiny_c4), "--max_steps", "8", "--lr", "1e-2",
            "--save_every", "3", "--eval_every", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, full, *args))
    r = train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, cut, *args, "--stop_at", "5"))
    assert r["stopped"] == "stop_at" and max(_log(cut)) == 5
    assert torch.load(cut / "last" / train.STATE_FILE, weights_only=False)["step"] == 3
    train.main(common(sharp_gpt2_dir, tiny_gpt2_distiller_dir, tiny_metaicl_dir, cut, *args, "--resume"))
    a, b = _log(full), _log(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))   # steps 4-5 were recomputed, not logged twice
    for s in range(1, 9):
        for key in ("loss", "distill", "lr", "grad_norm"):
            if key in a[s]:
                assert b[s][key] == pytest.approx(a[s][key], abs=1e-6, rel=0), (s, key)
    from safetensors.torch import load_file
    wa, wb = load_file(full / "last" / "model.safetensors"), load_file(cut / "last" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    vals = lambda out: [(r["step"], r["val_score"], r["bad_evals"]) for r in map(json.loads, open(out / "log.jsonl"))
                        if r["type"] == "val"]
    assert vals(full) == vals(cut)


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
    args = ["--stage", "finetune", "--split", "tiny", "--max_steps", "6", "--lr", "1e-2", "--eval_every", "3"]
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
    assert r["skipped"] == state["skipped"] == b[6]["skipped"]
    from safetensors.torch import load_file
    w = load_file(amp / "last" / "model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())  # fp32 master weights


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
    assert train.load_dir(dst) == tmp_path / ".last.old"


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
