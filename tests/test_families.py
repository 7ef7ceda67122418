"""Tests for model.py's OPT and Llama-style families (llama, mistral, qwen2): logits parity with transformers (the
numerical reference, test-only) on tiny random configs saved in the hub layouts, left padding, the inputs_embeds
path, the KV cache (with a soft prefix, so RoPE offsets after S_D are checked), a MEND overfit step per family
through mend.py unchanged, and the shard-by-shard loader's peak host memory."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import mend
import model
from conftest import check_left_padding_and_holes, maxdiff

transformers = pytest.importorskip("transformers")  # the numerical reference (requirements-test.txt)

TOL = 1e-4  # max-abs logits difference allowed in fp32
V = 120
OPT_BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)
LLAMA_BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
# name -> (transformers config class, model class, config kwargs)
CASES = {
    "opt-preln-tied": ("OPTConfig", "OPTForCausalLM", dict(OPT_BASE)),
    "opt-postln-proj": ("OPTConfig", "OPTForCausalLM",  # opt-350m: post-LN, 16-wide embeddings, project_in/out
                        dict(OPT_BASE, do_layer_norm_before=False, word_embed_proj_dim=16)),
    "opt-untied": ("OPTConfig", "OPTForCausalLM", dict(OPT_BASE, tie_word_embeddings=False)),
    "llama-gqa-linear-bias": ("LlamaConfig", "LlamaForCausalLM",
                              dict(LLAMA_BASE, num_key_value_heads=2, attention_bias=True, rope_theta=500.0,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(LLAMA_BASE, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=5000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA_BASE, num_key_value_heads=2, sliding_window=32)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_BASE, num_key_value_heads=2, tie_word_embeddings=True)),
}



def hf_model(case, seed=0):
    cfg_cls, model_cls, kw = CASES[case]
    torch.manual_seed(seed)
    ref = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    if not ref.config.tie_word_embeddings:  # make sure an untied head really differs from the embeddings
        ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.lm_head.weight) * 0.05)
    return ref


def ids_batch(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, T), generator=g)


def write_layout(folder: Path, ref, layout):
    """hf_save: transformers' save_pretrained; bare: the base-model layout (OPTModel `decoder.*`, LlamaModel without
    `model.`) with no lm_head for a tied model; sharded: 3 shards + model.safetensors.index.json; bin: an old
    pytorch_model.bin with every key of the ForCausalLM model, the tied lm_head included."""
    if layout == "hf_save":
        ref.save_pretrained(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = ref.config.to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    if layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    if ref.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if layout == "bare":
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(sd)
        shards = {f"model-0000{i + 1}-of-00003.safetensors": keys[i::3] for i in range(3)}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(folder / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """case -> (transformers reference, our model loaded from its save_pretrained folder)."""
    out = {}
    for case in CASES:
        ref = hf_model(case)
        folder = tmp_path_factory.mktemp(case)
        ref.save_pretrained(folder)
        out[case] = (ref, model.from_pretrained(folder))
    return out


# ---------------------------------------------------------------------------------------------------------------
# parity in every layout


@pytest.mark.parametrize("layout", ["hf_save", "bare", "sharded", "bin"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case, layout):
    ref = hf_model(case)
    ours = model.from_pretrained(write_layout(tmp_path / "ckpt", ref, layout))
    assert not ours.training and type(ours).__name__ == ("OPT" if case.startswith("opt") else "Llama")
    assert (ours.lm_head is None) == bool(ref.config.tie_word_embeddings)
    ids = ids_batch()
    with torch.no_grad():
        out = ours(ids)
        assert maxdiff(out.logits, ref(ids).logits) <= TOL
        d = 16 if case == "opt-postln-proj" else 32  # OPT's hidden_size is the embedding width (project_out)
        assert ours.hidden_size == d and out.hidden_states.shape == (2, 12, d) and out.past_key_values is None


@pytest.mark.parametrize("case", list(CASES))
def test_left_padding_holes_embeds_and_lean_head(pairs, case):
    ref, ours = pairs[case]
    check_left_padding_and_holes(ours, ref, [ids_batch(1, n, seed=n)[0] for n in (12, 7, 3)], TOL)
    with torch.no_grad():
        # inputs_embeds == input_ids; return_logits=False + head() == logits
        x = ids_batch()
        full = ours(x)
        assert maxdiff(ours(inputs_embeds=ours.embed_tokens(x)).logits, full.logits) == 0
        lean = ours(x, return_logits=False)
        assert lean.logits is None and maxdiff(ours.head(lean.hidden_states), full.logits) == 0
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ours()


@pytest.mark.parametrize("case", list(CASES))
def test_kv_cache_soft_prefix_plus_suffix(pairs, case):
    """A soft prefix (S_D-like vectors, batch 1) cached once, then 3 right-padded suffixes: equal to the full
    forward of [prefix; suffix] (RoPE / learned positions continue after the prefix); single-token steps too."""
    _, ours = pairs[case]
    d = ours.hidden_size
    torch.manual_seed(0)
    prefix = torch.randn(1, 4, d) * 0.5
    suffix = ids_batch(3, 6, seed=3)
    smask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    with torch.no_grad():
        cache = ours(inputs_embeds=prefix, use_cache=True).past_key_values
        assert len(cache) == 2 and cache[0][0].shape[:3] == (1, getattr(ours.config, "num_key_value_heads", None)
                                                             or 4, 4)
        mask = torch.cat([torch.ones(3, 4, dtype=torch.long), smask], 1)  # (B, T_past + T)
        got = ours(suffix, attention_mask=mask, past_key_values=cache).logits
        for b in range(3):
            n = int(smask[b].sum())
            emb = torch.cat([prefix[0], ours.embed_tokens(suffix[b, :n])])[None]
            full = ours(inputs_embeds=emb).logits[0, 4:]
            assert maxdiff(got[b, :n], full) <= TOL
        step = ours(suffix[:1, :1], past_key_values=cache).logits  # one token, no mask
        assert maxdiff(step[0, 0], got[0, 0]) <= TOL


def test_mend_prefix_cache_equals_uncached_llama(pairs):
    """mend.llm_logits with a prefix_cache of S_D == without (RoPE offsets after the distilled prefix)."""
    _, llm = pairs["llama-gqa-linear-bias"]
    batch = make_batch(3, seed=4)
    torch.manual_seed(1)
    S = torch.randn(1, 5, 32) * 0.5
    with torch.no_grad():
        plain = mend.llm_logits(llm, batch, S)
        cached = mend.llm_logits(llm, batch, cache=mend.prefix_cache(llm, S))
    m = batch.query_mask.bool()
    assert maxdiff(plain.target[batch.target_mask.bool()], cached.target[batch.target_mask.bool()]) <= 1e-5
    assert maxdiff(plain.query[:, 1:][m[:, 1:]], cached.query[:, 1:][m[:, 1:]]) <= 1e-5


def test_errors_and_round_trip(tmp_path, pairs, tiny_tokenizer):
    _, ours = pairs["mistral"]
    with pytest.raises(ValueError, match="33 tokens > sliding_window=32"):
        ours(ids_batch(1, 33))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        model.build_model(dict(CASES["mistral"][2], model_type="llama", rope_scaling={"type": "yarn", "factor": 2.0}))
    _, opt = pairs["opt-preln-tied"]
    with pytest.raises(ValueError, match="position 64 >= max_position_embeddings=64"):
        opt(ids_batch(1, 65))
    # our save_pretrained -> transformers and back, for every family
    for case in ("opt-postln-proj", "llama-gqa-linear-bias", "qwen2-tied"):
        ref, ours = pairs[case]
        folder = tmp_path / case
        model.save_pretrained(ours, folder, tokenizer=tiny_tokenizer)
        back = getattr(transformers, CASES[case][1]).from_pretrained(folder).eval()
        ids = ids_batch()
        with torch.no_grad():
            assert maxdiff(back(ids).logits, ours(ids).logits) <= TOL
            assert maxdiff(model.from_pretrained(folder)(ids).logits, ours(ids).logits) == 0


@pytest.mark.parametrize("case", ["opt-preln-tied", "llama-gqa-linear-bias", "qwen2-tied"])
def test_empty_inputs_and_input_checks(pairs, case):
    """B = 0 or T = 0 give empty logits (also after a cache); a mask must be (B, T_past + T) or (1, T_past + T);
    explicit position_ids past OPT's learned table are refused (RoPE has no table: any position is fine)."""
    _, ours = pairs[case]
    who, ids = type(ours).__name__, ids_batch(2, 5)
    with torch.no_grad():
        assert ours(ids[:, :0]).logits.shape == (2, 0, V)
        assert ours(ids[:0], attention_mask=torch.ones(0, 5, dtype=torch.long)).logits.shape == (0, 5, V)
        pre = ours(ids[:1], use_cache=True).past_key_values
        out = ours(ids[:, :0], past_key_values=pre, use_cache=True)
        assert out.logits.shape == (2, 0, V) and out.past_key_values[0][0].shape[::2] == (2, 5)
        assert maxdiff(ours(ids, attention_mask=torch.ones(1, 5, dtype=torch.long)).logits, ours(ids).logits) == 0
    for shape, msg in {(3, 5): "(3, 5), expected (B, T_past + T) = (2, 5) or (1, 5)",
                       (5,): "(5,), expected (B, T_past + T) = (2, 5) or (1, 5)"}.items():
        with pytest.raises(ValueError, match=re.escape(f"{who}.forward: attention_mask has shape {msg}")):
            ours(ids, attention_mask=torch.ones(shape, dtype=torch.long))
    far = torch.tensor([[0, 1, 2, 3, 64]])
    if who == "OPT":
        with pytest.raises(ValueError, match=re.escape("OPT.forward: position 64 >= max_position_embeddings=64")):
            ours(ids, position_ids=far)
    else:
        with torch.no_grad():
            assert torch.isfinite(ours(ids, position_ids=far).logits).all()


