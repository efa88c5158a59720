"""
GPT with the NITP projection head, in reading order: the model's config, the blocks, GPT (its forward holds the
NITP lines); then what training needs (FLOPs, checkpoint files); last the mixture-of-experts machinery
(routing, then the grouped-matmul custom ops). The scripts are train.py (training) and sample.py (generation, export).

A modern decoder like the paper's models (spec, "Architecture"): RMSNorm, rotary position embeddings, grouped-query
attention (F.scaled_dot_product_attention), SwiGLU MLPs, no biases. Module names follow nanoGPT / Hugging Face
(transformer.wte, transformer.h, transformer.ln_f, lm_head) plus `nitp_head`, the training-only projection head.

    logits, losses = model(idx, targets)   # one forward pass
    losses = {"total": back-propagated, "ntp": cross-entropy, "nitp": implicit-token loss (unweighted),
              "moe_aux": balance loss and "expert_counts": tokens per expert (MoE models only)}
"""
import math
import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nitp import NITP_LOSSES, generic_cosine_loss, implicit_token_loss


def check_fields(config, lowest, choices):
    """A config's fields as given: every float finite, every number >= its lowest, every choice one of its values."""
    for name, value in vars(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value} must be a finite number")
        if value < lowest.get(name, value):
            raise ValueError(f"{name}={value} must be >= {lowest[name]}")
        if value not in choices.get(name, (value,)):
            raise ValueError(f"{name}={value!r} must be one of {choices[name]}")


