"""
Tests for the NITP objective, the model and the training script. CPU only, tiny shapes.

    python -m pytest -q test_nitp.py

Every test checks a property that breaks when the code is wrong: closed-form values, equality with
an independent computation, gradients that must (not) flow, and runs that must match.
"""
import hashlib
import json
import os

# Inductor's pool of compile workers keeps both cores of a small machine busy for a while after
# each compile, slowing every later test; compiling in-process avoids that.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare_data
import train
from model import GPT, GPTConfig
from nitp import (cosine_loss, effective_rank, generic_cosine_loss, implicit_token_loss, mean_pairwise_cosine,
                  mse_loss, smooth_l1_loss)

HERE = Path(__file__).resolve().parent


def tiny_config(**overrides):
    base = dict(block_size=16, vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
    return GPTConfig(**{**base, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


# ------------------------------------------------------------------------------------------------
# the loss functions in nitp.py

def test_cosine_loss_closed_form_values():
    u = torch.randn(5, 8)
    v = torch.randn(5, 8)
    v = v - (v * u).sum(-1, keepdim=True) / u.pow(2).sum(-1, keepdim=True) * u  # orthogonal to u
    assert torch.allclose(cosine_loss(u, u), torch.zeros(5), atol=1e-6)
    assert torch.allclose(cosine_loss(u, -u), torch.full((5,), 2.0), atol=1e-6)
    assert torch.allclose(cosine_loss(u, v), torch.ones(5), atol=1e-5)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.allclose(cosine_loss(3.7 * a, 0.2 * b), cosine_loss(a, b), atol=1e-6)


def test_cosine_loss_gradient_matches_appendix_a():
    p, z = torch.randn(8, requires_grad=True), torch.randn(8)
    cosine_loss(p, z).backward()
    r = p.detach().norm()
    u, v = p.detach() / r, z / z.norm()
    s = (u * v).sum()
    assert torch.allclose(p.grad, -(v - s * u) / r, atol=1e-6)
    assert abs((p.grad * p.detach()).sum()) < 1e-5  # it only rotates the prediction, never scales it


def test_mse_loss_is_mean_squared_error():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(mse_loss(a, b), ((a - b) ** 2).mean(-1))


def test_shift_pairs_t_with_t_plus_1():
    z = torch.randn(2, 7, 4)
    pred = torch.zeros_like(z)
    pred[:, :-1] = z[:, 1:]  # a perfect next-position predictor; the last position is left at zero
    assert implicit_token_loss(pred, z).item() < 1e-6  # off by one in either direction would not be ~0
    assert implicit_token_loss(z, z).item() > 0.5  # the same position is NOT the target
    manual = torch.stack([cosine_loss(z[b, t], z[b, t + 1]) for b in range(2) for t in range(6)]).mean()
    assert torch.allclose(implicit_token_loss(z, z), manual, atol=1e-6)


def test_target_gets_no_gradient():
    pred = torch.randn(2, 5, 4, requires_grad=True)
    target = torch.randn(2, 5, 4, requires_grad=True)
    implicit_token_loss(pred, target).backward()
    assert target.grad is None
    assert pred.grad[:, -1].abs().sum() == 0  # the last position has no next token: dropped
    assert pred.grad[:, :-1].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# the model

def hooked_states(model, idx, k):
    seen = {}
    src = model.transformer.wte if k == 0 else model.transformer.h[k - 1]
    hooks = [src.register_forward_hook(lambda m, i, o: seen.__setitem__("z", o)),
             model.transformer.ln_f.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))]
    model(idx)
    for h in hooks:
        h.remove()
    return seen["z"], seen["h"]


def reference_nitp(model, idx, k, shift=1, detach=True):
    """1 - cos(nitp_head(h_t), z_{t+shift}) from hooked states, independent of GPT.forward's bookkeeping."""
    z, h = hooked_states(model, idx, k)
    pred = model.nitp_head(h) if model.nitp_head is not None else h
    z = z.detach() if detach else z
    T = idx.size(1)
    return (1 - F.cosine_similarity(pred[:, :T - shift], z[:, shift:], dim=-1)).mean()


def nitp_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_model_nitp_loss_and_gradients_match_hooked_reference(k):
    model = tiny_model(nitp_layer=k)
    idx = torch.randint(0, 64, (2, 16))
    _, losses = model(idx, idx)
    model.zero_grad()
    losses["nitp"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = reference_nitp(model, idx, k)
    ref.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(losses["nitp"], ref, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6), name
    # stop-gradient: the layers up to k get no gradient from the NITP loss except through h_t
    assert "lm_head.weight" not in grads


def test_total_is_ntp_plus_weighted_nitp():
    model = tiny_model(nitp_weight=0.6)
    idx = torch.randint(0, 64, (2, 16))
    _, losses = model(idx, idx)
    assert torch.allclose(losses["total"], losses["ntp"] + 0.6 * losses["nitp"])
    logits, _ = model(idx)
    assert torch.allclose(losses["ntp"], F.cross_entropy(logits.view(-1, 64), idx.view(-1)), atol=1e-6)


def test_baseline_has_no_head_and_total_equals_ntp():
    model = tiny_model(nitp_weight=0.0)
    assert model.nitp_head is None
    assert not any(n.startswith("nitp_head") for n, _ in model.named_parameters())
    idx = torch.randint(0, 64, (2, 16))
    _, losses = model(idx, idx)
    assert "nitp" not in losses and losses["total"] is losses["ntp"]


def test_head_free_export_gives_identical_logits():
    model = tiny_model(nitp_layer=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # move away from init so the check means something
    baseline = GPT(replace(model.config, nitp_weight=0.0))
    baseline.load_state_dict(model.inference_state_dict(), strict=True)
    idx = torch.randint(0, 64, (3, 16))
    assert torch.equal(model(idx)[0], baseline(idx)[0])
    assert baseline.num_params() == model.num_params(include_head=False)


def test_causality():
    model = tiny_model().eval()
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 64
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_gqa_matches_repeated_kv_heads():
    """Grouped-query attention equals plain attention with each K/V head repeated."""
    model = tiny_model(n_head=4, n_kv_head=2)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    q, k, v = attn.c_attn(x).split([32, 16, 16], dim=-1)
    q, k, v = (t.view(2, 16, -1, 8).transpose(1, 2) for t in (q, k, v))
    from model import apply_rotary
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 32)
    assert torch.allclose(attn(x, cos, sin), attn.c_proj(y), atol=1e-6)


def test_compiled_equals_eager():
    model = tiny_model()
    compiled = torch.compile(model)
    idx = torch.randint(0, 64, (2, 16))
    _, eager = model(idx, idx)
    eager["total"].backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, comp = compiled(idx, idx)
    comp["total"].backward()
    for key in ("total", "ntp", "nitp"):
        assert torch.allclose(eager[key], comp[key], atol=1e-5), key
    for g, p in zip(eager_grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_overfits_one_batch():
    model = tiny_model()
    idx = torch.randint(0, 64, (4, 16))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(150):
        _, losses = model(idx, idx.roll(-1, dims=1))
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    assert losses["ntp"].item() < 0.1
    assert losses["nitp"].item() < 0.2


def test_generate_greedy_is_argmax_continuation():
    model = tiny_model().eval()
    idx = torch.randint(0, 64, (2, 5))
    out = model.generate(idx, max_new_tokens=4, temperature=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], idx)
    assert torch.equal(out[:, 5], model(idx)[0][:, -1].argmax(-1))


def test_optimizer_groups_decay_matrices_only():
    model = tiny_model()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="nitp_layer"):
        tiny_config(nitp_layer=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny_config(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="nitp_loss"):
        tiny_config(nitp_loss="kl")
    assert GPTConfig(n_layer=17).nitp_layer == 3 and GPTConfig(n_layer=24).nitp_layer == 5  # ~20% of depth


# ------------------------------------------------------------------------------------------------
# the paper's ablation switches

def test_same_position_shift_compares_t_with_t():
    z = torch.randn(2, 6, 4)
    assert implicit_token_loss(z, z, shift=0).item() < 1e-6
    model = tiny_model(nitp_shift=0)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.allclose(model(idx, idx)[1]["nitp"], reference_nitp(model, idx, 1, shift=0), atol=1e-6)


def test_stop_gradient_off_lets_gradient_reach_the_target_path():
    pred, target = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 5, 4, requires_grad=True)
    implicit_token_loss(pred, target, stop_grad=False).backward()
    assert target.grad is not None and target.grad.abs().sum() > 0
    model = tiny_model(nitp_stop_grad=False)
    idx = torch.randint(0, 64, (2, 16))
    off = nitp_grads(model, model(idx, idx)[1]["nitp"])
    ref_on = nitp_grads(model, reference_nitp(model, idx, 1, detach=True))
    ref_off = nitp_grads(model, reference_nitp(model, idx, 1, detach=False))
    name = "transformer.h.0.mlp.c_proj.weight"  # block 1 shapes z: it gets more gradient without stop-gradient
    assert torch.allclose(off[name], ref_off[name], atol=1e-6) and not torch.allclose(off[name], ref_on[name])


def test_no_projection_head_compares_h_with_next_target():
    model = tiny_model(nitp_proj="none")
    assert model.nitp_head is None
    idx = torch.randint(0, 64, (2, 16))
    assert torch.allclose(model(idx, idx)[1]["nitp"], reference_nitp(model, idx, 1), atol=1e-6)


def test_zero_weight_before_start_contributes_no_gradient():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 16))
    _, losses = model(idx, idx, nitp_weight=torch.tensor(0.0))
    before_start = nitp_grads(model, losses["total"])
    ntp_only = nitp_grads(model, model(idx, idx)[1]["ntp"])
    assert all(n in before_start and torch.equal(before_start[n], g) for n, g in ntp_only.items())
    assert all(g.abs().sum() == 0 for n, g in before_start.items() if n.startswith("nitp_head"))
    _, losses = model(idx, idx, nitp_weight=torch.tensor(1.0))
    assert torch.allclose(losses["total"], model(idx, idx)[1]["total"])