@pytest.mark.parametrize("case", ["opt-preln-tied", "llama3-rope", "qwen2-tied"])
def test_error_tied_head_differs_and_mixed_key_layouts(tmp_path, case):
    """tie_word_embeddings=true with a different lm_head.weight in the file: refused (was: silently dropped);
    a file mixing the bare and the prefixed layout (two tensors for one parameter): refused (was: last one wins)."""
    ref = hf_model(case)
    folder = write_layout(tmp_path / "ckpt", ref, "bare")
    sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    emb = "model.decoder.embed_tokens.weight" if case.startswith("opt") else "model.embed_tokens.weight"
    save_file({**sd, "lm_head.weight": torch.randn(V, 32)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: lm_head.weight ({V}, 32) differs from {emb} ({V}, 32) "
                            "but the head is tied (config.json: tie_word_embeddings=true); expected equal tensors")
    bare = emb.removeprefix("model.")
    save_file({**sd, bare: sd[emb].clone()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: checkpoint tensors '{bare}' and '{emb}' both map to "
                            f"'{emb}' (expected one key layout, not a mix)")


def test_config_types_checked(tmp_path):
    """config.json values of the wrong type are refused with the file named; JSON ints for floats are fine."""
    base = dict(CASES["llama-gqa-linear-bias"][2], model_type="llama")
    assert model.build_model(dict(base, rope_theta=5000)).config.rope()[0] == 5000.0
    folder = write_layout(tmp_path / "q", hf_model("qwen2-tied"), "bare")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "true"}))
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == f"{folder / 'config.json'}: 'tie_word_embeddings' is 'true', expected bool"
    with pytest.raises(ValueError, match=re.escape("build_model(config): 'rope_scaling' is [2.0], expected dict or "
                                                   "null")):
        model.build_model(dict(base, rope_scaling=[2.0]))


