"""
Tests of export_hf.py: a trained GPT exported as a Llama folder loads in transformers and gives the
same logits; the folder handling refuses what it must and leaves nothing behind. CPU, tiny shapes.
transformers and safetensors are test-only dependencies (the export itself needs only safetensors).

    python -m pytest -q tests/test_export_hf.py
"""
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from export_hf import ExportError, export_hf  # noqa: E402
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
    export_hf(model, str(tmp_path / "hf"), tokenizer="gpt2", eot_token=7)
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
    export_hf(model, str(tmp_path / "hf"), tokenizer="gpt2", eot_token=7)
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
    with pytest.raises(ExportError) as e:
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
    with pytest.raises(ExportError) as e:
        export_hf(trained(tiny_config(), steps=0), str(target))
    assert "\n" not in str(e.value) and "refusing to overwrite" in str(e.value)
    assert {p.name: p.read_text() for p in target.iterdir()} == contents
    assert os.listdir(tmp_path) == ["hf"]  # no temporary folder either


def test_reexport_replaces_own_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "hf"
    target.mkdir()  # an empty folder is fine too
    first = export_hf(trained(tiny_config(), seed=0), str(target), tokenizer="byte", eot_token=256)
    assert first["hf_tokenizer"] is None and "no standard Hugging Face tokenizer" in first["tokenizer_note"]
    second_model = trained(tiny_config(), seed=1)
    second = export_hf(second_model, str(target), tokenizer="gpt2", eot_token=50256)
    assert second["hf_tokenizer"] == "gpt2" and "gpt2" in (target / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["hf"] and sorted(os.listdir(target)) == ["README.md", "config.json",
                                                                                      "model.safetensors"]
    tensors = safetensors_torch.load_file(target / "model.safetensors")  # the second model's weights
    torch.testing.assert_close(tensors["model.embed_tokens.weight"], second_model.transformer.wte.weight.detach())
    assert json.loads((target / "config.json").read_text())["eos_token_id"] == 50256


def test_missing_safetensors_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import raise ImportError
    with pytest.raises(ExportError, match="pip install safetensors"):
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
