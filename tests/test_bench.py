"""Tests of bench.py: the analytic FLOP count against torch's FlopCounterMode (both families, tiny shapes), the ratio
and target logic, and the output files of a --preset tiny run (random tiny models and checkpoint folders)."""
import json

import pytest
import torch
import torch.nn.functional as F

import bench
import model



def test_cpu_sdpa_is_counted():
    """torch has no FLOP formula for the CPU SDPA kernel; bench's counter adds the CUDA kernels' formula."""
    q = torch.randn(2, 4, 10, 8)
    k = torch.randn(2, 4, 15, 8)
    flops = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, k))
    assert flops == 2 * 2 * (2 * 4 * 10 * 15 * 8)  # QK^T and AV, full (not causal-halved)


@pytest.mark.parametrize("t,t_past,b", [(40, 0, 1), (25, 0, 3), (6, 30, 2)])
def test_gpt2_analytic_matches_counter(t, t_past, b):
    cfg = bench.shape_config("tiny-gpt2")
    torch.manual_seed(0)
    lm = model.build_model(cfg).eval()
    ids = torch.randint(2, cfg["vocab_size"], (b, t))
    with torch.inference_mode():
        past = lm(torch.randint(2, 400, (1, t_past)), use_cache=True).past_key_values if t_past else None
        counted = bench.count_flops(lambda: lm(ids, past_key_values=past))
        masked = bench.count_flops(lambda: lm(ids, attention_mask=torch.ones(b, t_past + t), past_key_values=past))
    analytic = bench.gpt2_flops(cfg, t, t_past, b)
    assert counted == masked == analytic > 0                                   # to the FLOP
    # causal counting drops only part of the attention term
    assert bench.gpt2_flops(cfg, t, t_past, b, causal=True) < analytic


@pytest.mark.parametrize("t_enc,t_dec,b", [(30, 4, 1), (12, 7, 3)])
def test_t5_analytic_matches_counter(t_enc, t_dec, b):
    cfg = bench.shape_config("tiny-t5")
    torch.manual_seed(0)
    lm = model.build_model(cfg).eval()
    enc_ids = torch.randint(2, cfg["vocab_size"], (b, t_enc))
    dec_ids = torch.randint(2, cfg["vocab_size"], (b, t_dec))
    with torch.inference_mode():
        counted = bench.count_flops(lambda: lm(enc_ids, attention_mask=torch.ones(b, t_enc),
                                               decoder_input_ids=dec_ids))
        enc_only = bench.count_flops(lambda: lm.encode(enc_ids, attention_mask=torch.ones(b, t_enc)))
    assert counted == bench.t5_encoder_flops(cfg, t_enc, b) + bench.t5_decoder_flops(cfg, t_dec, t_enc, b)
    assert enc_only == bench.t5_encoder_flops(cfg, t_enc, b) > 0


def test_method_flops_ideal_and_prefix():
    llm, dist = bench.shape_config("gpt2-xl"), bench.shape_config("gpt2")
    s = bench.Shapes(ctx=848, l=100, x=53, opt=3, batch=1)
    f = {m: bench.method_flops(m, "gpt2", llm, dist, s, ideal=True) for m in bench.METHODS}
    assert f["zero_shot"] < f["prompt_tuning"] < f["mend"] < f["icl"]
    assert f["mend_cached"] < f["icl_cached"] < f["zero_shot"] * 1.2          # only attention differs
    assert f["mend"] - f["prompt_tuning"] == bench.distiller_flops("gpt2", dist, llm, s, ideal=True)
    # the paper's headline at the longest context: about 3.5x fewer FLOPs than ICL (Fig. 3)
    assert 3.5 <= f["icl"] / f["mend"] <= 5.0
    # batch scales linearly (no padding); code-mirroring counts are >= the ideal (LM head at every position)
    s4 = bench.Shapes(ctx=848, l=100, x=53, opt=3, batch=4)
    assert bench.method_flops("icl", "gpt2", llm, dist, s4, ideal=True) == 4 * f["icl"]
    assert all(bench.method_flops(m, "gpt2", llm, dist, s, ideal=False) >= f[m] for m in bench.METHODS)
    assert bench.prefix_flops("icl_cached", llm, dist, s) > bench.prefix_flops("mend_cached", llm, dist, s) > 0
    assert bench.prefix_flops("icl", llm, dist, s) == 0


