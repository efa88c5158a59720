"""
Tests of hf.py, both directions. Export: a trained GPT exported as a Llama folder loads in transformers and gives
the same logits; the folder handling refuses what it must and leaves nothing behind. Import: tiny random
transformers models (saved with save_pretrained, no download) give the same logits through GPT.from_pretrained, train
under DDP with --init_from=hf: and resume; whatever is not implemented is refused in one line. CPU, tiny shapes.
transformers and safetensors are test-only dependencies (the mapping itself needs only safetensors).

    python -m pytest -q tests/test_hf.py
"""
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from hf import HFError, export_hf  # noqa: E402
from model import GPT, GPTConfig, apply_rotary, rotary_tables  # noqa: E402

V, T = 96, 24  # vocabulary (padded to 96, more than the ids we feed) and sequence length (= block_size)


def tiny_config(n_kv_head=2, tie=False, **overrides):
    # Non-default rope_theta, norm_eps and mlp_hidden: a field lost on the way would change the logits.
    base = dict(block_size=T, vocab_size=V, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, mlp_hidden=48,
                rope_theta=500.0, norm_eps=1e-5, tie_embeddings=tie, nitp_weight=1.0)
    return GPTConfig(**{**base, **overrides})


def trained(config, seed=0, steps=3):
    """A GPT after a few AdamW steps on random ids: norm gains away from 1, lm_head away from wte."""
    torch.manual_seed(seed)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(steps):
        idx = torch.randint(0, V, (2, T))
        _, losses = model(idx, idx.roll(-1, dims=1))
        losses["total"].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_gives_the_same_logits(tmp_path, n_kv_head, tie):
    model = trained(tiny_config(n_kv_head, tie))
    assert model.nitp_head is not None and float(model.transformer.h[0].ln_1.weight.detach().std()) > 0  # trained, head present
    export_hf(model, str(tmp_path / "hf"), tokenizer="byte", eot_token=7)
    hf, info = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # every HF weight came from the file
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.shape == theirs.shape == (3, T, V)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_rotary_convention_matches_rotate_half(tmp_path):
    """Our apply_rotary (first half, second half of each head) equals HF Llama's rotary embedding
    built from the exported config: no permutation of q/k rows is needed."""
    from transformers.models.llama import modeling_llama
    cfg = tiny_config()
    export_hf(GPT(cfg), str(tmp_path / "hf"))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    q, k = torch.randn(2, cfg.n_head, T, cfg.head_dim), torch.randn(2, cfg.n_kv_head, T, cfg.head_dim)
    cos, sin = modeling_llama.LlamaRotaryEmbedding(hf_config)(q, torch.arange(T).expand(2, T))  # (B, T, hd)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    our_cos, our_sin = rotary_tables(cfg.head_dim, T, cfg.rope_theta)
    torch.testing.assert_close(apply_rotary(q, our_cos, our_sin), hf_q)
    torch.testing.assert_close(apply_rotary(k, our_cos, our_sin), hf_k)
    assert not torch.allclose(hf_q, q)  # the rotation did something


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tensors_and_config(tmp_path, tie):
    cfg = tiny_config(tie=tie)
    model = trained(cfg)
    export_hf(model, str(tmp_path / "hf"), tokenizer="byte", eot_token=7)
    tensors = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert not any("nitp" in name for name in tensors)
    assert ("lm_head.weight" in tensors) == (not tie)
    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("nitp_head."))
    assert sum(t.numel() for t in tensors.values()) == n_params  # every trunk weight once, the head's none
    hd = cfg.head_dim
    c_attn = model.transformer.h[1].attn.c_attn.weight
    torch.testing.assert_close(tensors["model.layers.1.self_attn.k_proj.weight"], c_attn[4 * hd:6 * hd])
    torch.testing.assert_close(tensors["model.layers.1.self_attn.v_proj.weight"], c_attn[6 * hd:])
    with open(tmp_path / "hf" / "config.json") as f:
        written = json.load(f)
    expected = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                    rope_theta=500.0, vocab_size=V, max_position_embeddings=T, tie_word_embeddings=tie,
                    hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="float32",
                    bos_token_id=7, eos_token_id=7)
    assert {key: written[key] for key in expected} == expected
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")  # and transformers reads them so
    assert (hf_config.num_key_value_heads, hf_config.head_dim, hf_config.rms_norm_eps) == (2, 8, 1e-5)
    assert hf_config.tie_word_embeddings == tie and hf_config.rope_parameters["rope_theta"] == 500.0