def test_generic_cosine_regulariser_has_no_target():
    idx = torch.randint(0, 64, (2, 16))
    values = []
    for k in (0, 2):  # the target layer plays no part
        model = tiny_model(nitp_loss="generic_cosine", nitp_layer=k)
        assert model.nitp_head is None
        _, h = hooked_states(model, idx, k)
        u = F.normalize(h, dim=-1)
        sim = u @ u.transpose(1, 2)  # (B, T, T)
        off_diagonal = (sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)) / (16 * 15)
        loss = model(idx, idx)[1]["nitp"]
        assert torch.allclose(loss, off_diagonal.mean(), atol=1e-6)
        values.append(loss)
    assert torch.allclose(values[0], values[1])  # same seed, same weights: no dependence on layer k
    assert torch.allclose(generic_cosine_loss(h), off_diagonal.mean(), atol=1e-6)


def test_smooth_l1_matches_torch():
    a, b = 3 * torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(smooth_l1_loss(a, b), F.smooth_l1_loss(a, b, reduction="none").mean(-1))


# ------------------------------------------------------------------------------------------------
# FLOPs accounting (spec, Appendix G)

def test_flops_reproduce_the_papers_9b_moe_accounting():
    from model import flops_per_token
    shape = dict(n_embd=1280, n_layer=24, n_head=8, n_kv_head=4, vocab_size=152064, block_size=64, n_experts=144,
                 moe_top_k=8, n_shared_experts=1, expert_hidden=640, nitp_layer=5, nitp_weight=0.8)
    spec = flops_per_token(GPTConfig(**shape, n_dense_layers=0))  # the spec counts all 24 layers as MoE
    d, de, k, L, V = 1280, 640, 9, 24, 152064
    assert spec["ntp"] == 6 * (L * (3 * d * d + 3 * k * d * de) + V * d)  # = L (18 d^2 + 18 k d d_e) + 6 V d
    assert spec["nitp"] == 72 * d * d + 18 * d
    assert round(spec["ntp"] / 1e9, 2) == 5.06 and round(spec["nitp"] / 1e8, 2) == 1.18
    assert round(100 * spec["nitp_share"], 1) == 2.3
    real = flops_per_token(GPTConfig(**shape, n_dense_layers=1, mlp_hidden=10944))  # with the dense first layer
    assert round(100 * real["nitp_share"], 1) == 2.3 and real["ntp"] > spec["ntp"]