def test_build_model_init_and_bf16(tmp_path):
    torch.manual_seed(0)
    big = dict(CASES["llama-gqa-linear-bias"][2], model_type="llama", hidden_size=64, vocab_size=2000)
    m = model.build_model(big)
    assert abs(m.model.embed_tokens.weight.std().item() - 0.02) < 2e-3
    assert m.model.norm.weight.eq(1).all() and m.model.layers[0].self_attn.q_proj.bias.eq(0).all()
    folder = write_layout(tmp_path / "q", hf_model("qwen2-tied"), "sharded")
    lo = model.from_pretrained(folder, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in lo.parameters())
    with torch.no_grad():
        out = lo(ids_batch(), attention_mask=torch.ones(2, 12, dtype=torch.long)).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert maxdiff(out, model.from_pretrained(folder)(ids_batch()).logits) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# MEND through mend.py, unchanged: a distiller of the LLM's family, a few steps of the distillation loss


def make_batch(B, seed=0, Td=10, Tq=4, Ty=3):
    g = torch.Generator().manual_seed(seed)
    demo, q, y = (torch.randint(3, V, (B, T), generator=g) for T in (Td, Tq, Ty))
    dm, qm, ym = (torch.ones(B, T, dtype=torch.long) for T in (Td, Tq, Ty))
    dm[1:, Td - 3:] = 0  # right padding, as data.collate writes it
    qm[1:, Tq - 1:] = 0
    return SimpleNamespace(demo_ids=demo * dm, demo_mask=dm, query_ids=q * qm, query_mask=qm,
                           target_ids=y * ym, target_mask=ym)