def test_moe_model_is_refused_in_one_line(tmp_path):
    moe = GPT(tiny_config(n_experts=4, moe_top_k=2))
    with pytest.raises(HFError) as e:
        export_hf(moe, str(tmp_path / "hf"))
    assert "\n" not in str(e.value) and "MoE" in str(e.value) and "MLA" in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("contents", [{"notes.txt": "mine"}, {"config.json": '{"model_type": "llama"}'},
                                      {"config.json": '{"nitp_export": {}}', "notes.txt": "mine"}],
                         ids=["foreign-file", "foreign-hf-model", "ours-plus-a-user-file"])
def test_foreign_folder_is_refused_and_untouched(tmp_path, contents):
    target = tmp_path / "hf"
    target.mkdir()
    for name, text in contents.items():
        (target / name).write_text(text)
    with pytest.raises(HFError) as e:
        export_hf(trained(tiny_config(), steps=0), str(target))
    assert "\n" not in str(e.value) and "refusing to overwrite" in str(e.value)
    assert {p.name: p.read_text() for p in target.iterdir()} == contents
    assert os.listdir(tmp_path) == ["hf"]  # no temporary folder either


def test_reexport_replaces_own_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "hf"
    target.mkdir()  # an empty folder is fine too
    first = export_hf(trained(tiny_config(), seed=0), str(target), tokenizer="byte", eot_token=256)
    assert first["tokenizer_files"] == [] and "no standard Hugging Face tokenizer" in first["tokenizer_note"]
    second_model = trained(tiny_config(), seed=1)
    second = export_hf(second_model, str(target), tokenizer="cl100k_base", eot_token=50256)
    assert "cl100k_base" in second["tokenizer_note"] and "cl100k_base" in (target / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["hf"] and sorted(os.listdir(target)) == ["README.md", "config.json",
                                                                                      "model.safetensors"]
    tensors = safetensors_torch.load_file(target / "model.safetensors")  # the second model's weights
    torch.testing.assert_close(tensors["model.embed_tokens.weight"], second_model.transformer.wte.weight.detach())
    assert json.loads((target / "config.json").read_text())["eos_token_id"] == 50256


def test_missing_safetensors_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import raise ImportError
    with pytest.raises(HFError, match="pip install safetensors"):
        export_hf(GPT(tiny_config()), str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_sample_py_exports_a_trained_checkpoint_and_refuses_moe_in_one_line(tmp_path):
    """The command a user runs: sample.py --export_hf on train.py's checkpoint (the tokenizer and
    end-of-text id come from the checkpoint); an MoE checkpoint is one line and exit code 2."""
    from conftest import ROOT, TINY, make_dataset, run_script
    import train
    data = make_dataset(tmp_path / "data")
    assert train.main([*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'dense'}", "--max_iters=1"]) == 0
    out = run_script(ROOT / "sample.py", f"--out_dir={tmp_path / 'dense'}", f"--export_hf={tmp_path / 'hf'}",
                     timeout=120)
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 59 and config["num_hidden_layers"] == 2  # make_dataset: eot = vocab - 1
    assert train.main([*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'moe'}", "--max_iters=1",
                       "--n_experts=4", "--moe_top_k=1"]) == 0
    out = run_script(ROOT / "sample.py", f"--out_dir={tmp_path / 'moe'}", f"--export_hf={tmp_path / 'hf2'}",
                     timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "MoE" in out.stderr
    assert not (tmp_path / "hf2").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Import: GPT.from_pretrained and train.py --init_from=hf:PATH

from conftest import GPT2_FILE, ROOT, TINY, make_dataset, needs_gpt2, read_log, run_script, torchrun  # noqa: E402

HF_V, HF_T = 100, 32  # the tiny transformers models' vocabulary and max_position_embeddings
# With head_dim 8 and theta 500000, original_max_pos / wavelength is 5.1, 0.19, 0.007, 0.0003 for the four frequencies:
# one kept (> high), one interpolated, two slowed (< low); Llama 3's own factors (1, 4) would leave no kept one here.
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=0.1, high_freq_factor=4.0,
              original_max_position_embeddings=32)
HF_SHAPE = ["--n_layer=5", "--n_head=4"]  # TINY's shape flags replaced by the checkpoint's (n_embd is 32 in both)
HF_KINDS = {  # each covers what the issue names for it; non-default eps and head_dim where the class allows them
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                                  rope_scaling=LLAMA3, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, head_dim=12, sliding_window=HF_T)),  # window >= block
}