@dataclass
class GPTConfig:
    # The defaults are a small model that trains on a 2-core CPU in minutes; config/ has larger ones.
    block_size: int = 128  # context length in tokens (paper: 8192)
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64; train.py takes it from meta.json
    n_layer: int = 6  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 = n_head (plain MHA). Paper: 8 q / 4 kv
    n_embd: int = 128  # model width d
    head_dim: int = 0  # width of one attention head; 0 = n_embd / n_head (imported models may differ: Mistral-Nemo)
    qkv_bias: bool = False  # biases on the query/key/value projections: Qwen2's only biases (the paper's models: none)
    mlp_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 d rounded up to a multiple of 64 (~8 d^2 params)
    rope_theta: float = 10000.0  # rotary embedding base
    # Llama 3.1's rotary scaling (HF rope_type "llama3"): low frequencies slowed by rope_factor, high ones kept
    rope_factor: float = 0.0  # 0 = off; Llama 3.1: 8, Llama 3.2: 32
    rope_low_freq_factor: float = 1.0  # wavelengths above rope_original_max_pos / this are slowed fully (Llama 3: 1)
    rope_high_freq_factor: float = 4.0  # wavelengths below rope_original_max_pos / this are kept (Llama 3: 4)
    rope_original_max_pos: int = 8192  # the context the rotary frequencies were trained for (Llama 3: 8192)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share wte and lm_head weights (the paper's models are untied)
    dropout: float = 0.0  # dropout on attention and residual outputs; 0 for pre-training, as the paper
    # --- Mixture of experts (spec, "Architecture": DeepSeek-V2 style, dropless top-k). Off by default ---
    n_experts: int = 0  # routed experts E per MoE layer; 0 = MoE off: all blocks dense, nothing built (paper: 144)
    n_shared_experts: int = 1  # always-active experts, one SwiGLU n_shared_experts * expert_hidden wide (paper: 1)
    moe_top_k: int = 8  # K: routed experts per token (paper: 8)
    expert_hidden: int = 0  # one expert's SwiGLU width; 0 = mlp_hidden / (K + shared), up to 16 (paper: 544 at d=768)
    n_dense_layers: int = 1  # leading blocks that keep the dense MLP (width mlp_hidden) when MoE is on (paper: 1)
    moe_aux_weight: float = 0.01  # alpha on the layer-mean balance loss (paper: none; DeepSeek-V2: 0.003/layer, summed)
    moe_renorm: bool = False  # rescale each token's K routing weights to sum to 1 (DeepSeek-V2: no, raw softmax scores)
    # --- NITP (spec, "Defaults") ---
    nitp_layer: int = -1  # k: target = residual stream after block k (0 = embedding output); -1 = ~20% of depth
    nitp_weight: float = 1.0  # lambda; 0 = the NTP baseline: no head is built, nothing extra computed (paper: 1.0)
    nitp_loss: str = "cosine"  # the paper's; ablations "mse" (diverged), "smooth_l1" (less stable), "generic_cosine"
    # --- the paper's ablation switches; the defaults are the method ---
    nitp_shift: int = 1  # temporal shift: 1 = predict z_{t+1} (paper); 0 = z_t, same position (hurts badly)
    nitp_stop_grad: bool = True  # stop-gradient on the target (paper); False lets layers 1..k co-adapt (worse than NTP)
    nitp_proj: str = "swiglu"  # projection head: "swiglu" d -> 4d -> d (paper) or "none" (compare h_t itself; worse)

    def __post_init__(self):  # check each field as given, derive the 0 / -1 defaults, then check fields together
        lowest = dict(block_size=1, vocab_size=1, n_layer=1, n_head=1, n_kv_head=0, n_embd=1, mlp_hidden=0, head_dim=0,
                      n_experts=0, nitp_weight=0, rope_factor=0)
        if self.n_experts:  # the MoE fields are read only when MoE is on, so only then checked
            lowest.update(moe_top_k=1, n_shared_experts=0, expert_hidden=0, n_dense_layers=0, moe_aux_weight=0)
        choices = dict(nitp_loss=NITP_LOSSES, nitp_shift=(0, 1), nitp_proj=("swiglu", "none"))
        check_fields(self, lowest, choices)
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} and norm_eps={self.norm_eps} must be > 0")
        if self.rope_factor and not (0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                                     and self.rope_original_max_pos > 0):
            raise ValueError(f"rope_factor={self.rope_factor} needs 0 < rope_low_freq_factor < rope_high_freq_factor "
                             f"and rope_original_max_pos > 0 (Llama 3: 1, 4, 8192)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.head_dim % 2 or not self.head_dim and self.n_embd % (2 * self.n_head):  # RoPE rotates channel pairs
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of 2 * n_head={self.n_head} (an even head "
                             f"width), or set an even head_dim (now {self.head_dim})")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.mlp_hidden = self.mlp_hidden or 64 * math.ceil(8 * self.n_embd / 3 / 64)
        # ~20% of the n_layer + 1 states 0..n_layer gives the spec's 4 of 17, 5 of 24, 3 of 16 and 6 of 28 (20% of
        # n_layer rounds 17 to 3, its ceiling 16 to 4)
        auto_layer = max(1, round((self.n_layer + 1) / 5)) if self.n_layer > 1 else 0
        self.nitp_layer = auto_layer if self.nitp_layer == -1 else self.nitp_layer
        if self.n_experts and not self.expert_hidden:  # iso-active: K routed + shared experts as wide as the dense MLP
            self.expert_hidden = 16 * math.ceil(self.mlp_hidden / (self.moe_top_k + self.n_shared_experts) / 16)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if not 0 <= self.nitp_layer < self.n_layer:
            raise ValueError(f"nitp_layer={self.nitp_layer} must be in [0, n_layer-1] = [0, {self.n_layer - 1}] (0 = "
                             f"embedding output, k = after block k; the paper uses ~20% of depth, e.g. {auto_layer})")
        if self.n_experts and self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be <= n_experts={self.n_experts}: each token picks K "
                             f"distinct experts; lower moe_top_k or raise n_experts")
        if self.n_experts and self.n_dense_layers >= self.n_layer:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} must be < n_layer={self.n_layer} so that at least "
                             f"one MoE layer is built (paper: 1); for a dense model set n_experts=0")

    @property
    def nitp(self):
        return self.nitp_weight > 0

    @property
    def aux_name(self):  # "generic_cos" for the baseline regulariser: it predicts nothing, so it is not "nitp"
        return "generic_cos" if self.nitp_loss == "generic_cosine" else "nitp"

    @property
    def has_nitp_head(self):
        return self.nitp and self.nitp_proj == "swiglu" and self.nitp_loss != "generic_cosine"

    def is_moe_layer(self, i):  # whether block i (0-based) gets an MoE feed-forward instead of the dense MLP
        return self.n_experts > 0 and i >= self.n_dense_layers