DISTILLERS = {  # a narrower model of the same family as each LLM
    "opt-preln-tied": dict(OPT_BASE, model_type="opt", hidden_size=16, ffn_dim=32, num_attention_heads=2, dropout=0.0),
    "llama-gqa-linear-bias": dict(LLAMA_BASE, model_type="llama", hidden_size=16, intermediate_size=32,
                                  num_attention_heads=2, num_key_value_heads=1),
    "mistral": dict(LLAMA_BASE, model_type="mistral", hidden_size=16, intermediate_size=32, num_attention_heads=2),
    "qwen2-tied": dict(LLAMA_BASE, model_type="qwen2", hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(DISTILLERS))
def test_mend_distill_steps_reduce_loss(pairs, case, tmp_path):
    _, llm = pairs[case]
    torch.manual_seed(0)
    m = mend.MEND(model.build_model(DISTILLERS[case]), llm.hidden_size, l=10)
    batch = make_batch(2)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = mend.mend_loss(llm, m, batch, "distill")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in llm.parameters())  # the LLM stays frozen
    assert losses[-1] < 0.8 * losses[0], losses
    m.save(tmp_path)  # the distiller's config round-trips through mend.py
    back = mend.load(tmp_path)
    with torch.no_grad():
        assert maxdiff(back.distill(batch.demo_ids, batch.demo_mask), m.eval().distill(batch.demo_ids, batch.demo_mask)) == 0


# ---------------------------------------------------------------------------------------------------------------
# memory: the shard-by-shard loader holds about one shard beyond the model

PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])
    import model
    torch.set_num_threads(1)
    def status(key):  # kB
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
    with torch.device("meta"):  # warm-up: torch's one-time lazy initialisation (~70 MB) is not the loader's
        tiny = model.Llama(model.LlamaConfig.from_dict(dict(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                            num_hidden_layers=1, num_attention_heads=2)))
    tiny.to(dtype=torch.bfloat16).to_empty(device="cpu")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS:")
    m = model.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    after = status("VmHWM:")  # not ru_maxrss: it keeps the forking parent's RSS across exec
    print((after - before) * 1024, sum(p.numel() * p.element_size() for p in m.parameters()))