def test_flops_match_parameter_count_of_a_dense_model():
    from model import flops_per_token
    model = tiny_model(tie_embeddings=False)
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() < 2)
    touched = model.num_params(include_head=False) - model.transformer.wte.weight.numel() - norms
    flops = flops_per_token(model.config)
    assert flops["ntp"] == 6 * touched
    assert flops["nitp"] == 6 * sum(p.numel() for p in model.nitp_head.parameters()) + 18 * 32
    assert flops_per_token(tiny_config(nitp_weight=0))["nitp"] == 0


# ------------------------------------------------------------------------------------------------
# geometry metrics against plain NumPy

def numpy_erank(h):
    h = h - h.mean(0)
    lam = np.clip(np.linalg.eigvalsh(np.cov(h, rowvar=False)), 0, None)
    p = lam[lam > 0] / lam.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def numpy_mean_cos(h):
    u = h / np.linalg.norm(h, axis=1, keepdims=True)
    n = len(h)
    return float(np.mean([u[i] @ u[j] for i in range(n) for j in range(n) if i != j]))


def test_geometry_matches_numpy_reference():
    h = np.random.default_rng(0).normal(size=(60, 12)) @ np.diag(np.linspace(0.1, 3, 12))
    assert effective_rank(torch.tensor(h)) == pytest.approx(numpy_erank(h), rel=1e-9)
    assert mean_pairwise_cosine(torch.tensor(h)) == pytest.approx(numpy_mean_cos(h), abs=1e-12)
    shifted = h + 5.0  # a common offset: rank unchanged (centred), cosine pulled towards 1
    assert effective_rank(torch.tensor(shifted)) == pytest.approx(numpy_erank(h), rel=1e-9)
    assert mean_pairwise_cosine(torch.tensor(shifted)) == pytest.approx(numpy_mean_cos(shifted), abs=1e-12)


