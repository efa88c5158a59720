"""
The NITP objective and the representation-geometry metrics, as pure functions.

NITP (Next Implicit Token Prediction, Zhang et al., ICML 2026) adds to next-token cross-entropy a
dense target in representation space: from the last hidden state h_t, a small projection head P
predicts z_{t+1}, the hidden state that the model's own shallow layer k gives the NEXT token:

    L = L_NTP + lambda * L_NITP,   L_NITP = mean_{t=1..T-1} [ 1 - cos(P(h_t), z_{t+1}) ]

The temporal shift (t -> t+1) and the stop-gradient on z both happen in one place:
`implicit_token_loss` below. model.py calls it; nothing else shifts or detaches.

Nothing here owns parameters or state, so every function can be checked against a plain
reference in test_nitp.py.
"""
import math

import torch
import torch.nn.functional as F

NITP_LOSSES = ("cosine", "mse", "smooth_l1", "generic_cosine")


def cosine_loss(pred, target):
    """Per-position 1 - cos(pred, target) over the last dim: (..., C) -> (...).

    Range [0, 2]: 0 when aligned, 1 when orthogonal, 2 when opposite; invariant to the scale of
    either argument. With u = pred/|pred|, v = target/|target|, s = cos, r = |pred|, its gradient
    w.r.t. pred is -(v - s u) / r (spec, Appendix A): it only rotates pred, never stretches it,
    which is why the paper found it stable where MSE diverged.
    Computed in fp32 so that bf16 activations do not quantise small angles away.
    """
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)


def mse_loss(pred, target):
    """Per-position mean squared error over the last dim: (..., C) -> (...). The paper's MSE
    ablation (it diverged at scale: the target's norm is not controlled)."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def smooth_l1_loss(pred, target):
    """Per-position smooth-L1 (Huber, beta 1) over the last dim: (..., C) -> (...). Paper ablation:
    close to cosine but less stable."""
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(dim=-1)


PER_POSITION = {"cosine": cosine_loss, "mse": mse_loss, "smooth_l1": smooth_l1_loss}


def implicit_token_loss(pred, target, loss="cosine", shift=1, stop_grad=True):
    """The NITP loss, the one place where the shift and the stop-gradient happen.

    pred:   (B, T, C) the projection head's output P(h_t) at every position t.
    target: (B, T, C) the layer-k hidden states z_t at every position.
    Position t of pred is compared with position t+shift of target; the last `shift` positions of
    pred have no partner inside the sequence and are dropped (spec, "Definitions"). The target is
    detached: without the stop-gradient the shallow layers co-adapt to the head (paper ablation).
    shift=0 and stop_grad=False exist only for the paper's ablations.
    Returns the mean over the B * (T - shift) pairs, a scalar fp32 tensor.
    """
    assert pred.shape == target.shape and pred.dim() == 3, (pred.shape, target.shape)
    assert pred.size(1) > shift, f"NITP needs sequences longer than the shift ({shift})"
    if stop_grad:
        target = target.detach()
    T = pred.size(1)
    z_next = target[:, shift:, :]  # (B, T-shift, C) z_{t+shift}
    p_now = pred[:, :T - shift, :]  # (B, T-shift, C) P(h_t)
    return PER_POSITION[loss](p_now, z_next).mean()  # (B, T-shift) -> scalar


def generic_cosine_loss(states):
    """The paper's "generic cosine" baseline regulariser: the mean pairwise cosine between the
    last states of distinct tokens of each sequence, states (B, T, C) -> scalar. There is no
    prediction target: it pushes states apart without saying where they should go (the paper
    found no gain over NTP). Same O(T C) identity as mean_pairwise_cosine below."""
    u = F.normalize(states.float(), dim=-1, eps=1e-12)  # (B, T, C)
    T = u.size(1)
    pair_sum = u.sum(dim=1).pow(2).sum(dim=-1) - u.pow(2).sum(dim=(1, 2))  # (B,) sum over i != j
    return (pair_sum / (T * (T - 1))).mean()


# ----------------------------------------------------------------------------------------------
# Representation geometry (spec, Appendix D). Inputs are (n, d) matrices of token states.

def effective_rank(states):
    """erank(H) = exp(-sum_i p_i log p_i), p_i = lambda_i / sum_j lambda_j, with lambda_i the
    eigenvalues of the covariance of the mean-centred rows of H (n, d).

    Ranges from 1 (all spread along one direction) to min(n - 1, d) (spread evenly). States that
    are all identical have no spread at all; we return 0.0 for them rather than NaN.
    Computed in float64: the small eigenvalues decide the entropy.
    """
    raw = states.detach().double()
    h = raw - raw.mean(dim=0, keepdim=True)  # (n, d)
    cov = h.T @ h / max(h.size(0) - 1, 1)  # (d, d)
    lam = torch.linalg.eigvalsh(cov).clamp(min=0.0)  # (d,), tiny negatives are round-off
    total = lam.sum()
    if total <= 1e-12 * raw.pow(2).sum(dim=1).mean():  # spread below round-off of the centring
        return 0.0
    p = lam / total
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum()  # 0 log 0 = 0
    return math.exp(entropy.item())


def mean_pairwise_cosine(states):
    """Mean cosine similarity over all pairs (i, j), i != j, of the rows of H (n, d).

    The spec samples random pairs; this is the exact mean over all of them, which sampling only
    estimates. With rows normalised to u_i, sum_{i != j} u_i.u_j = |sum_i u_i|^2 - sum_i |u_i|^2,
    so it costs O(n d) instead of O(n^2 d). An all-zero row has no direction and counts as 0.
    """
    h = states.detach().double()
    n = h.size(0)
    assert n >= 2, "mean pairwise cosine needs at least two states"
    u = F.normalize(h, dim=-1, eps=1e-12)  # (n, d)
    total = u.sum(dim=0).pow(2).sum() - u.pow(2).sum()
    return (total / (n * (n - 1))).item()