def rotary_tables(head_dim, seq_len, theta, llama3=None):
    """cos and sin tables, each (seq_len, head_dim/2), for rotating pairs of channels. llama3: None, or Llama 3.1's
    scaling as (factor, low_freq_factor, high_freq_factor, original_max_pos)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    if llama3:
        factor, low, high, original_max_pos = llama3
        # Wavelengths longer than original_max_pos / low were never seen whole in training: slowed by `factor`;
        # shorter than original_max_pos / high: kept; in between: interpolated, linear in 1 / wavelength.
        smooth = ((original_max_pos * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (first half, second half) of x (B, H, T, hd) by position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, hd/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                                bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        hd = self.head_dim
        qkv = self.c_attn(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)  # one matmul
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in qkv)  # q (B, H, T, hd); k, v (B, Hkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)  # (B, T, H hd)
        return F.dropout(self.c_proj(y), p=self.dropout, training=self.training)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): d -> hidden -> d, three matrices, no bias. Used for the block
    MLP and for the NITP head (spec: hidden 4d, 12 d^2 parameters)."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.c_gate = nn.Linear(n_embd, hidden, bias=False)
        self.c_up = nn.Linear(n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_up(x))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else SwiGLU(config.n_embd, config.mlp_hidden)  # always `mlp`: one layout
        self.dropout = config.dropout
        self.checkpoint = False  # recompute the block in backward instead of keeping activations (train.py sets it)

    def forward(self, x, cos, sin):
        if self.checkpoint and torch.is_grad_enabled():
            # Non-reentrant: works under compile, DDP and FSDP2. Called inside the block's FSDP hooks, so the
            # recomputation reuses the weights FSDP gathered for backward; dropout masks are replayed (RNG state saved).
            return torch.utils.checkpoint.checkpoint(self.layer, x, cos, sin, use_reentrant=False)
        return self.layer(x, cos, sin)

    def layer(self, x, cos, sin):
        """-> (x, moe_stats): the new residual stream (B, T, C), and an MoE block's (balance loss,
        expert counts) or None. Returned, not kept as module state or appended to an argument, so
        that compiled, DDP and FSDP models (FSDP rebuilds argument lists) all pass them through."""
        x = x + self.attn(self.ln_1(x), cos, sin)
        y, stats = self.mlp(self.ln_2(x)) if self.is_moe else (self.mlp(self.ln_2(x)), None)
        return x + F.dropout(y, p=self.dropout, training=self.training), stats


# Logits per chunk of the loss: 2**27 fp32 values (512 MB), 882 positions at the paper's vocabulary of 152,064;
# smaller chunks made the CPU loss slower (1.4x plain at 220 positions, 1.16x at 441, 1.04x at 882).
CE_CHUNK_LOGITS = 2 ** 27


def cross_entropy_chunks(h, weight, targets, chunk, grads):
    """-> (mean cross-entropy of h @ weight.T against targets, ignoring -1; its gradients wrt h and weight, or None).
    h (N, C), weight (V, C), targets (N,). `chunk` positions at a time: their logits, log-softmax and gradient exist
    only for that chunk, where the plain path holds three (N, V) tensors (2.5 GB each at N=4096, V=152,064)."""
    valid = targets != -1  # (N,)
    scale = 1.0 / valid.sum()  # F.cross_entropy's mean over the positions not ignored
    loss = torch.zeros((), device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros_like(weight, dtype=loss.dtype) if grads else None
    weight_mm = None  # weight in the logits' dtype, cast once for all chunks (bf16 under autocast)
    for i in range(0, h.size(0), chunk):
        hc, tc, vc = h[i:i + chunk], targets[i:i + chunk].clamp(min=0), valid[i:i + chunk]  # (n, C), (n,), (n,)
        logits = F.linear(hc, weight)  # (n, V), in the matmul dtype (bf16 under autocast), as lm_head gives
        logp = logits.to(loss.dtype).log_softmax(dim=-1)  # (n, V), at least fp32 like the plain path
        loss = loss + (-logp.gather(1, tc[:, None]).squeeze(1) * vc).sum()
        if grads:  # d loss / d logits = (softmax - onehot(target)) / n_valid on the positions not ignored
            g = logp.exp_()  # in place: no second (n, V) tensor
            g[torch.arange(len(tc), device=g.device), tc] -= 1
            g = g.mul_((vc * scale)[:, None]).to(logits.dtype)  # (n, V); as the backward of .float() rounds it
            weight_mm = weight.to(g.dtype) if weight_mm is None else weight_mm
            grad_h[i:i + chunk] = g @ weight_mm  # (n, C)
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), hc)  # (V, C), accumulated without a (V, C) temporary
            else:  # bf16 matmul under autocast, summed in fp32 over chunks
                grad_w += (g.t() @ hc.to(g.dtype)).to(grad_w.dtype)
    return loss * scale, grad_h, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """The unembedding and cross-entropy as one op: the gradients are made chunk by chunk in forward (the logits
    are never kept for backward), and backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        loss, grad_h, grad_w = cross_entropy_chunks(h, weight, targets, chunk, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None


def linear_cross_entropy(h, weight, targets, chunk):
    """F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-1) in equal value and gradients, holding
    the logits of `chunk` positions at a time (issue 22). h (N, C), weight (V, C), targets (N,)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, targets, chunk)
    return cross_entropy_chunks(h, weight, targets, chunk, grads=False)[0]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.init_rope()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "experts.c_proj")):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # Training only, not built for the baseline: predicts the next token's layer-k state from h_t. Built
        # after the trunk is initialised, so that NTP and NITP runs with one seed start from the same trunk.
        self.nitp_head = SwiGLU(config.n_embd, 4 * config.n_embd) if config.has_nitp_head else None
        if self.nitp_head is not None:
            self.nitp_head.apply(self._init_weights)

    def init_rope(self, device=None):
        """The RoPE tables as buffers, derived so kept out of checkpoints; made again on `device` once a model built
        on the meta device (train.py, FSDP) has storage."""
        c = self.config
        llama3 = (c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_pos)
        cos, sin = rotary_tables(c.head_dim, c.block_size, c.rope_theta, llama3 if c.rope_factor else None)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:  # qkv_bias
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, path, overrides=None):
        """The Hugging Face model in the local folder `path` (Llama, Mistral, Qwen2: see hf.py) with the same logits.
        overrides: GPTConfig fields that are not architecture (block_size, the nitp_* knobs, dropout)."""
        from hf import hf_gpt_config, load_hf_weights  # the mapping lives in hf.py, with the export
        model = cls(hf_gpt_config(path, overrides or {}))
        load_hf_weights(model, path)
        return model

    def num_params(self, include_head=True):
        head = 0 if include_head or self.nitp_head is None else sum(p.numel() for p in self.nitp_head.parameters())
        return sum(p.numel() for p in self.parameters()) - head

    def trunk(self, idx):
        """idx (B, T) -> (z, h, routing): the layer-k states z (B, T, C), the implicit-token source;
        the final states h (B, T, C) after ln_f, what the unembedding sees (only these two are kept);
        and each MoE block's (balance loss, expert counts), empty for a dense model."""
        B, T = idx.shape
        cfg = self.config
        assert T <= cfg.block_size, f"sequence of {T} tokens exceeds block_size={cfg.block_size}"
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.transformer.wte(idx)  # (B, T, C), layer 0
        z = x if cfg.nitp_layer == 0 else None
        routing = []  # (balance loss, expert counts) of each MoE block
        for i, block in enumerate(self.transformer.h):
            x, stats = block(x, cos, sin)
            if stats is not None:
                routing.append(stats)
            if i + 1 == cfg.nitp_layer:
                z = x
        return z, self.transformer.ln_f(x), routing

    def forward(self, idx, targets=None, nitp_weight=None):
        """idx, targets: (B, T) token ids; targets -1 are ignored by the cross-entropy. nitp_weight: optional
        tensor overriding config.nitp_weight (a schedule such as a late start changes its value without
        recompiling). Returns (logits (B, T, V), None) without targets; with targets (None, the loss dict):
        the loss never holds the logits of all positions (linear_cross_entropy), so there are none to return."""
        z, h, routing = self.trunk(idx)
        if targets is None:
            return self.lm_head(h), None  # (B, T, V)
        cfg = self.config
        ntp = linear_cross_entropy(h.view(-1, h.size(-1)), self.lm_head.weight, targets.view(-1),
                                   max(1, CE_CHUNK_LOGITS // cfg.vocab_size))
        losses = {"ntp": ntp, "total": ntp}
        if cfg.nitp:
            if cfg.nitp_loss == "generic_cosine":  # the baseline regulariser: no target, no head
                aux = generic_cosine_loss(h)
            else:
                pred = self.nitp_head(h) if self.nitp_head is not None else h  # (B, T, C)
                aux = implicit_token_loss(pred, z, loss=cfg.nitp_loss, shift=cfg.nitp_shift,
                                          stop_grad=cfg.nitp_stop_grad)
            losses[cfg.aux_name] = aux
            losses["total"] = ntp + (cfg.nitp_weight if nitp_weight is None else nitp_weight) * aux
        if routing:
            # The mean over MoE layers, so that its scale (1 = perfect balance) does not depend on depth; it
            # enters the total, so loss scaling and accumulation apply to it as to any loss.
            losses["moe_aux"] = torch.stack([aux for aux, _ in routing]).mean()
            losses["expert_counts"] = torch.stack([counts for _, counts in routing]).detach()  # (MoE layers, E)
            losses["total"] = losses["total"] + cfg.moe_aux_weight * losses["moe_aux"]
        return None, losses

    def inference_state_dict(self):
        """Weights for inference: everything but nitp_head (spec: zero inference cost). They load
        into GPT(replace(config, nitp_weight=0)) and give identical logits."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("nitp_head.")}

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices (linear and embedding weights), none on norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_tokens=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; the context is cropped to block_size.
        temperature=0 picks the most likely token (greedy). n_tokens: the tokenizer's vocabulary;
        ids at or above it (the padding of vocab_size to a multiple of 64) are never produced."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :n_tokens].float()  # (B, V) or (B, n_tokens)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# ----------------------------------------------------------------------------------------------
# Training's cost: the FLOPs per token and the GPU peaks that MFU is measured against (the training knobs are
# TrainConfig in configurator.py).

def flops_per_token(config):
    """Training FLOPs per token, counted as 6 x parameters touched (spec, Appendix G): attention projections,
    the feed-forward (in an MoE layer the K routed plus the shared experts), the unembedding; not attention
    scores, norms or the router. The NITP head adds 72 d^2 (12 d^2 parameters) plus 18 d for the cosine; its
    target costs nothing (stop-gradient, same forward pass). Returns {"ntp", "nitp", "total", "nitp_share"}."""
    d, hd = config.n_embd, config.head_dim
    attention = d * (config.n_head + 2 * config.n_kv_head) * hd + config.n_head * hd * d
    dense_ffn = 3 * d * config.mlp_hidden
    moe_ffn = 3 * d * config.expert_hidden * (config.moe_top_k + config.n_shared_experts) if config.n_experts else 0
    layers = sum(attention + (moe_ffn if config.is_moe_layer(i) else dense_ffn) for i in range(config.n_layer))
    ntp = 6 * (layers + config.vocab_size * d)
    nitp = 72 * d * d + 18 * d if config.has_nitp_head else 0
    return {"ntp": ntp, "nitp": nitp, "total": ntp + nitp, "nitp_share": nitp / ntp}


# Dense bf16 tensor-core peaks (FLOP/s, datasheets) by device-name fragment, most specific first: MFU's denominator.
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "H100 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
                   "H800": 989e12, "B200": 2.25e15, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops_for(device_name, dtype):
    """MFU's denominator for a GPU name and a training dtype, or None: the table holds bf16/fp16 tensor-core peaks,
    which an fp32 run (TF32 at best) cannot reach, so fp32 gets no MFU unless --peak_flops names a peak."""
    if dtype == "float32":
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file, tensors and plain Python values only, so that loading runs no code.

class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message says which file and what to do."""


def save_checkpoint(path, state):
    """Write `state` to a temporary file, then atomically rename it over `path`: a kill at any
    moment leaves either the previous checkpoint or the new one, never a torn file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, required=("model", "model_config")):
    """The checkpoint dict at `path`, loaded with weights_only=True: a file that holds anything but
    tensors and plain values (a crafted pickle could run code on load) is refused, not executed. Memory-mapped:
    the processes of one node share the file's pages instead of each reading its own copy (FSDP resume)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise CheckpointError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                                  f"values, which could run code when loaded; only load checkpoints you trust "
                                  f"were written by this project") from None
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
                              f"; it is damaged or not a nitp checkpoint; restore it or train again") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a nitp checkpoint (missing {', '.join(missing)}); "
                              f"point to the ckpt.pt that train.py wrote")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Mixture of experts (spec, "Architecture": DeepSeek-V2 style, dropless top-k routing).