def test_geometry_degenerate_cases():
    v = torch.randn(8, dtype=torch.float64)
    identical = v.repeat(20, 1)
    assert effective_rank(identical) == 0.0  # no spread at all (documented choice; not NaN)
    assert mean_pairwise_cosine(identical) == pytest.approx(1.0)
    rank_one = torch.linspace(-2, 3, 20, dtype=torch.float64)[:, None] * v  # states along one line
    assert effective_rank(rank_one) == pytest.approx(1.0)
    assert mean_pairwise_cosine(rank_one) == pytest.approx(numpy_mean_cos(rank_one.numpy()), abs=1e-12)
    isotropic = torch.eye(6, dtype=torch.float64).repeat(50, 1) * torch.tensor([1.0, -1.0]).repeat_interleave(150)[:, None]
    assert effective_rank(isotropic) == pytest.approx(6.0, rel=1e-9)  # spread evenly over 6 directions


# ------------------------------------------------------------------------------------------------
# train.py: configuration, schedule, data

def test_cli_parses_types_and_config_files(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text('"""doc"""\nn_layer = 4\nlearning_rate = 1e-3\ncompile = False\n')
    cfg, model_args = train.parse_args([str(preset), "--learning_rate=5e-4", "--nitp_weight=0.8", "--compile=true"])
    assert cfg.learning_rate == 5e-4 and cfg.compile is True
    assert model_args == {"n_layer": 4, "nitp_weight": 0.8}
    for bad, needle in ((["--no_such_knob=1"], "no_such_knob"), (["--nitp_layr=2"], "nitp_layer"),
                        (["--batch_size=x"], "batch_size"), (["--compile=maybe"], "compile")):
        with pytest.raises(train.UsageError, match=needle):
            train.parse_args(bad)


@pytest.mark.parametrize("args, needle", [(["--nitp_layer=99"], "nitp_layer=99"),
                                          (["--no_such_knob=1"], "no_such_knob")])
def test_cli_errors_are_one_line_without_traceback(args, needle):
    out = subprocess.run([sys.executable, "train.py", *args], cwd=HERE, capture_output=True, text=True)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr


def test_lr_schedule():
    cfg = train.TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1, decay_frac=0.2)
    lrs = [train.get_lr(it, cfg) for it in range(100)]
    assert lrs[0] > 0  # the first step already learns
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable
    assert abs(lrs[-1] - 0.1) < 1e-12 and all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # decays to min_lr
    cos = replace(cfg, lr_schedule="cosine")
    assert abs(train.get_lr(10, cos) - 1.0) < 1e-12 and abs(train.get_lr(100, cos) - 0.1) < 1e-12


