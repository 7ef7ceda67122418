"""Tests for model.py: logits parity with transformers (the numerical reference, test-only) on tiny random GPT-2
and T5 models saved in every checkpoint layout found on the hub, padding / soft-prefix / KV-cache equivalences,
loading errors, the offline hub-cache path, and the real files in ../shared/data."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import model
from conftest import check_left_padding_and_holes, maxdiff, shared_path

transformers = pytest.importorskip("transformers")  # the numerical reference (requirements-test.txt)

TOL = 1e-4  # max-abs logits difference allowed in fp32
GPT2_CFG = dict(model_type="gpt2", vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                bos_token_id=1, eos_token_id=1)
T5_V10 = dict(model_type="t5", vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
              feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
# v1.1: gated-GELU, untied head, d_kv * num_heads = 24 != d_model = 32, more decoder than encoder layers
T5_V11 = dict(T5_V10, d_kv=6, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def hf_gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CFG)).eval()


def hf_t5(cfg, seed=0):
    torch.manual_seed(seed)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg)).eval()
    if not cfg["tie_word_embeddings"]:  # transformers >= 5 ties lm_head at init; give v1.1 its own head
        ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.lm_head.weight))
    return ref


def write_checkpoint(folder, config, sd, layout="safetensors"):
    """Write `sd` (checkpoint keys) + config.json as one model.safetensors, 2 shards + index, or pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}  # no shared storage
    if layout == "safetensors":
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded":
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(folder / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    return folder


def original_gpt2_keys(ref):
    """The layout of the original hub files (openai-community/gpt2): no `transformer.` prefix, attn.bias and
    attn.masked_bias buffers present, no lm_head."""
    sd = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    n = GPT2_CFG["n_positions"]
    for i in range(GPT2_CFG["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def ids_batch(B=2, T=12, V=120, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (B, T), generator=g)


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """(transformers reference, our model loaded from transformers' save_pretrained folder, that folder)."""
    ref = hf_gpt2()
    folder = tmp_path_factory.mktemp("hf-gpt2")
    ref.save_pretrained(folder)
    return ref, model.from_pretrained(folder), folder


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 parity in every layout


@pytest.mark.parametrize("layout", ["hf_save", "original", "bin_with_head", "sharded"])
def test_gpt2_logits_match_transformers(tmp_path, layout):
    ref = hf_gpt2()
    if layout == "hf_save":
        ref.save_pretrained(tmp_path)
    elif layout == "original":
        write_checkpoint(tmp_path, GPT2_CFG, original_gpt2_keys(ref))
    elif layout == "bin_with_head":  # old GPT2LMHeadModel pytorch_model.bin: prefix, buffers and the tied lm_head
        buffers = {"transformer." + k: v for k, v in original_gpt2_keys(ref).items()
                   if k.endswith((".attn.bias", ".attn.masked_bias"))}
        write_checkpoint(tmp_path, GPT2_CFG, {**buffers, **ref.state_dict()}, "bin")
    else:
        write_checkpoint(tmp_path, GPT2_CFG, ref.state_dict(), "sharded")
    ours = model.from_pretrained(tmp_path)
    assert isinstance(ours, model.GPT2) and not ours.training
    ids = ids_batch()
    with torch.no_grad():
        out = ours(ids)
        assert maxdiff(out.logits, ref(ids).logits) <= TOL
        assert out.hidden_states.shape == (2, 12, 32) and out.past_key_values is None


def test_shape_agnostic_attention_turns_off_cudnn_sdpa_on_cuda_only():
    """train/eval/bench call it for their device: on CUDA the cuDNN SDPA backend goes off (it re-plans for every
    new sequence length), elsewhere nothing changes. Only a backend flag: no GPU needed to check it."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        model.use_shape_agnostic_attention("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
        model.use_shape_agnostic_attention(torch.device("cuda", 0))
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_gpt2_left_padding_and_holes_equal_unpadded_rows(gpt2_pair):
    ref, ours, _ = gpt2_pair
    holed, hmask, got = check_left_padding_and_holes(ours, ref, [ids_batch(1, n, seed=n)[0] for n in (12, 7, 3)], TOL)
    with torch.no_grad():
        # explicit position_ids give the same as positions derived from the mask
        pos = (hmask.cumsum(-1) - 1).clamp(min=0)
        assert maxdiff(ours(holed, attention_mask=hmask, position_ids=pos).logits[0][hmask[0].bool()], got) == 0


def test_gpt2_inputs_embeds_equals_input_ids(gpt2_pair):
    _, ours, _ = gpt2_pair
    ids = ids_batch()
    with torch.no_grad():
        assert maxdiff(ours(inputs_embeds=ours.embed_tokens(ids)).logits, ours(ids).logits) <= TOL
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ours()
    with torch.no_grad():  # padding may make a batch longer than n_positions as long as the positions fit
        long = torch.cat([torch.zeros(1, 10, dtype=torch.long), ids_batch(1, 60)], 1)
        mask = (long != 0).long()
        assert ours(long, attention_mask=mask).logits.shape == (1, 70, 120)
        with pytest.raises(ValueError, match=re.escape("GPT2.forward: position 69 >= n_positions=64")):
            ours(long)


def test_return_logits_false_and_head(gpt2_pair, tmp_path):
    _, ours, _ = gpt2_pair
    ids = ids_batch()
    with torch.no_grad():
        full = ours(ids)
        lean = ours(ids, return_logits=False)
        assert lean.logits is None and maxdiff(ours.head(lean.hidden_states[:, -3:]), full.logits[:, -3:]) == 0
        for cfg in (T5_V10, T5_V11):  # T5's head includes v1.0's d_model**-0.5 rescale
            t5 = model.from_pretrained(write_checkpoint(tmp_path / cfg["feed_forward_proj"], cfg, hf_t5(cfg).state_dict()))
            ids, mask, dec = t5_inputs()
            full = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
            lean = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, return_logits=False)
            assert lean.logits is None and maxdiff(t5.head(lean.hidden_states), full.logits) == 0


def test_gpt2_kv_cache_prefix_plus_suffix_equals_full(gpt2_pair):
    _, ours, _ = gpt2_pair
    ids = ids_batch(2, 12)
    with torch.no_grad():
        full = ours(ids).logits
        pre = ours(ids[:, :5], use_cache=True)
        assert len(pre.past_key_values) == 2 and pre.past_key_values[0][0].shape == (2, 4, 5, 8)
        assert maxdiff(ours(ids[:, 5:], past_key_values=pre.past_key_values).logits, full[:, 5:]) <= TOL
        one = ours(ids[:, 5:6], past_key_values=pre.past_key_values).logits  # single-token step
        assert maxdiff(one, full[:, 5:6]) <= TOL
        # left-padded prefix: mask over past + current
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :2] = 0
        full_m = ours(ids, attention_mask=mask).logits
        pre = ours(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        got = ours(ids[:, 5:], attention_mask=mask, past_key_values=pre.past_key_values).logits
        assert maxdiff(got, full_m[:, 5:]) <= TOL


def test_gpt2_batch1_prefix_cache_reused_for_a_batch(gpt2_pair):
    """A shared prefix (soft vectors S_D here) computed once with batch 1, then reused for 3 right-padded suffixes."""
    _, ours, _ = gpt2_pair
    torch.manual_seed(0)
    prefix = torch.randn(1, 4, 32) * 0.1  # (1, l, d) soft prefix
    suffix = ids_batch(3, 6, seed=3)
    smask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    with torch.no_grad():
        cache = ours(inputs_embeds=prefix, use_cache=True).past_key_values
        mask = torch.cat([torch.ones(3, 4, dtype=torch.long), smask], 1)  # (B, T_past + T)
        got = ours(suffix, attention_mask=mask, past_key_values=cache).logits  # (3, 6, V)
        for b in range(3):
            n = int(smask[b].sum())
            emb = torch.cat([prefix[0], ours.embed_tokens(suffix[b, :n])])[None]
            assert maxdiff(got[b, :n], ours(inputs_embeds=emb).logits[0, 4:]) <= TOL


def test_gpt2_empty_inputs_and_input_checks(gpt2_pair):
    """B = 0 or T = 0 give empty logits (also after a cache); a mask must be (B, T_past + T) or (1, T_past + T);
    explicit position_ids past the position table are refused even when the sequence itself is short."""
    _, ours, _ = gpt2_pair
    ids = ids_batch(2, 5)
    with torch.no_grad():
        assert ours(ids[:, :0]).logits.shape == (2, 0, 120)
        assert ours(ids[:0], attention_mask=torch.ones(0, 5, dtype=torch.long)).logits.shape == (0, 5, 120)
        pre = ours(ids[:1], use_cache=True).past_key_values
        out = ours(ids[:, :0], past_key_values=pre, use_cache=True)
        assert out.logits.shape == (2, 0, 120) and out.past_key_values[0][0].shape == (2, 4, 5, 8)
        assert maxdiff(ours(ids, attention_mask=torch.ones(1, 5, dtype=torch.long)).logits, ours(ids).logits) == 0
    bad = {(3, 5): "(3, 5), expected (B, T_past + T) = (2, 5) or (1, 5)",
           (5,): "(5,), expected (B, T_past + T) = (2, 5) or (1, 5)",
           (2, 1, 5): "(2, 1, 5), expected (B, T_past + T) = (2, 5) or (1, 5)"}
    for shape, msg in bad.items():
        with pytest.raises(ValueError, match=re.escape(f"GPT2.forward: attention_mask has shape {msg}")):
            ours(ids, attention_mask=torch.ones(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("GPT2.forward: position 64 >= n_positions=64")):
        ours(ids, position_ids=torch.tensor([[0, 1, 2, 3, 64]]))


# ---------------------------------------------------------------------------------------------------------------
# T5 parity


def t5_inputs():
    ids, dec = ids_batch(2, 10, seed=4), ids_batch(2, 7, seed=5)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask, dec


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
@pytest.mark.parametrize("layout", ["hf_save", "duplicated_embeddings", "sharded"])
def test_t5_logits_match_transformers(tmp_path, version, layout):
    cfg = T5_V10 if version == "v1.0" else T5_V11
    ref = hf_t5(cfg)
    if layout == "hf_save":  # transformers >= 5 writes scale_decoder_outputs and tie_word_embeddings=true
        ref.save_pretrained(tmp_path)
    else:  # the full state dict: shared, encoder.embed_tokens, decoder.embed_tokens and lm_head all present
        write_checkpoint(tmp_path, cfg, ref.state_dict(), "safetensors" if layout != "sharded" else "sharded")
    ours = model.from_pretrained(tmp_path)
    assert isinstance(ours, model.T5) and hasattr(ours, "lm_head") == (version == "v1.1")
    ids, mask, dec = t5_inputs()
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        exp = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        assert maxdiff(out.logits, exp.logits) <= TOL
        assert maxdiff(out.encoder_hidden_states, exp.encoder_last_hidden_state) <= TOL
        assert out.hidden_states.shape == (2, 7, 32)


def test_t5_padding_embeds_encoder_states_and_shift_right(tmp_path):
    ref = hf_t5(T5_V11)
    ours = model.from_pretrained(write_checkpoint(tmp_path, T5_V11, ref.state_dict()))
    ids, _, dec = t5_inputs()
    with torch.no_grad():
        full = ours(input_ids=ids, decoder_input_ids=dec).logits
        # encoder left padding + decoder right padding equal the unpadded row
        pids = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
        pmask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 10, dtype=torch.long)], 1)
        pdec = torch.cat([dec, torch.zeros(2, 2, dtype=torch.long)], 1)
        dmask = torch.cat([torch.ones(2, 7, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)], 1)
        got = ours(input_ids=pids, attention_mask=pmask, decoder_input_ids=pdec, decoder_attention_mask=dmask).logits
        assert maxdiff(got[:, :7], full) <= TOL and not got.isnan().any()
        assert maxdiff(got[:, :7], ref(input_ids=ids, decoder_input_ids=dec).logits) <= TOL
        # inputs_embeds path and a precomputed encoder
        assert maxdiff(ours(inputs_embeds=ours.embed_tokens(ids), decoder_input_ids=dec).logits, full) <= TOL
        enc = ours.encode(input_ids=ids)
        assert maxdiff(ours(encoder_hidden_states=enc, decoder_input_ids=dec).logits, full) <= TOL
    labels = torch.tensor([[5, 6, 1, -100]])
    assert ours.shift_right(labels).tolist() == [[0, 5, 6, 1]]
    assert ref._shift_right(labels).tolist() == [[0, 5, 6, 1]]


def test_t5_empty_inputs_and_mask_checks(tmp_path):
    """B = 0 or an empty decoder give empty logits; masks must be (B, T) or (1, T) for encoder and decoder."""
    ours = model.from_pretrained(write_checkpoint(tmp_path, T5_V11, hf_t5(T5_V11).state_dict()))
    ids, mask, dec = t5_inputs()
    with torch.no_grad():
        assert ours(input_ids=ids[:0], attention_mask=mask[:0], decoder_input_ids=dec[:0]).logits.shape == (0, 7, 120)
        assert ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :0]).logits.shape == (2, 0, 120)
        one = torch.ones(1, 10, dtype=torch.long)  # a (1, T) mask is shared by the batch
        assert maxdiff(ours(input_ids=ids, attention_mask=one, decoder_input_ids=dec).logits,
                       ours(input_ids=ids, decoder_input_ids=dec).logits) == 0
    with pytest.raises(ValueError, match=re.escape("T5.encode: attention_mask has shape (2, 9), expected "
                                                   "(B, T_enc) = (2, 10) or (1, 10)")):
        ours(input_ids=ids, attention_mask=mask[:, :9], decoder_input_ids=dec)
    with pytest.raises(ValueError, match=re.escape("T5.forward: attention_mask has shape (10,), expected "
                                                   "(B, T_enc) = (2, 10) or (1, 10)")):
        ours(encoder_hidden_states=torch.zeros(2, 10, 32), attention_mask=mask[0], decoder_input_ids=dec)
    with pytest.raises(ValueError, match=re.escape("T5.forward: decoder_attention_mask has shape (3, 7), expected "
                                                   "(B, T_dec) = (2, 7) or (1, 7)")):
        ours(input_ids=ids, decoder_input_ids=dec, decoder_attention_mask=torch.ones(3, 7, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# our save_pretrained <-> transformers, build_model, bf16


@pytest.mark.parametrize("cfg", [GPT2_CFG, T5_V10, T5_V11], ids=["gpt2", "t5-v1.0", "t5-v1.1"])
def test_transformers_loads_our_save_pretrained(tmp_path, cfg, tiny_tokenizer):
    torch.manual_seed(0)
    ours = model.build_model(cfg).eval()
    model.save_pretrained(ours, tmp_path, tokenizer=tiny_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    cls = transformers.GPT2LMHeadModel if cfg["model_type"] == "gpt2" else transformers.T5ForConditionalGeneration
    ref = cls.from_pretrained(tmp_path).eval()
    ids = ids_batch()
    kw = {} if cfg["model_type"] == "gpt2" else dict(decoder_input_ids=ids[:, :5])
    with torch.no_grad():
        assert maxdiff(ours(ids, **kw).logits, ref(ids, **kw).logits) <= TOL
        again = model.from_pretrained(tmp_path)  # and our own round trip is exact
        assert maxdiff(again(ids, **kw).logits, ours(ids, **kw).logits) == 0
    assert model.load_tokenizer(tmp_path).get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert model.load_config(tmp_path)["model_type"] == cfg["model_type"]


def test_build_model_init_like_transformers():
    torch.manual_seed(0)
    g = model.build_model(dict(GPT2_CFG, n_embd=64, vocab_size=2000))
    assert abs(g.transformer.wte.weight.std().item() - 0.02) < 2e-3
    assert abs(g.transformer.h[0].attn.c_proj.weight.std().item() - 0.02 / 2) < 2e-3  # 0.02 / sqrt(2 * n_layer)
    assert g.transformer.ln_f.weight.eq(1).all() and g.transformer.h[0].attn.c_attn.bias.eq(0).all()
    t = model.build_model(T5_V11)
    assert abs(t.shared.weight.std().item() - 1.0) < 0.1
    assert abs(t.encoder.block[0].layer[0].SelfAttention.q.weight.std().item() - (32 * 6) ** -0.5) < 0.02


def test_bf16_smoke(gpt2_pair, tmp_path):
    _, ours32, folder = gpt2_pair
    ids = ids_batch()
    with torch.no_grad():
        lo = model.from_pretrained(folder, dtype=torch.bfloat16).transformer.wte.weight
        assert lo.dtype == torch.bfloat16
        g = model.from_pretrained(folder, dtype="bf16")
        out = g(ids, attention_mask=torch.ones(2, 12, dtype=torch.long)).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert maxdiff(out, ours32(ids).logits) < 0.05
        t5 = model.from_pretrained(write_checkpoint(tmp_path, T5_V11, hf_t5(T5_V11).state_dict()), dtype=torch.bfloat16)
        ids, mask, dec = t5_inputs()
        out = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


FP16_TOL = 0.1  # see test_t5_fp16_keeps_wo_fp32_like_transformers


def test_t5_fp16_keeps_wo_fp32_like_transformers(tmp_path):
    """In fp16, transformers keeps T5's `wo` in fp32 (_keep_in_fp32_modules) and casts the FF hidden state to it, so
    an overflowing FF output (flan / lm-adapt; here wo x 1e5) stays finite and makes the residual stream fp32.
    Measured max |ours - transformers| (|logits| ~ 20, fp16 ulp there 1/64): 0.023 / 0.045 / 0.0625 with wo x 1 /
    1e3 / 1e5 (19.7 at 1e5 before wo was kept fp32). All of it is the GELU: ours is torch's fused tanh-GELU,
    transformers' gelu_new a formula evaluated in fp16 ops; with that formula swapped in the difference is exactly
    0. FP16_TOL = 0.1 (~6 ulps) covers the 0.0625 measured."""
    ref = hf_t5(T5_V11)
    with torch.no_grad():
        for stack in (ref.encoder, ref.decoder):
            for block in stack.block:
                block.layer[-1].DenseReluDense.wo.weight.mul_(1e5)
    folder = write_checkpoint(tmp_path, T5_V11, ref.state_dict())
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float16).eval()
    ours = model.from_pretrained(folder, dtype="fp16")
    wo = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    assert wo == {n for n, _ in ours.named_parameters() if n.endswith(".DenseReluDense.wo.weight")} and len(wo) == 5
    assert {p.dtype for n, p in ours.named_parameters() if n not in wo} == {torch.float16}
    ids, mask, dec = t5_inputs()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        exp = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert maxdiff(got, exp) <= FP16_TOL
        from transformers.activations import ACT2FN
        for m in ours.modules():  # transformers' fp16 GELU arithmetic: then bit-identical
            if isinstance(m, model.T5DenseReluDense):
                m.act = ACT2FN["gelu_new"]
        assert maxdiff(ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, exp) == 0


def test_cast_keeps_t5_wo_fp32_in_fp16_only(tmp_path):
    """model.cast(module, dtype): .to(dtype) but T5's `wo` stays fp32 in fp16, also inside a wrapper (mend.MEND);
    casting an fp32 model equals loading in fp16; bf16 casts everything, like transformers."""
    folder = write_checkpoint(tmp_path, T5_V11, hf_t5(T5_V11).state_dict())
    wrapper = torch.nn.ModuleDict(dict(t5=model.from_pretrained(folder), proj=torch.nn.Linear(4, 4)))
    assert model.cast(wrapper, "fp16") is wrapper
    dtypes = {n: p.dtype for n, p in wrapper.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.float32} == {
        f"t5.{s}.block.{i}.layer.{j}.DenseReluDense.wo.weight" for s, n, j in (("encoder", 2, 1), ("decoder", 3, 2))
        for i in range(n)}
    assert {d for d in dtypes.values()} == {torch.float16, torch.float32} and wrapper.proj.weight.dtype == torch.float16
    ids, mask, dec = t5_inputs()
    with torch.no_grad():
        got = wrapper.t5(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        loaded = model.from_pretrained(folder, dtype=torch.float16)
        assert maxdiff(got, loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits) == 0
    assert {p.dtype for p in model.cast(wrapper, torch.bfloat16).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.cast(wrapper, "fp32", "cpu").parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# loading errors, each with its exact message


def _gpt2_folder(tmp_path, edit):
    sd = dict(hf_gpt2().state_dict())
    sd.pop("lm_head.weight")
    edit(sd)
    return write_checkpoint(tmp_path, GPT2_CFG, sd)


def test_error_missing_tensor(tmp_path):
    folder = _gpt2_folder(tmp_path, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: tensor 'transformer.h.1.mlp.c_fc.bias' is missing "
                            "from the checkpoint (the model expects shape (128,))")


def test_error_unexpected_tensor(tmp_path):
    folder = _gpt2_folder(tmp_path, lambda sd: sd.update({"transformer.h.2.ln_1.weight": torch.ones(32)}))
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: unexpected tensor 'transformer.h.2.ln_1.weight' (32,) "
                            "in the checkpoint (not in a gpt2 model of this config.json)")


def test_error_wrong_shape(tmp_path):
    folder = _gpt2_folder(tmp_path, lambda sd: sd.update({"transformer.wpe.weight": torch.zeros(63, 32)}))
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: tensor 'transformer.wpe.weight' has shape (63, 32) in "
                            "the checkpoint but the model expects (64, 32)")


def test_error_t5_missing_tensor_in_shards(tmp_path):
    sd = dict(hf_t5(T5_V10).state_dict())
    sd.pop("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    folder = write_checkpoint(tmp_path, T5_V10, sd, "sharded")
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder}: tensor 'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight' "
                            "is missing from the checkpoint (the model expects shape (8, 4))")


def test_error_untied_gpt2_head(tmp_path):
    ref = hf_gpt2()
    sd = {**ref.state_dict(), "lm_head.weight": torch.zeros(120, 32)}
    folder = write_checkpoint(tmp_path, GPT2_CFG, sd)
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: lm_head.weight (120, 32) differs from "
                            "transformer.wte.weight (120, 32) but the head is tied (untied GPT-2 heads are not "
                            "supported); expected equal tensors")


def test_error_t5_tied_head_differs_from_embeddings(tmp_path):
    """v1.0 (tie_word_embeddings=true) with a checkpoint lm_head.weight that is not the embeddings: refused, not
    silently replaced by them; an equal one (the duplicated_embeddings layout) loads."""
    sd = {**hf_t5(T5_V10).state_dict(), "lm_head.weight": torch.zeros(120, 32)}
    folder = write_checkpoint(tmp_path, T5_V10, sd, "sharded")
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder}: lm_head.weight (120, 32) differs from shared.weight (120, 32) but the head "
                            "is tied (config.json: tie_word_embeddings=true); expected equal tensors")


def test_error_mixed_key_layouts(tmp_path):
    """`transformer.wte.weight` and `wte.weight` in one file map to one parameter: refused (was: the last one won)."""
    sd = dict(hf_gpt2().state_dict())
    sd["wte.weight"] = torch.zeros(120, 32)
    folder = write_checkpoint(tmp_path, GPT2_CFG, sd)
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: checkpoint tensors 'transformer.wte.weight' and "
                            "'wte.weight' both map to 'transformer.wte.weight' (expected one key layout, not a mix)")


def _write(folder, files: dict):  # {name: bytes or str}
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


def test_error_malformed_files_name_the_file(tmp_path):
    sd = {k: v.contiguous() for k, v in hf_gpt2().state_dict().items() if k != "lm_head.weight"}
    cfg = json.dumps(GPT2_CFG)
    save_file(sd, str(tmp_path / "good.safetensors"))
    good = (tmp_path / "good.safetensors").read_bytes()
    index = "model.safetensors.index.json"
    cases = {
        "config": ({"config.json": '{"model_type": "gpt2",', "model.safetensors": good},
                   "config.json: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 23 "
                   "(char 22)); expected a JSON object of model settings"),
        "config_list": ({"config.json": "[1]", "model.safetensors": good},
                        "config.json: a JSON list, expected a JSON object of model settings"),
        "config_type": ({"config.json": json.dumps({**GPT2_CFG, "n_layer": "1"}), "model.safetensors": good},
                        "config.json: 'n_layer' is '1', expected int"),
        "index": ({"config.json": cfg, index: "{", "model-00001-of-00001.safetensors": good},
                  f"{index}: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                  '(char 1)); expected {"weight_map": {tensor name: shard file}}'),
        "index_no_map": ({"config.json": cfg, index: '{"metadata": {}}', "model-00001-of-00001.safetensors": good},
                         f'{index}: no "weight_map" object, expected {{"weight_map": {{tensor name: shard file}}}}'),
        "safetensors": ({"config.json": cfg, "model.safetensors": b"garbage"},
                        "model.safetensors: not a readable safetensors file (Error while deserializing header: "
                        "header too small); expected the file safetensors.save_file writes"),
        "bin": ({"config.json": cfg, "pytorch_model.bin": b"garbage"},
                "pytorch_model.bin: not a readable PyTorch checkpoint (Unsupported operand 103); expected the file "
                "torch.save writes"),
    }
    for name, (files, msg) in cases.items():
        folder = _write(tmp_path / name, files)
        with pytest.raises(ValueError) as e:
            model.from_pretrained(folder)
        assert str(e.value) == f"{folder}/{msg}", name
    with pytest.raises(ValueError, match=re.escape("build_model(config): 'scale_attn_weights' is 1, expected bool")):
        model.build_model(dict(GPT2_CFG, scale_attn_weights=1))
    with pytest.raises(ValueError, match=re.escape("build_model(config): 'n_inner' is 64.0, expected int or null")):
        model.build_model(dict(GPT2_CFG, n_inner=64.0))
    # ints for floats (JSON writes 1e-05 as written, 1.0 may come as 1), null / list token ids (never read) are fine
    m = model.build_model(dict(GPT2_CFG, layer_norm_epsilon=1, bos_token_id=None, eos_token_id=[1, 2]))
    assert m.config.layer_norm_epsilon == 1 and m.config.eos_token_id == [1, 2]


def test_dtype_names_and_errors():
    assert model._dtype("bf16") is torch.bfloat16 and model._dtype("float16") is torch.float16
    assert model._dtype(torch.float64) is torch.float64
    for bad in ("fp8", "int8", torch.int64, torch.bool, None):
        with pytest.raises(ValueError) as e:
            model._dtype(bad)
        assert str(e.value) == f"model.py: dtype must be a floating torch dtype or one of fp32/fp16/bf16, got {bad!r}"


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    import os

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), replace(a, b)))
    model._atomic_write(tmp_path / "x.json", lambda p: p.write_text("{}"))
    tmp = str(tmp_path / f".x.json.tmp{os.getpid()}")
    assert events == [("fsync", tmp), ("replace", tmp)] and (tmp_path / "x.json").read_text() == "{}"


def test_error_unsupported_model_type_and_no_weights(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as e:
        model.from_pretrained(tmp_path / "bert")
    assert str(e.value) == (f"{tmp_path / 'bert' / 'config.json'}: model_type 'bert' is not supported; "
                            "supported: gpt2, llama, mistral, opt, qwen2, t5")
    with pytest.raises(ValueError, match="model_type 'bloom' is not supported; supported: gpt2, llama, mistral"):
        model.build_model({"model_type": "bloom"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(GPT2_CFG))
    with pytest.raises(FileNotFoundError, match="no model.safetensors, model.safetensors.index.json or pytorch_model.bin"):
        model.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json and no GPT-2 vocab.json"):
        model.load_tokenizer(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# hub ids, offline, through huggingface_hub's cache layout


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE with HF_HUB_OFFLINE=1 (env and huggingface_hub's import-time constants)."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_loads_from_cache_offline(offline_hub, gpt2_pair, tiny_tokenizer):
    _, ours, folder = gpt2_pair
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--org--tiny-gpt2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((folder / name).read_bytes())
    tiny_tokenizer.save(str(snap / "tokenizer.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = model.from_pretrained("org/tiny-gpt2")
    ids = ids_batch()
    with torch.no_grad():
        assert maxdiff(loaded(ids).logits, ours(ids).logits) == 0
    assert model.load_config("org/tiny-gpt2")["n_embd"] == 32
    assert model.load_tokenizer("org/tiny-gpt2").get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert model.resolve("org/tiny-gpt2", ["config.json"]) == snap


def test_hub_id_not_cached_fails_clearly(offline_hub):
    for name in ("org/absent-model", "no/such/folder"):
        with pytest.raises(FileNotFoundError) as e:
            model.from_pretrained(name)
        assert str(e.value).startswith(f"'{name}' is neither a local folder nor reachable on the Hugging Face hub")


# ---------------------------------------------------------------------------------------------------------------
# real files from ../shared/data


def c4_paragraph():
    line = shared_path("c4", "c4-train.00000-of-01024.head1000.jsonl").open().readline()
    return json.loads(line)["text"]


def test_real_gpt2_tokenizer_files():
    from tokenizers import Tokenizer

    tok = model.load_tokenizer(shared_path("gpt2-tokenizer"))
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode("<|endoftext|>").ids == [50256]
    ref = Tokenizer.from_file(str(shared_path("hf-tiny-gpt2", "tokenizer.json")))
    text = c4_paragraph()
    assert len(text) > 200
    ids = tok.encode(text).ids
    assert ids == ref.encode(text).ids
    assert tok.decode(ids) == text


def test_real_third_party_checkpoint_matches_transformers():
    folder = shared_path("hf-tiny-gpt2")
    ours = model.from_pretrained(folder)
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.tensor([model.load_tokenizer(folder).encode(c4_paragraph()).ids[:64]])
    with torch.no_grad():
        assert maxdiff(ours(ids).logits, ref(ids).logits) <= TOL


def test_t5_fp16_activations_are_clamped_not_inf():
    """transformers' T5 clamps fp16 hidden states after every sub-layer, to +-(max - 1000) when one is inf and to
    +-max otherwise (finite values pass unchanged); an fp32 sub-layer output (an fp32 `wo`) gives an fp32 stream,
    never clamped."""
    class Big(torch.nn.Module):  # the sub-layer's output: c x the (unit-RMS) normalised input, in `dtype`
        def __init__(self, c, dtype=None):
            super().__init__()
            self.c, self.dtype = c, dtype

        def forward(self, h):
            return h.to(self.dtype or h.dtype) * self.c

    cfg = model.T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2, dropout_rate=0.0)
    sub = lambda c, dtype=None: model.T5SubLayer(cfg, "DenseReluDense", Big(c, dtype))  # noqa: E731
    x = torch.full((1, 2, 4), 40000.0)
    assert sub(40000)(x).max().item() == 80000.0                 # fp32: untouched (above fp16's range)
    y = sub(40000).half()(x.half())                              # 80000 -> inf in fp16 -> clamped
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert y.max().item() == torch.tensor(65504.0 - 1000, dtype=torch.float16).item() == 64512.0
    y = sub(32736).half()(torch.full((1, 2, 4), 32768.0, dtype=torch.float16))  # 65504: fp16's max, finite
    assert y.dtype == torch.float16 and y.max().item() == 65504.0  # kept (an unconditional clamp gave 64512)
    y = sub(40000, torch.float32).half()(x.half())               # fp32 output: the stream is promoted to fp32
    assert y.dtype == torch.float32 and y.max().item() == 80000.0