# Shape legend: T tokens (batch and sequence flattened), E routed experts, K experts per token,
# D model width, H expert hidden width, N = T*K token-expert pairs, I/O a matmul's in/out width.

class MoE(nn.Module):
    """Top-k routed experts plus shared experts, in place of a block's dense MLP. Dropless: every token
    reaches all K of its experts (no capacity factor, no dropped tokens).
    forward(x (B, T_seq, D)) -> (y (B, T_seq, D), (balance loss (), expert token counts (E,)))."""

    def __init__(self, config):
        super().__init__()
        self.n_experts, self.top_k, self.renorm = config.n_experts, config.moe_top_k, config.moe_renorm
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)  # weight (E, D)
        self.experts = Experts(config.n_experts, config.n_embd, config.expert_hidden)
        # Shared experts see every token, so they are one dense SwiGLU as wide as all of them together.
        n_shared = config.n_shared_experts * config.expert_hidden
        self.shared = SwiGLU(config.n_embd, n_shared) if n_shared else None

    def route(self, x):
        """(T, D) -> softmax scores (T, E), routing weights (T, K), chosen experts (T, K)."""
        logits = router_logits(x, self.router.weight)  # (T, E)
        scores = logits.softmax(dim=-1)
        weights, experts = scores.topk(self.top_k, dim=-1)  # (T, K) each
        if self.renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, weights, experts

    def forward(self, x):
        shape = x.shape  # (B, T_seq, D)
        x = x.reshape(-1, shape[-1])  # (T, D): batch and sequence flattened, T = B * T_seq tokens
        scores, weights, experts = self.route(x)
        counts = expert_counts(experts, self.n_experts)  # (E,)
        order = experts.reshape(-1).argsort(stable=True)  # (N,) token-expert pairs grouped by expert
        token = order // self.top_k  # (N,) the token of each sorted pair
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        # Each token's row is copied to its K experts (index_select) and the weighted outputs summed back (index_add_):
        # one pass over the rows each (backward too), half the time of x[token] / a gather on CPU. On CUDA they add
        # with atomics, so the last bits vary run to run; torch.use_deterministic_algorithms(True) fixes that, slower.
        rows = x.to(_matmul_dtype(x)).index_select(0, token)  # (N, D), cast before the T rows are copied K times
        out = self.experts(rows, offs, weights.reshape(-1).index_select(0, order))  # (N, D)
        y = out.new_zeros(x.size(0), out.size(1)).index_add_(0, token, out)  # (T, D)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape), (load_balance_loss(scores, counts, self.top_k), counts)