def test_batch_offsets_are_stateless_and_distinct_per_micro_batch():
    a = train.batch_offsets(10_000, 16, 8, seed=1, step=5, micro=0)
    assert np.array_equal(a, train.batch_offsets(10_000, 16, 8, seed=1, step=5, micro=0))
    assert not np.array_equal(a, train.batch_offsets(10_000, 16, 8, seed=1, step=5, micro=1))
    assert not np.array_equal(a, train.batch_offsets(10_000, 16, 8, seed=1, step=6, micro=0))


# ------------------------------------------------------------------------------------------------
# train.py end to end (in-process for speed; torchrun for the multi-process ones)

def make_dataset(folder, n_train=20_000, n_val=2_000, vocab=60):
    """A learnable byte-ish corpus: a repeated random 'sentence' with noise."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, vocab, size=97)
    def tokens(n):
        seq = np.resize(pattern, n).astype(np.uint16)
        noise = rng.random(n) < 0.05
        seq[noise] = rng.integers(0, vocab, size=noise.sum())
        return seq
    os.makedirs(folder, exist_ok=True)
    tokens(n_train).tofile(os.path.join(folder, "train.bin"))
    tokens(n_val).tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"tokenizer": "test", "vocab_size": vocab, "dtype": "uint16", "train_tokens": n_train,
                   "val_tokens": n_val, "eot_token": vocab - 1}, f)
    return str(folder)


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--warmup_iters=2", "--log_interval=1", "--learning_rate=3e-3", "--min_lr=3e-4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def run_train(*args):
    return train.main([*TINY, *args])


def test_training_run_learns_and_logs(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=15",
                     "--gradient_accumulation_steps=2") == 0
    steps, evals = read_log(out)
    assert [r["iter"] for r in steps] == list(range(1, 31))  # max_iters counts optimizer steps
    assert set(steps[0]) == {"iter", "loss", "ntp", "nitp", "lr"}
    assert [r["iter"] for r in evals] == [0, 15, 30] and set(evals[0]) == {"iter", "val_loss", "val_nitp", "erank", "mean_cos"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["iter_num"] == 30
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


def test_exported_inference_weights_load_into_baseline_with_identical_logits(data_dir, tmp_path):
    import sample
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3") == 0
    sample.main([f"--out_dir={out}", f"--export={tmp_path / 'inference.pt'}"])
    exported = torch.load(tmp_path / "inference.pt", weights_only=False)
    assert exported["model_config"]["nitp_weight"] == 0 and not any("nitp_head" in k for k in exported["model"])
    plain = GPT(GPTConfig(**exported["model_config"]))
    plain.load_state_dict(exported["model"], strict=True)
    trained, _ = sample.load_model(os.path.join(out, "ckpt.pt"))
    idx = torch.randint(0, 60, (2, 16))
    assert torch.equal(plain.eval()(idx)[0], trained(idx)[0])


def test_compiled_training_run_evaluates(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--compile=true") == 0
    steps, evals = read_log(out)
    assert len(steps) == 2 and len(evals) == 2
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


def test_resume_is_exact(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run_train(*common, f"--out_dir={straight}", "--max_iters=8") == 0
    assert run_train(*common, f"--out_dir={split}", "--max_iters=4") == 0
    assert run_train(*common, f"--out_dir={split}", "--max_iters=8", "--init_from=resume") == 0
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=False)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=False)
    for name in a["model"]:  # bit-for-bit: on CPU every op here is deterministic
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert read_log(straight) == read_log(split)


def test_checkpoint_survives_kill_during_write(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    script = f"""
import os, signal, torch, train
train.save_checkpoint({path!r}, {{"iter_num": 1, "w": torch.ones(3)}})
real_save = torch.save
def dying_save(obj, f):
    f.write(b"partial bytes of a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
train.save_checkpoint({path!r}, {{"iter_num": 2, "w": torch.zeros(3)}})
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True)
    assert out.returncode == -signal.SIGKILL
    ckpt = train.load_checkpoint(path)
    assert ckpt["iter_num"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_damaged_checkpoint_is_a_clear_error(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ckpt.pt" in err[0]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_nonfinite_loss_stops_and_keeps_checkpoint(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2") == 0
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"]["transformer.ln_f.weight"].fill_(1e38)  # logits overflow to inf: the loss is NaN
    train.save_checkpoint(path, ckpt)
    before = sha256(path)
    capsys.readouterr()
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--init_from=resume") == 3
    assert "non-finite" in capsys.readouterr().err
    assert sha256(path) == before
    # skip mode: every step is skipped, so the weights never change and the run still finishes
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--init_from=resume",
                     "--on_nonfinite=skip") == 0
    after = torch.load(path, weights_only=False)
    assert after["iter_num"] == 4
    assert all(torch.equal(after["model"][k], ckpt["model"][k]) for k in ckpt["model"])