def _row(method, flops, ms, ideal, batch=1, llm="gpt2-xl", setting="non_nli_to_nli"):
    return dict(setting=setting, llm=llm, method=method, batch=batch, flops=flops, ms=ms, _ideal=ideal,
                flops_analytic=flops, context_len=848, peak_mb=None, kv_mb=None)


def test_ratio_logic_and_targets():
    rows = bench.add_ratios([
        _row("icl", 400, 40.0, 400), _row("mend", 100, 20.0, 100), _row("prompt_tuning", 80, 10.0, 90),
        _row("icl_cached", 60, 6.0, 60), _row("mend_cached", 50, 5.0, 50), _row("zero_shot", 50, 5.0, 50),
        _row("icl", 800, 80.0, 800, batch=4), _row("mend", 400, 80.0, 400, batch=4),
    ])
    by = {(r["method"], r["batch"]): r for r in rows}
    assert by["icl", 1]["flops_ratio"] == 1.0 and by["icl", 1]["ms_ratio"] == 1.0
    assert by["mend", 1]["flops_ratio"] == 4.0 and by["mend", 1]["ms_ratio"] == 2.0
    assert by["prompt_tuning", 1]["ideal_ratio"] == pytest.approx(400 / 90)
    assert by["mend_cached", 1]["flops_ratio"] == pytest.approx(60 / 50)         # to icl_cached, not icl
    assert by["icl_cached", 1]["flops_ratio"] == 1.0
    assert by["mend", 4]["flops_ratio"] == 2.0 and by["mend", 4]["ms_ratio"] == 1.0  # same batch only
    report = bench.target_report(rows, "cpu")
    assert report[0].startswith("[met] measured FLOPs ratio within 5% of the ideal, MEND: worst +0.0%")
    assert report[1].startswith("[MISSED] measured FLOPs ratio within 5% of the ideal, the other")  # 5.0 vs 4.44
    assert "+12.5%" in report[1]
    assert report[2].startswith("[met] 3.5x fewer FLOPs") and "4.00x" in report[2]
    assert report[3].startswith("[MISSED] CPU latency") and "0.50" in report[3]  # 2.0 / 4.0
    gpu = bench.target_report(rows, "cuda")
    assert gpu[3].startswith("[met] GPU latency ratio >= 1.33x")
    # a missing baseline leaves ratios empty instead of inventing them
    lone = bench.add_ratios([_row("mend", 100, 20.0, 100)])
    assert lone[0]["flops_ratio"] is None and lone[0]["ms_ratio"] is None


def test_markdown_table_marks_unmeasured():
    rows = bench.add_ratios([_row("icl", 4e9, 40.0, 4e9), _row("mend", 1e9, 20.0, 1e9)])
    table = bench.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| setting | LLM | B | method | GFLOPs (counter)")
    assert "| mend | 1.00 | 1.00 | 4.00x | 4.00x | 20.00 | 2.00x | n/a | n/a |" in lines[3]


def test_rejects_too_few_runs():
    with pytest.raises(ValueError, match="--runs 5"):
        bench.resolve_args(bench.parse_args(["--preset", "tiny", "--runs", "5"]))


KEYS = {"setting", "llm", "method", "batch", "flops", "flops_ratio", "ideal_ratio", "ms", "ms_ratio", "peak_mb",
        "kv_mb", "device", "dtype"}


def test_tiny_preset_writes_outputs(tmp_path, capsys):
    rows = bench.main(["--preset", "tiny", "--out", str(tmp_path), "--threads", "1"])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved) == len(rows) == 2 * (6 + 4)          # batches 1, 2; gpt2: 6 methods, t5: 4 (no cached pair)
    for r in saved:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["method"] in bench.METHODS and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["peak_mb"] is None and r["ms"] > 0 and r["flops"] > 0
        assert r["flops"] == r["flops_analytic"], r                    # the code paths match the analytic count
        assert (r["kv_mb"] is not None) == r["method"].endswith("_cached")
    cached = {(r["llm"], r["batch"], r["method"]): r for r in saved}
    # K and V of every layer, fp32: 2 * n_layer * prefix tokens * d * 4 bytes (|D| = 48, l = 8, d = 64, 2 layers)
    assert cached["tiny-gpt2", 1, "icl_cached"]["kv_mb"] * 2 ** 20 == 2 * 2 * 48 * 64 * 4
    assert cached["tiny-gpt2", 2, "mend_cached"]["kv_mb"] * 2 ** 20 == 2 * 2 * 8 * 64 * 4
    assert cached["tiny-gpt2", 1, "icl"]["flops_ratio"] == 1.0
    assert cached["tiny-gpt2", 1, "mend"]["flops_ratio"] > 1.0
    assert "| setting | LLM | B | method |" in out and "targets:" in out
    assert "| tiny | tiny-t5 | 2 | mend |" in out
    assert (tmp_path / "bench.md").read_text().startswith("| setting |")


