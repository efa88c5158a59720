"""
Tests for the NITP objective and the model's NITP path: the losses, the shift and stop-gradient,
the head, the ablation switches, the geometry metrics and the FLOPs accounting. CPU only, tiny
shapes. Training, data, MoE and the scripts are tested in tests/.

    python -m pytest -q test_nitp.py

Every test checks a property that breaks when the code is wrong: closed-form values, equality with
an independent computation, gradients that must (not) flow, and runs that must match.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from nitp import (cosine_loss, effective_rank, generic_cosine_loss, implicit_token_loss, mean_pairwise_cosine,
                  mse_loss, smooth_l1_loss)


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
    hooks = [src.register_forward_hook(lambda m, i, o: seen.__setitem__("z", o if k == 0 else o[0])),
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
    # The reference detaches z: equal gradients everywhere mean the layers up to k get gradient from
    # the NITP loss only through h_t (the stop-gradient), never through the target.
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6), name


@pytest.mark.parametrize("weight", [0.6, 2.5])
def test_total_is_ntp_plus_weighted_nitp(weight):
    model = tiny_model(nitp_weight=weight)
    idx = torch.randint(0, 64, (2, 16))
    _, losses = model(idx, idx)
    # losses["nitp"] is the unweighted loss (what the log shows); the total carries lambda once
    assert torch.allclose(losses["nitp"], reference_nitp(model, idx, model.config.nitp_layer), atol=1e-6)
    assert torch.allclose(losses["total"], losses["ntp"] + weight * losses["nitp"])
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
    assert [GPTConfig(n_layer=n).nitp_layer for n in (17, 24, 16, 28)] == [4, 5, 3, 6]  # the spec's, all four


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
        losses = model(idx, idx)[1]
        assert "nitp" not in losses  # logged under its own name: it predicts no implicit token
        loss = losses["generic_cos"]
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


def test_losses_and_geometry_keep_full_precision_for_bf16_inputs():
    """Under bf16 autocast the model hands these functions bf16 states: the losses must compute in fp32 and the
    geometry in float64 from those values; arithmetic rounded to bf16 (3 digits) misses by far more than this."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 9, 64, generator=g).bfloat16()
    pred = (target.float() + 0.01 * torch.randn(2, 9, 64, generator=g)).bfloat16()  # aligned: 1 - cos ~ 5e-5
    got = {}
    for autocast in (True, False):  # autocast runs some losses (smooth_l1) in fp32 itself; bf16 weights do not
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got.update({(name, autocast): implicit_token_loss(pred, target, loss=name)
                        for name in ("cosine", "mse", "smooth_l1")})
            got["generic_cosine", autocast] = generic_cosine_loss(pred)
    p, t = pred.double()[:, :-1], target.double()[:, 1:]  # (B, T-1, C): pred at t, target at t+1
    u = F.normalize(pred.double(), dim=-1)
    pairs = u @ u.transpose(1, 2)  # (B, T, T)
    want = {"cosine": (1 - F.cosine_similarity(p, t, dim=-1)).mean(), "mse": ((p - t) ** 2).mean(),
            "smooth_l1": F.smooth_l1_loss(p, t),
            "generic_cosine": (pairs.sum() - pairs.diagonal(0, 1, 2).sum()) / (2 * 9 * 8)}  # B * T * (T-1) pairs
    for (name, autocast), value in got.items():
        assert value.dtype == torch.float32 and abs(value.item() - want[name].item()) < 1e-6 * max(1, want[name]), name
    states = (torch.randn(60, 12, generator=g) @ torch.diag(torch.linspace(0.1, 3, 12))).bfloat16()
    h = states.double().numpy()
    for given in (states, states.float()):
        assert effective_rank(given) == pytest.approx(numpy_erank(h), rel=1e-9)
        assert mean_pairwise_cosine(given) == pytest.approx(numpy_mean_cos(h), abs=1e-12)