@pytest.mark.parametrize("args, needle", [
    (["--dataset=missing_dataset"], "prepare_data.py"),
    (["--block_size=30000"], "block_size"),
    (["--total_batch_size=100"], "total_batch_size"),
    (["--nitp_layer=2"], "nitp_layer"),
    (["--vocab_size=10"], "vocab_size"),
])
def test_bad_inputs_fail_before_work_with_one_line(data_dir, tmp_path, capsys, args, needle):
    source = [] if args[0].startswith("--dataset") else [f"--data_dir={data_dir}"]
    assert run_train(*source, f"--out_dir={tmp_path}", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_resume_with_other_model_shape_is_refused(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 0
    capsys.readouterr()
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume", "--n_embd=64") == 2
    err = capsys.readouterr().err
    assert "n_embd" in err and "checkpoint 32" in err


# ------------------------------------------------------------------------------------------------
# multi-process (torchrun, gloo on CPU)

def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "out")
    torchrun(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3",
             "--gradient_accumulation_steps=2")
    return out


def test_ddp_two_ranks_equal_one_process_with_more_accumulation(data_dir, ddp_run, tmp_path):
    single = str(tmp_path / "single")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={single}", "--max_iters=6", "--eval_interval=3",
                     "--gradient_accumulation_steps=4") == 0
    (steps_ddp, evals_ddp), (steps_one, evals_one) = read_log(ddp_run), read_log(single)
    assert len(steps_ddp) == len(steps_one) == 6
    for a, b in zip(steps_ddp + evals_ddp, steps_one + evals_one):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a, b)
    wa = torch.load(os.path.join(ddp_run, "ckpt.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(single, "ckpt.pt"), weights_only=False)["model"]
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_ddp_resume_is_exact(data_dir, ddp_run, tmp_path):
    out = str(tmp_path / "out")
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=3", "--gradient_accumulation_steps=2",
              "--lr_decay_iters=6"]
    torchrun(*common, "--max_iters=3")
    torchrun(*common, "--max_iters=6", "--init_from=resume")
    assert read_log(out) == read_log(ddp_run)
    wa = torch.load(os.path.join(ddp_run, "ckpt.pt"), weights_only=False)
    wb = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert len(wb["rng_states"]) == 2


# ------------------------------------------------------------------------------------------------
# prepare_data.py

from test_prepare_data import GPT2_FILE, needs_gpt2  # noqa: E402  (where the GPT-2 ranks are found)


@needs_gpt2
def test_gpt2_ids_and_round_trip_from_local_ranks():
    tok = prepare_data.get_tokenizer("gpt2", tiktoken_file=str(GPT2_FILE))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_token == 50256 and tok.vocab_size == 50257
    text = "NITP predicts z_{t+1}: caf\u00e9, \u6f22\u5b57, <|endoftext|> stays text.\n"
    assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_round_trip():  # test_prepare_data.py covers the dataset files themselves
    tok = prepare_data.get_tokenizer("byte")
    text = "def f(x):\n    return '\u00e9\u6f22'\n"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < tok.eot_token == 256


def test_llmc_shards_train_and_read_across_boundaries(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 60, size=n) for n in (700, 300, 900)]
    for i, t in enumerate(tokens):
        prepare_data.write_llmc_shard(tmp_path / f"train_{i:03d}.bin", t)
    prepare_data.write_llmc_shard(tmp_path / "val_000.bin", tokens[0][:500])
    shards = train.ShardedTokens(str(tmp_path / "train_*.bin"))
    whole = np.concatenate(tokens)
    assert len(shards) == len(whole)
    for start in (0, 650, 699, 990, 1100):  # inside a shard, and across one and two boundaries
        assert np.array_equal(shards[start:start + 420], whole[start:start + 420])
    out = str(tmp_path / "out")
    assert run_train(f"--train_shards={tmp_path}/train_*.bin", f"--val_shards={tmp_path}/val_*.bin",
                     f"--out_dir={out}", "--max_iters=2") == 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["model_config"]["vocab_size"] == 50304
    (tmp_path / "bad_000.bin").write_bytes(b"\0" * 2048)
    capsys.readouterr()
    assert run_train(f"--train_shards={tmp_path}/bad_*.bin", f"--val_shards={tmp_path}/val_*.bin",
                     f"--out_dir={out}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad_000.bin" in err[0] and "magic" in err[0]


# ------------------------------------------------------------------------------------------------
# the experiment runner

def test_experiment_runner_table_is_mean_and_spread_over_seeds(data_dir, tmp_path):
    import run_experiments
    root = str(tmp_path / "exp")
    run_experiments.main(["--variants=ntp,nitp", "--seeds=2", f"--out={root}", "--max_iters=4", "--",
                          *TINY, f"--data_dir={data_dir}", "--eval_interval=2"])
    table = (tmp_path / "exp" / "results.md").read_text().splitlines()
    finals = {v: [read_log(os.path.join(root, f"{v}_s{s}"))[1][-1] for s in (1, 2)] for v in ("ntp", "nitp")}
    for row, v in zip(table[2:], ("ntp", "nitp")):
        losses = [f["val_loss"] for f in finals[v]]
        assert row.startswith(f"| {v} | 2 | {np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} |")
    assert "| - |" in table[2] and "| - |" not in table[3]  # the baseline has no NITP loss
    # same seed, same data and initial weights: the step-0 evaluation of the trunk is identical
    first = {v: read_log(os.path.join(root, f"{v}_s1"))[1][0] for v in ("ntp", "nitp")}
    assert first["ntp"]["val_loss"] == pytest.approx(first["nitp"]["val_loss"], rel=1e-6)