def test_tiny_preset_from_checkpoints(tmp_path, tiny_gpt2_dir, tiny_gpt2_distiller_dir):
    rows = bench.main(["--preset", "tiny", "--llm", str(tiny_gpt2_dir), "--distiller", str(tiny_gpt2_distiller_dir),
                       "--batch", "1", "--out", "", "--threads", "1"])
    assert [r["method"] for r in rows] == list(bench.METHODS)
    assert rows[0]["llm"] == tiny_gpt2_dir.name
    assert all(r["flops"] == r["flops_analytic"] for r in rows)


def test_tiny_preset_from_saved_mend(tmp_path, tiny_gpt2_dir, tiny_gpt2_distiller_dir):
    import mend

    torch.manual_seed(0)
    module = mend.MEND(model.from_pretrained(str(tiny_gpt2_distiller_dir)), d_llm=64, l=5, llm_name="tiny-gpt2")
    module.save(tmp_path / "mend")
    rows = bench.main(["--preset", "tiny", "--llm", str(tiny_gpt2_dir), "--mend", str(tmp_path / "mend"),
                       "--batch", "1", "--out", "", "--threads", "1"])
    by = {r["method"]: r for r in rows}
    assert by["mend"]["l"] == 5 and all(r["flops"] == r["flops_analytic"] for r in rows)
    assert by["mend_cached"]["kv_mb"] < by["icl_cached"]["kv_mb"]


# ----------------------------------------------------------------------------------------------------------------
# issue 10: OPT and Llama-style shapes (FLOPs from configs alone)