def hf_folder(path, kind, seed=0, **overrides):
    """A random transformers model of `kind` saved at path (weights std 0.3, biases too, so that a wrong mapping
    changes the logits); -> the model, in eval mode."""
    name, extra = HF_KINDS[kind]
    config = getattr(transformers, name)(**{**dict(vocab_size=HF_V, hidden_size=32, intermediate_size=40,
                                                   num_hidden_layers=5, num_attention_heads=4,
                                                   max_position_embeddings=HF_T), **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def same_logits(ours, theirs):
    idx = torch.randint(0, HF_V, (2, HF_T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours.eval()(idx)[0], theirs(idx).logits
    assert b.abs().max() > 1  # not a degenerate model
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", list(HF_KINDS))
def test_from_pretrained_gives_transformers_logits(tmp_path, kind):
    theirs = hf_folder(tmp_path, kind)
    ours = GPT.from_pretrained(str(tmp_path), {"block_size": HF_T})
    assert same_logits(ours, theirs) < 1e-4
    cfg = ours.config
    assert (cfg.n_layer, cfg.nitp_layer, cfg.qkv_bias, cfg.tie_embeddings) == (5, 1, kind == "qwen2", kind == "qwen2")
    assert ours.nitp_head is not None  # new, for continued pre-training with NITP
    if kind == "llama":  # the scaling is in force: without it the logits differ
        import dataclasses
        plain = GPT(dataclasses.replace(cfg, rope_factor=0.0))
        plain.load_state_dict(ours.state_dict())
        assert same_logits(plain, theirs) > 1e-2


def test_sharded_checkpoint_and_transformers_4_config(tmp_path):
    """Shards read through model.safetensors.index.json; a config.json as transformers 4.x writes it (rope_theta,
    rope_scaling with "type", no rope_parameters) reads as 5.x's does."""
    theirs = hf_folder(tmp_path, "llama")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert same_logits(GPT.from_pretrained(str(tmp_path / "sharded"), {"block_size": HF_T}), theirs) < 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    assert rope["rope_type"] == "llama3"
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling={"type": rope.pop("rope_type"), **rope})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert same_logits(GPT.from_pretrained(str(tmp_path), {"block_size": HF_T}), theirs) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_then_export_gives_back_the_original_tensors(tmp_path, kind):
    hf_folder(tmp_path / "in", kind)
    info = export_hf(GPT.from_pretrained(str(tmp_path / "in"), {"block_size": HF_T}), str(tmp_path / "out"))
    assert info["architecture"] == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
    original = safetensors_torch.load_file(tmp_path / "in" / "model.safetensors")
    exported = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == exported.keys()
    for name, t in original.items():
        assert torch.equal(t, exported[name]), name
    assert os.stat(tmp_path / "out" / "model.safetensors").st_mode & 0o777 == 0o644
    theirs, loading = load_hf(tmp_path / "out")  # transformers reads the export as the original model
    assert type(theirs).__name__ == info["architecture"] and not loading["missing_keys"], loading
    assert same_logits(GPT.from_pretrained(str(tmp_path / "in"), {"block_size": HF_T}), theirs) < 1e-4


REFUSED = {  # config.json edit -> a word the one line must contain
    "mla": ({"architectures": ["DeepseekV3ForCausalLM"]}, "DeepseekV3ForCausalLM"),
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    "attention-bias": ({"attention_bias": True}, "attention_bias"),
    "mlp-bias": ({"mlp_bias": True}, "mlp_bias"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act"),
    "window": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 8},
               "sliding_window"),
}


@pytest.mark.parametrize("edit,flags,word", [(edit, [], word) for edit, word in REFUSED.values()] + [
    ({}, ["--n_layer=3"], "--n_layer=3 conflicts"), ({}, ["--block_size=64"], "max_position_embeddings"),
    ({"vocab_size": 50}, [], "below the dataset's 60")],
    ids=list(REFUSED) + ["conflicting-flag", "block-size", "data-vocab"])
def test_refused_in_one_line_by_train_py(tmp_path, edit, flags, word):
    hf_folder(tmp_path / "hf", "llama", vocab_size=HF_V if "vocab_size" not in edit else edit["vocab_size"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    data = make_dataset(tmp_path / "data")
    out = run_script(ROOT / "train.py", *TINY, f"--init_from=hf:{tmp_path / 'hf'}", f"--data_dir={data}",
                     f"--out_dir={tmp_path / 'out'}", "--max_iters=1", *HF_SHAPE, *flags, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and word in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_init_from_hf_trains_under_ddp_and_resumes(tmp_path, fsdp):
    """3 NITP steps under 2 processes (DDP, or FSDP2: full weights loaded, then sharded) from a Qwen2 checkpoint:
    the first evaluation is the imported model's loss; then --init_from=resume continues without the shape flags."""
    from dataset import get_batch, val_offsets
    import numpy as np
    theirs = hf_folder(tmp_path / "hf", "qwen2")
    data, out_dir = make_dataset(tmp_path / "data"), tmp_path / "out"
    common = [f"--data_dir={data}", f"--out_dir={out_dir}", *HF_SHAPE]
    torchrun(f"--init_from=hf:{tmp_path / 'hf'}", *common, "--max_iters=3", f"--fsdp={fsdp}")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["hf_source"] == str(tmp_path / "hf") and config["world_size"] == 2
    assert config["model"]["nitp_layer"] == 1 and config["model"]["qkv_bias"] and config["model"]["vocab_size"] == HF_V
    train_records, evals = read_log(out_dir)
    assert [r["iter"] for r in train_records] == [1, 2, 3] and all("nitp" in r for r in train_records)
    val = np.memmap(os.path.join(data, "val.bin"), dtype=np.uint16, mode="r")
    batches = [get_batch(val, o, 16, torch.device("cpu")) for o in val_offsets(len(val), 16, 4, 2)]  # TINY's eval
    with torch.no_grad():
        expected = sum(torch.nn.functional.cross_entropy(theirs(x).logits.view(-1, HF_V), y.view(-1)).item()
                       for x, y in batches) / len(batches)
    assert abs(evals[0]["val_loss"] - expected) < 1e-4  # the imported weights, not a fresh init
    no_shape = [f for f in TINY if not f.startswith(("--n_layer", "--n_head", "--n_embd"))]
    out = run_script(ROOT / "train.py", *no_shape, "--init_from=resume", f"--data_dir={data}", f"--out_dir={out_dir}",
                     "--max_iters=5", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["iter"] for r in read_log(out_dir)[0]] == [1, 2, 3, 4, 5]
    assert json.loads((out_dir / "config.json").read_text())["hf_source"] == str(tmp_path / "hf")


@pytest.mark.parametrize("damage", ["truncated", "shard-missing", "extra-tensor"])
def test_damaged_weights_are_refused_in_one_line(tmp_path, damage):
    theirs = hf_folder(tmp_path, "llama")
    if damage == "truncated":
        path = tmp_path / "model.safetensors"
        path.write_bytes(path.read_bytes()[:5000])
    else:
        theirs.save_pretrained(tmp_path, max_shard_size="20KB")
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        if damage == "shard-missing":
            os.remove(tmp_path / sorted(set(index["weight_map"].values()))[0])
        else:
            index["weight_map"]["model.layers.0.self_attn.o_proj.bias"] = next(iter(index["weight_map"].values()))
            (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFError) as e:
        GPT.from_pretrained(str(tmp_path), {"block_size": HF_T})
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer shipped with the export

@needs_gpt2
def test_gpt2_tokenizer_is_written_and_gives_tiktokens_ids(tmp_path):
    from prepare_data import get_tokenizer
    info = export_hf(GPT(tiny_config()), str(tmp_path / "hf"), tokenizer="gpt2", eot_token=50256,
                     tiktoken_file=str(GPT2_FILE))
    assert "tokenizer.json" in info["tokenizer_files"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ref = get_tokenizer("gpt2", str(GPT2_FILE)).encoding
    text = "Hello world!  It's 2026<|endoftext|>\n\n\tdef f(x):\n    return x**2  # ünïcödé 日本語 🙂 'll've"
    assert tok.encode(text) == ref.encode(text, allowed_special="all")
    assert tok.eos_token_id == 50256 and tok.decode(ref.encode(text, allowed_special="all")) == text


def test_hf_tokenizer_files_are_copied(tmp_path):
    """Data tokenised with an HF tokenizer (meta.json "hf:PATH"): the export carries that tokenizer's files."""
    tokenizers = pytest.importorskip("tokenizers")
    source = tmp_path / "tok"
    source.mkdir()
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(source)
    info = export_hf(GPT(tiny_config()), str(tmp_path / "hf"), tokenizer=f"hf:{source}", eot_token=0)
    assert info["tokenizer_files"] == sorted(p.name for p in source.iterdir())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("hello world") == [1, 2]


def test_checkpoint_from_before_the_new_knobs_resumes(tmp_path):
    """head_dim, qkv_bias and the rope_* knobs are new in GPTConfig: a checkpoint without them still resumes."""
    import train
    from model import load_checkpoint, save_checkpoint
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    assert train.main([*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=1"]) == 0
    ckpt = load_checkpoint(out / "ckpt.pt")
    for key in ("head_dim", "qkv_bias", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_pos"):
        del ckpt["model_config"][key]
    save_checkpoint(str(out / "ckpt.pt"), ckpt)
    assert train.main([*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--init_from=resume"]) == 0
    assert [r["iter"] for r in read_log(out)[0]] == [1, 2]


def test_without_transformers_the_gpt2_export_writes_weights_and_says_how_to_add_the_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import raise ImportError
    info = export_hf(GPT(tiny_config()), str(tmp_path / "hf"), tokenizer="gpt2", eot_token=50256)
    assert info["tokenizer_files"] == [] and "pip install transformers" in info["tokenizer_note"]
    assert sorted(os.listdir(tmp_path / "hf")) == ["README.md", "config.json", "model.safetensors"]