def router_logits(x, weight):
    """x (T, D) @ weight (E, D).T -> (T, E) in true fp32, even under bf16 autocast: rounding the logits would flip
    near-tied top-k choices. On CUDA the matmul runs in fp64, which has no TF32 mode (train.py turns TF32 on for
    fp32 matmuls, a global switch that a compiled graph cannot flip for one op); at T x D x E it costs little."""
    dtype = torch.float64 if x.device.type == "cuda" else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype)).float()


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights, one parameter per projection with a leading expert dim,
    applied to token rows already sorted by expert with grouped matmuls (no list of modules)."""

    def __init__(self, n_experts, n_embd, hidden):
        super().__init__()
        self.c_gate = nn.Parameter(torch.empty(n_experts, n_embd, hidden))  # (E, D, H)
        self.c_up = nn.Parameter(torch.empty(n_experts, n_embd, hidden))  # (E, D, H)
        self.c_proj = nn.Parameter(torch.empty(n_experts, hidden, n_embd))  # (E, H, D), residual output
        for w in self.parameters():  # GPT scales c_proj down for depth afterwards, as for the dense MLP
            nn.init.normal_(w, mean=0.0, std=0.02)

    def forward(self, x, offs, scale):
        """x: (N, D) rows sorted by expert; offs: (E,) int32 end row of each expert; scale: (N,) the
        routing weight of each row -> (N, D) expert outputs times their routing weights."""
        dtype = _matmul_dtype(x)
        x = x.to(dtype)
        # The weight scales the hidden state (H wide) rather than the output (D wide): the same
        # product, as the down projection is linear, over fewer numbers.
        up = expert_mm(x, self.c_up.to(dtype), offs) * scale.to(dtype).unsqueeze(-1)  # (N, H)
        h = F.silu(expert_mm(x, self.c_gate.to(dtype), offs)) * up  # (N, H)
        return expert_mm(h, self.c_proj.to(dtype), offs)  # (N, D)


def expert_counts(experts, n_experts):
    """Tokens routed to each expert, (T, K) ids -> (E,) int64. scatter_add_, unlike bincount, has an
    output size that does not depend on the data, so torch.compile keeps one graph."""
    flat = experts.reshape(-1)  # (N,)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balance_loss(scores, counts, top_k):
    """DeepSeek-V2's expert-level balance loss without its weight: sum_i f_i P_i, where
    f_i = E / (K T) * (tokens routed to i) and P_i = mean over tokens of the softmax score of i.
    1 at perfect balance; at most E / K, reached when K experts take every token and all the score.
    scores: (T, E) fp32; counts: (E,). Gradient reaches the router through P only (f is counted)."""
    T, E = scores.shape
    f = counts.to(scores.dtype) * (E / (top_k * T))  # (E,)
    return (f * scores.mean(dim=0)).sum()


def expert_balance_stats(counts):
    """Logging summary of losses["expert_counts"] (L, E) (or one layer's (E,)): imbalance = the worst layer's
    max / mean tokens per expert (1.0 = perfect); idle = how many (layer, expert) pairs got no token in this batch."""
    c = counts.detach().double().reshape(-1, counts.size(-1))  # (L, E)
    return dict(imbalance=(c.max(dim=1).values / c.mean(dim=1)).max().item(), idle=int((c == 0).sum().item()))


def _matmul_dtype(x):
    """The dtype matmuls run in here: autocast's if it is on (custom ops are not autocast)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


GROUPED_MM = hasattr(torch, "_grouped_mm")  # False forces the per-expert loop (tests, bench_moe.py)


def _grouped_mm_fits(a, b):
    """torch._grouped_mm takes fp32, bf16 and fp16 (float64 takes the loop); its fast CUDA kernel
    is bf16 on compute capability 9.x/10.x, other cases run torch's own per-group fallback. Row
    strides and (on CUDA) data pointers must be multiples of 16 bytes."""
    return (GROUPED_MM and a.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(n * a.element_size() % 16 == 0 for n in (a.size(-1), b.size(-1)))
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def _spans(offs):
    """Row ranges [start, end) of each expert's group from the cumulative counts offs (E,)."""
    ends = offs.tolist()
    return zip([0] + ends[:-1], ends)


# The expert matmuls are custom ops so that torch.compile keeps one graph: _grouped_mm's meta kernel
# accepts only bf16 (it mirrors the CUDA fast path) and the loop needs the offsets on the host.
@torch.library.custom_op("nitp::expert_mm", mutates_args=())
def expert_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert times their expert's matrix: (N, I) @ w[e] (E, I, O) -> (N, O),
    rows offs[e-1]:offs[e] (int32, offs[-1] = N) belonging to expert e."""
    if _grouped_mm_fits(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.size(0), w.size(-1))  # (N, O)
    for e, (start, end) in enumerate(_spans(offs)):  # a loop over experts, never over tokens
        torch.mm(x[start:end], w[e], out=out[start:end])
    return out


@torch.library.custom_op("nitp::expert_mm_wgrad", mutates_args=())
def expert_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Weight gradient of expert_mm: x[rows of e]^T @ grad[rows of e], (N, I), (N, O) -> (E, I, O).
    An expert without rows gets an exact zero, so DDP needs no find_unused_parameters."""
    if _grouped_mm_fits(x, grad):
        # Some CUDA kernels leave an empty group's output unwritten (pytorch#172439): zero it here.
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0  # (E,)
        return torch._grouped_mm(x.t(), grad, offs=offs).masked_fill(empty[:, None, None], 0)
    return torch.stack([x[start:end].t() @ grad[start:end] for start, end in _spans(offs)])  # (E, I, O)


expert_mm.register_fake(lambda x, w, offs: x.new_empty(x.size(0), w.size(-1)))  # shapes for torch.compile: (N, O)
expert_mm_wgrad.register_fake(lambda x, grad, offs: x.new_empty(offs.size(0), x.size(1), grad.size(1)))  # (E, I, O)


def _expert_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()  # the kernels reject broadcast (stride 0) gradients
    # The transposed view, made contiguous: _grouped_mm runs ~2x slower on the strided one on CPU.
    grad_x = expert_mm(grad, w.transpose(1, 2).contiguous(), offs) if ctx.needs_input_grad[0] else None
    grad_w = expert_mm_wgrad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


expert_mm.register_autograd(_expert_mm_backward,
                            setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))
