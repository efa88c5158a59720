"""
GPT with the NITP projection head: configuration, blocks and the model, in one file.

A modern decoder like the paper's models (spec, "Architecture"): RMSNorm, rotary position
embeddings, grouped-query attention through F.scaled_dot_product_attention, SwiGLU MLPs, no
biases. Module names follow nanoGPT / Hugging Face (transformer.wte, transformer.h,
transformer.ln_f, lm_head) plus `nitp_head`, the training-only projection head.

    logits, losses = model(idx, targets)   # one forward pass
    losses = {"total": back-propagated, "ntp": cross-entropy, "nitp": implicit-token loss}

Import it; the scripts are train.py (training) and sample.py (generation and head-free export).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nitp import NITP_LOSSES, generic_cosine_loss, implicit_token_loss


@dataclass
class GPTConfig:
    # The defaults are a small model that trains on a 2-core CPU in minutes; config/ has larger ones.
    block_size: int = 128  # context length in tokens (paper: 8192)
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64; train.py takes it from meta.json
    n_layer: int = 6  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 = n_head (plain MHA). Paper: 8 q / 4 kv
    n_embd: int = 128  # model width d
    mlp_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 d rounded up to a multiple of 64 (~8 d^2 params)
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share wte and lm_head weights (the paper's models are untied)
    dropout: float = 0.0  # dropout on attention and residual outputs; 0 for pre-training, as the paper
    # --- NITP (spec, "Defaults") ---
    nitp_layer: int = -1  # k: target = residual stream after block k (0 = embedding output); -1 = ~20% of depth (paper: 4 of 17)
    nitp_weight: float = 1.0  # lambda; 0 = the NTP baseline: no head is built, nothing extra computed (paper: 1.0)
    nitp_loss: str = "cosine"  # "cosine" (paper); ablations: "mse" (diverged), "smooth_l1" (less stable), "generic_cosine" (baseline regulariser: no target, no head)
    # --- the paper's ablation switches; the defaults are the method ---
    nitp_shift: int = 1  # temporal shift: 1 = predict z_{t+1} (paper); 0 = z_t, same position (hurts badly)
    nitp_stop_grad: bool = True  # stop-gradient on the target (paper); False lets layers 1..k co-adapt (worse than NTP)
    nitp_proj: str = "swiglu"  # projection head: "swiglu" d -> 4d -> d (paper) or "none" (compare h_t itself; worse)

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.mlp_hidden == 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.nitp_layer == -1:
            self.nitp_layer = max(1, round(0.2 * self.n_layer)) if self.n_layer > 1 else 0
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if not 0 <= self.nitp_layer < self.n_layer:
            raise ValueError(
                f"nitp_layer={self.nitp_layer} is out of range: it must be in [0, n_layer-1] = [0, {self.n_layer - 1}] "
                f"(0 = embedding output, k = after block k; the paper uses ~20% of depth, e.g. {max(1, round(0.2 * self.n_layer))})")
        if self.nitp_weight < 0:
            raise ValueError(f"nitp_weight={self.nitp_weight} must be >= 0 (0 = plain next-token baseline)")
        if self.nitp_loss not in NITP_LOSSES:
            raise ValueError(f"nitp_loss={self.nitp_loss!r} must be one of {NITP_LOSSES}")
        if self.nitp_shift not in (0, 1):
            raise ValueError(f"nitp_shift={self.nitp_shift} must be 1 (next token, paper) or 0 (same position)")
        if self.nitp_proj not in ("swiglu", "none"):
            raise ValueError(f"nitp_proj={self.nitp_proj!r} must be 'swiglu' (paper) or 'none'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def nitp(self):
        return self.nitp_weight > 0

    @property
    def has_nitp_head(self):
        return self.nitp and self.nitp_proj == "swiglu" and self.nitp_loss != "generic_cosine"


def rotary_tables(head_dim, seq_len, theta):
    """cos and sin tables, each (seq_len, head_dim/2), for rotating pairs of channels."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (first half, second half) of x (B, H, T, hd) by position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=False)  # fused q, k, v: one matmul
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, (H + 2 Hkv) hd)
        q, k, v = qkv.split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                             self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H hd)
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
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.mlp_hidden)
        self.dropout = config.dropout

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + F.dropout(self.mlp(self.ln_2(x)), p=self.dropout, training=self.training)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        cos, sin = rotary_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived, so kept out of checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # Training only: predicts the next token's layer-k state from h_t. Not built for the baseline.
        # Built after the trunk is initialised, so that NTP and NITP runs with one seed start from
        # the same trunk weights.
        self.nitp_head = SwiGLU(config.n_embd, 4 * config.n_embd) if config.has_nitp_head else None
        if self.nitp_head is not None:
            self.nitp_head.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, include_head=True):
        n = sum(p.numel() for p in self.parameters())
        if not include_head and self.nitp_head is not None:
            n -= sum(p.numel() for p in self.nitp_head.parameters())
        return n

    def trunk(self, idx):
        """idx (B, T) -> (z, h): the layer-k states z (B, T, C), the implicit-token source, and the
        final states h (B, T, C) after ln_f, what the unembedding sees. Only these two are kept."""
        B, T = idx.shape
        cfg = self.config
        assert T <= cfg.block_size, f"sequence of {T} tokens exceeds block_size={cfg.block_size}"
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.transformer.wte(idx)  # (B, T, C), layer 0
        z = x if cfg.nitp_layer == 0 else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin)
            if i + 1 == cfg.nitp_layer:
                z = x
        return z, self.transformer.ln_f(x)

    def forward(self, idx, targets=None, nitp_weight=None):
        """idx, targets: (B, T) token ids; targets -1 are ignored by the cross-entropy.
        nitp_weight: optional tensor overriding config.nitp_weight (a schedule such as a late start
        changes its value without recompiling). Returns logits (B, T, V) and the loss dict (None
        without targets): total (back-propagated), ntp, and nitp (unweighted) when NITP is on."""
        z, h = self.trunk(idx)
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits, None
        ntp = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        losses = {"ntp": ntp, "total": ntp}
        if self.config.nitp:
            losses["nitp"] = self.nitp_term(h, z)
            weight = self.config.nitp_weight if nitp_weight is None else nitp_weight
            losses["total"] = ntp + weight * losses["nitp"]
        return logits, losses

    def nitp_term(self, h, z):
        """The unweighted auxiliary loss: NITP, or one of the paper's ablations of it."""
        cfg = self.config
        if cfg.nitp_loss == "generic_cosine":
            return generic_cosine_loss(h)
        pred = self.nitp_head(h) if self.nitp_head is not None else h  # (B, T, C)
        return implicit_token_loss(pred, z, loss=cfg.nitp_loss, shift=cfg.nitp_shift, stop_grad=cfg.nitp_stop_grad)

    def inference_state_dict(self):
        """Weights for inference: everything but nitp_head (spec: zero inference cost). They load
        into GPT(replace(config, nitp_weight=0)) and give identical logits."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("nitp_head.")}

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices (linear and embedding weights), none on norm gains."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        assert len(decay) + len(no_decay) == len(params), "optimizer groups must cover every parameter"
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; the context is cropped to block_size.
        temperature=0 picks the most likely token (greedy)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()  # (B, V)
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


def flops_per_token(config):
    """Training FLOPs per token, counted as 6 x parameters touched (spec, Appendix G): attention
    projections, the feed-forward, the unembedding; attention scores and norms are not counted.
    The NITP head adds 72 d^2 (12 d^2 parameters) plus 18 d for the cosine; its target costs
    nothing (stop-gradient, same forward pass). Returns {"ntp", "nitp", "total", "nitp_share"}."""
    d, hd = config.n_embd, config.head_dim
    attention = d * (config.n_head + 2 * config.n_kv_head) * hd + config.n_head * hd * d
    feed_forward = 3 * d * config.mlp_hidden
    ntp = 6 * (config.n_layer * (attention + feed_forward) + config.vocab_size * d)
    nitp = 72 * d * d + 18 * d if config.has_nitp_head else 0
    return {"ntp": ntp, "nitp": nitp, "total": ntp + nitp, "nitp_share": nitp / ntp}