DECODERS = {  # tiny configs of each decoder-only family: OPT with project_in/out (opt-350m), Llama with GQA
    "opt": dict(model_type="opt", vocab_size=400, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                ffn_dim=64, num_attention_heads=4, max_position_embeddings=128, do_layer_norm_before=False),
    "llama": dict(model_type="llama", vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_families_analytic_matches_counter(family):
    cfg = DECODERS[family]
    torch.manual_seed(0)
    lm = model.build_model(cfg).eval()
    ids = torch.randint(2, 400, (2, 9))
    with torch.inference_mode():
        assert bench.count_flops(lambda: lm(ids)) == bench.gpt2_flops(cfg, 9, 0, 2)
        past = lm(ids[:1, :5], use_cache=True).past_key_values
        assert bench.count_flops(lambda: lm(ids[:, 5:], past_key_values=past)) == bench.gpt2_flops(cfg, 4, 5, 2)
        assert bench.count_flops(lambda: lm(ids, return_logits=False)) == bench.gpt2_flops(cfg, 9, 0, 2, 0)


def test_llm7b_flops_only_from_configs(capsys):
    rows = bench.main(["--preset", "llm7b", "--flops-only", "--batch", "1", "--settings", "non_nli_to_nli",
                       "--out", ""])
    got = {(r["llm"], r["method"]): r for r in rows}
    assert len(rows) == 12 and "FLOPs ratio" in capsys.readouterr().out
    # a zero-shot forward of the 56 query tokens costs about 2 x parameters x tokens (the embeddings are no
    # matmuls, the LM head runs at 4 positions only)
    for llm, n_params in (("opt-6.7b", 6.66e9), ("llama-2-7b", 6.74e9)):
        assert 0.9 < got[(llm, "zero_shot")]["flops"] / (2 * n_params * 56) < 1.05
        assert got[(llm, "mend")]["flops_ratio"] > 2.5 and got[(llm, "icl")]["flops_ratio"] == 1.0
    assert got[("opt-6.7b", "mend")]["flops_ratio"] > got[("llama-2-7b", "mend")]["flops_ratio"]  # 125M vs 1.1B


# ----------------------------------------------------------------------------------------------------------------
# a saved MEND's l and projection, --llm, and --flops-only's outputs and position check

def _saved_mend(path, distiller_dir, projection):
    import mend

    torch.manual_seed(0)
    mend.MEND(model.from_pretrained(str(distiller_dir)), d_llm=64, l=5, llm_name="tiny-gpt2",
              projection=projection).save(path)
    return str(path)


def test_saved_mend_l_and_projection(tmp_path, capsys, tiny_gpt2_dir):
    """--flops-only takes l and the projection from the saved MEND's config.json (not the preset's l = 8, not
    'a Linear only when the widths differ'), and equals the counter of the measured run of the same MEND."""
    # the d=64 LLM itself as the distiller: equal widths, so only a forced projection ("tanh") runs a Linear
    tanh = _saved_mend(tmp_path / "tanh", tiny_gpt2_dir, "tanh")
    auto = _saved_mend(tmp_path / "auto", tiny_gpt2_dir, "auto")            # resolved to "identity" when saved
    args = ["--preset", "tiny", "--llm", str(tiny_gpt2_dir), "--batch", "1", "--out", ""]
    only = {name: bench.main(args + ["--flops-only", "--mend", d]) for name, d in (("tanh", tanh), ("auto", auto))}
    out = capsys.readouterr().out
    assert "l=5" in out and "l=8" not in out
    assert all(r["l"] == 5 for rows in only.values() for r in rows)
    dist = {name: {r["method"]: r["flops"] for r in rows} for name, rows in only.items()}
    # mend - prompt_tuning = the distiller (the LLM runs l + x + option tokens in both): 2 layers x (2 x 53 tokens
    # x (4 x 64 x 64 + 2 x 64 x 256) + 4 x 53 x 53 x 64) over |D| + l = 48 + 5, no LM head
    assert dist["auto"]["mend"] - dist["auto"]["prompt_tuning"] == 11_858_432
    assert dist["tanh"]["mend"] - dist["tanh"]["prompt_tuning"] == 11_858_432 + 2 * 5 * 64 * 64   # + Linear(64, 64)
    measured = bench.main(args + ["--mend", tanh, "--threads", "1"])
    assert [r["flops"] for r in measured] == [r["flops_analytic"] for r in measured] == \
        [r["flops"] for r in only["tanh"]]
    with pytest.raises(ValueError, match="--l 8: the saved MEND .* has l = 5"):
        bench.main(args + ["--flops-only", "--mend", tanh, "--l", "8"])


def test_llm_flag_runs_that_llm_only(tiny_gpt2_dir):
    _, pairs = bench.resolve_args(bench.parse_args(["--preset", "tiny", "--llm", str(tiny_gpt2_dir)]))
    # one pair: the preset's GPT-2 distiller for it; the preset's tiny-t5 pair is dropped
    assert pairs == [bench.Pair("gpt2", str(tiny_gpt2_dir), "tiny-gpt2-distiller", "")]


def test_flops_only_writes_outputs_and_checks_positions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench.main(["--preset", "tiny", "--flops-only"])         # no --out: nothing written (runs/bench is a timed run's)
    assert list(tmp_path.iterdir()) == []
    rows = bench.main(["--preset", "tiny", "--flops-only", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved) == len(rows) == 2 * (6 + 4)
    assert KEYS <= set(saved[0]) and saved[0]["ms"] is None and saved[0]["device"] is None
    by = {(r["llm"], r["batch"], r["method"]): r for r in saved}
    # ICL, tiny-gpt2, B=1: 2 layers x (2 x 56 tokens x (4 x 64 x 64 + 2 x 64 x 256) + 4 x 56 x 56 x 64) + the LM
    # head at option + 1 = 3 positions (2 x 3 x 64 x 400)
    assert by["tiny-gpt2", 1, "icl"]["flops"] == 12_769_280 and by["tiny-gpt2", 2, "icl"]["flops"] == 2 * 12_769_280
    assert (tmp_path / "bench.md").read_text().startswith("| setting | LLM | B | method | GFLOPs (analytic) |")
    assert not (tmp_path / "bench.png").exists()
    with pytest.raises(ValueError, match="ICL needs 520 positions, tiny-gpt2 has n_positions=512"):
        bench.main(["--preset", "tiny", "--family", "gpt2", "--flops-only", "--context", "long=512", "--out", ""])