""")


def test_sharded_load_peak_host_memory(tmp_path):
    """~96 MB fp32 in 4 shards loaded as bf16 (48 MB): the peak RSS increase stays below the bf16 model + 1.5
    shards (loading every shard then converting would need fp32 + bf16 = 144 MB)."""
    cfg = dict(model_type="llama", vocab_size=8000, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
               num_attention_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        m = model.Llama(model.LlamaConfig.from_dict(cfg))
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(m.state_dict())
    g = torch.Generator().manual_seed(0)
    shards, weight_map = [names[i::4] for i in range(4)], {}
    for i, ks in enumerate(shards):
        name = f"model-0000{i + 1}-of-00004.safetensors"
        save_file({k: torch.randn(m.state_dict()[k].shape, generator=g) * 0.02 for k in ks}, str(folder / name))
        weight_map.update({k: name for k in ks})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    fp32 = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), str(Path(model.__file__).parent)],
                         capture_output=True, text=True, check=True).stdout.split()
    peak, bf16 = int(out[0]), int(out[1])
    print(f"fp32 checkpoint {fp32 / 2**20:.0f} MiB, bf16 model {bf16 / 2**20:.0f} MiB, peak RSS +{peak / 2**20:.0f} MiB")
    assert peak < bf16 + 1.5 * max((folder / f).stat().st_size for f in set(weight_map.values())), (peak, bf16, fp32)


# ---------------------------------------------------------------------------------------------------------------
# train.py and eval.py, unchanged, on an OPT and a Llama-style pair


FAMILY_PAIRS = {  # (LLM, distiller) config.json dicts for the tiny tokenizer (vocab 400)
    "opt": (dict(OPT_BASE, model_type="opt", vocab_size=400, max_position_embeddings=512, pad_token_id=0,
                 dropout=0.0),
            dict(OPT_BASE, model_type="opt", vocab_size=400, max_position_embeddings=512, pad_token_id=0,
                 hidden_size=16, ffn_dim=32, num_attention_heads=2, dropout=0.0)),
    "qwen2": (dict(LLAMA_BASE, model_type="qwen2", vocab_size=400, num_key_value_heads=2, tie_word_embeddings=True),
              dict(LLAMA_BASE, model_type="qwen2", vocab_size=400, hidden_size=16, intermediate_size=32,
                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("family", list(FAMILY_PAIRS))
def test_train_and_eval_scripts_run_unchanged(family, tmp_path, tiny_tokenizer, tiny_metaicl_dir):
    import eval as meval
    import train

    dirs = []
    for i, cfg in enumerate(FAMILY_PAIRS[family]):
        torch.manual_seed(i)
        dirs.append(tmp_path / f"m{i}")
        model.save_pretrained(model.build_model(cfg), dirs[-1], tokenizer=tiny_tokenizer)
    llm_dir, dist_dir = dirs
    out = tmp_path / "ft"
    r = train.main(["--llm", str(llm_dir), "--distiller", str(dist_dir), "--data_dir", str(tiny_metaicl_dir),
                    "--out", str(out), "--l", "4", "--k", "4", "--device", "cpu", "--stage", "finetune",
                    "--split", "tiny", "--max_steps", "6", "--lr", "1e-2", "--eval_every", "0", "--log_every", "1"])
    assert r["step"] == 6 and (out / "best" / "config.json").is_file()
    res = meval.main(["--llm", str(llm_dir), "--data_dir", str(tiny_metaicl_dir), "--split", "tiny", "--seeds", "1",
                      "--max_queries", "3", "--methods", "zero_shot", "icl", "mend", "--mend", str(out / "best"),
                      "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert set(res["methods"]) >= {"mend"} and res["skipped"] == {}
    for m in res["methods"].values():
        assert 0 <= m["avg"] <= 100
