"""MCC losses and the contrast's building blocks (Wu et al., 2023; package docstring of
:mod:`pipeline.methods.mcc` for the paper/code choices): random key masks (Eq. 1-3), positive
views (Eq. 8-9), the InfoNCE contrast (Eq. 10; official ``model/losses.py: MCCLoss`` form and
the paper's), L_aff over the final patch tokens (Eq. 12) and the balanced segmentation loss of
the ToCo/MCC code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- masks (Eq. 1-3)


def draw_key_masks(n: int, h: int, w: int, ratio: float, scale: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random key masks of MCC (Sec. III-C, "Random Masking with Keys / with Scales").

    Each cell of a grid ``ceil(h/scale) x ceil(w/scale)`` is masked independently with
    probability ``ratio`` (Bernoulli), then upsampled by ``scale`` (nearest) so a masked cell
    becomes a contiguous ``scale x scale`` square of tokens, and cropped to ``h x w``.

    Args:
        n: number of masks.
        h, w: token grid.
        ratio: masking probability p in [0, 1] (official ``--mask_rate`` 0.95, the
            plug-in's default; paper 0.75).
        scale: cell side in tokens (paper 4).
        generator: torch Generator on CPU (determinism).
    Returns:
        ``(n, h, w)`` bool, True = masked key.
    Raises:
        ValueError: ``ratio`` outside [0, 1] or ``scale < 1``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"methods.mcc mask_ratio must be in [0, 1], got {ratio}")
    if scale < 1:
        raise ValueError(f"methods.mcc mask_scale must be >= 1, got {scale}")
    gh, gw = math.ceil(h / scale), math.ceil(w / scale)
    coarse = torch.rand((n, gh, gw), generator=generator) < ratio
    full = coarse.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return full[:, :h, :w].contiguous()


def key_mask_bias(masks: torch.Tensor, npre: int = 1) -> torch.Tensor:
    """Additive attention bias M' of Eq. 3 for key masks.

    Args:
        masks: ``(n, h, w)`` bool, True = masked key.
        npre: prefix tokens (class token, registers) placed before the patch tokens; they are
            never masked.
    Returns:
        ``(n, 1, 1, npre + h*w)`` float32: 0 for kept keys, ``-inf`` for masked ones. Added to
        the ``(n, heads, N, N)`` attention logits it drops whole key columns for every query.
    """
    flat = masks.reshape(masks.shape[0], -1)
    bias = torch.zeros(flat.shape[0], npre + flat.shape[1], dtype=torch.float32, device=masks.device)
    bias[:, npre:][flat] = float("-inf")
    return bias[:, None, None, :]


# ----------------------------------------------------------------- positives (Eq. 8, 9)


def discretise_levels(cam_max: torch.Tensor, bg: float, fg: float) -> torch.Tensor:
    """Eq. 9: token-level label ``Y'`` from ``max_c F_aux`` (values in [0, 1]).

    Returns:
        same shape, int64: 2 where ``>= fg``, 0 where ``<= bg``, 1 otherwise.
    """
    out = torch.ones_like(cam_max, dtype=torch.long)
    out[cam_max >= fg] = 2
    out[cam_max <= bg] = 0
    return out


def positive_flags(levels: torch.Tensor, masks: torch.Tensor, mu: float) -> torch.Tensor:
    """Eq. 8: a masked view is positive iff ``Σ Y' (1 - M) > μ Σ (1 - M)``.

    (The paper's ``1/N`` on both sides cancels.) A view with every token masked is negative.

    Args:
        levels: ``(B, h, w)`` int, Eq. 9 levels in {0, 1, 2}.
        masks: ``(B, L, h, w)`` bool, True = masked.
        mu: threshold μ (paper 0.2).
    Returns:
        ``(B, L)`` bool.
    """
    keep = (~masks).float()
    lhs = (levels[:, None].float() * keep).flatten(2).sum(-1)
    rhs = mu * keep.flatten(2).sum(-1)
    return lhs > rhs


# ------------------------------------------------------------------------ InfoNCE (Eq. 10)


def info_nce(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, tau: float,
             eps: float = 1e-4) -> torch.Tensor:
    """Eq. 10, averaged over the images that have at least one positive.

    ``L_b = -1/N+ Σ_{k+} log( e^{q k+/τ} / (e^{q k+/τ} + Σ_{k-} e^{q k-/τ} + ε) )``

    Args:
        q: ``(B, d)`` projected global class tokens.
        k: ``(B, L, d)`` projected local class tokens.
        pos: ``(B, L)`` bool, positive flags (Eq. 8); the others are negatives.
        tau: temperature τ (paper 0.5).
        eps: ε of Eq. 10.
    Returns:
        scalar; 0 (with a graph) when no image has a positive.
    """
    logits = torch.einsum("bd,bld->bl", q, k) / tau            # (B, L)
    e = logits.exp()
    neg = (e * (~pos).float()).sum(1, keepdim=True)             # (B, 1)
    per = -(logits - torch.log(e + neg + eps))                  # (B, L) -log(e+/(e+ + neg + eps))
    posf = pos.float()
    n_pos = posf.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return (logits * 0).sum()
    per_img = (per * posf).sum(1)[has] / n_pos[has]
    return per_img.mean()


INFO_NCE_FORMS = ("code", "paper")


def info_nce_code(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, tau: float,
                  eps: float = 1e-4) -> torch.Tensor:
    """The contrast as the official ``model/losses.py: MCCLoss.forward`` computes it.

    With ``e_{g,j} = exp(q_g · k_j / τ)`` (teacher view ``g``, student view ``j``) and, per
    image and teacher view, ``S_g = Σ_{j negative} e_{g,j}``::

        L_b = 1/(G (P_b + 1e-4)) Σ_g [ Σ_{j positive} -log(e_{g,j} / (e_{g,j} + S_g + ε))
                                        - log(1 / (1 + S_g + ε)) ]
        L   = 1/B Σ_b L_b

    The extra ``-log(1/(1 + S_g + ε))`` is added ONCE per image and teacher view (the
    ``for ... else`` of the official loop; ``P_b`` still counts only the positives). Every
    image counts in the mean, also one without positives — then ``L_b`` is the extra term
    over ``G·1e-4`` (large), which the official code never meets because the global views
    are always positive (pass them in ``k`` with ``pos`` True: ``global_positive``).

    Args:
        q: ``(B, G, d)`` float, teacher projections of the G global views (official G = 2;
            here 1), or ``(B, d)`` for G = 1. Raw (not re-normalised) in the official code.
        k: ``(B, L, d)`` float, student projections (official: the G global views first,
            then the local views).
        pos: ``(B, L)`` bool, positive flags; the others are negatives.
        tau: temperature τ > 0 (official ``--temp`` 0.5).
        eps: ε of the official code, 1e-4 (both in the log terms and next to ``P_b``).
    Returns:
        scalar float tensor >= 0.
    Raises:
        ValueError: shapes do not match or ``tau <= 0``.
    """
    if q.dim() == 2:
        q = q[:, None]
    if tau <= 0:
        raise ValueError(f"methods.mcc tau must be > 0, got {tau}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or pos.shape != k.shape[:2]:
        raise ValueError(f"info_nce_code: q {tuple(q.shape)}, k {tuple(k.shape)}, pos {tuple(pos.shape)}")
    G = q.shape[1]
    logits = torch.einsum("bgd,bld->bgl", q, k) / tau              # (B, G, L)
    e = logits.exp()
    posf = pos.to(e.dtype)[:, None]                                 # (B, 1, L)
    neg = (e * (1 - posf)).sum(-1, keepdim=True)                    # (B, G, 1) S_g
    per = -(logits - torch.log(e + neg + eps))                      # -log(e / (e + S + eps))
    extra = torch.log(1 + neg[..., 0] + eps)                        # (B, G) -log(1/(1+S+eps))
    per_img = ((per * posf).sum(-1) + extra).sum(-1) / G / (pos.to(e.dtype).sum(-1) + 1e-4)
    return per_img.mean()



# ------------------------------------------------------------------------ L_aff (Eq. 12)


AFF_LOSS_FORMS = ("code", "paper")


def affinity_loss(tokens: torch.Tensor, aff: torch.Tensor, abs_cos: bool = True,
                  form: str = "code") -> torch.Tensor:
    """L_aff over final patch tokens (Eq. 12), with the official ``|cos|`` by default.

    Args:
        tokens: ``(B, n, D)`` final patch tokens ``T^(L)``.
        aff: ``(B, n, n)`` pair labels: 1 = same label (positive), 0 = different (negative),
            any other value (255) = ignored.
        abs_cos: use ``|cos|`` (default; official ``model/losses.py: get_masked_aff_loss``,
            ``torch.abs(cos_sim)``) instead of ``cos`` (paper Eq. 12).
        form: ``code`` (default; official ``get_masked_aff_loss``):
            ``0.5 (1 - Σ_pos c / (N+ + 1)) + 0.5 Σ_neg c / (N- + 1)``; ``paper`` (Eq. 12):
            ``Σ_pos (1 - c) / N+ + Σ_neg c / N-`` (a term is 0 when it has no pairs). Sums
            and counts run over the whole batch in both.
    Returns:
        scalar, ``c = |cos|`` (or ``cos``).
    Raises:
        ValueError: unknown ``form``.
    """
    if form not in AFF_LOSS_FORMS:
        raise ValueError(f"methods.mcc aff_loss must be one of {AFF_LOSS_FORMS}, got {form!r}")
    t = F.normalize(tokens, dim=-1, eps=1e-8)
    cos = t @ t.transpose(1, 2)
    if abs_cos:
        cos = cos.abs()
    posm, negm = (aff == 1).float(), (aff == 0).float()
    if form == "code":
        return (0.5 * (1 - (cos * posm).sum() / (posm.sum() + 1))
                + 0.5 * (cos * negm).sum() / (negm.sum() + 1))
    lp = ((1 - cos) * posm).sum() / posm.sum().clamp_min(1)
    ln = (cos * negm).sum() / negm.sum().clamp_min(1)
    return lp + ln


# ------------------------------------------------------------------------- L_seg (code)


def seg_loss_balanced(logits: torch.Tensor, label: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """Segmentation loss of ToCo/MCC's code: mean of the cross-entropy over background pixels
    and the cross-entropy over foreground pixels (each ignoring 255), so the usually larger
    background does not dominate. ``logits (B, C+1, H, W)``, ``label (B, H, W)`` int64."""
    bg = label.clone()
    bg[label != 0] = ignore
    fg = label.clone()
    fg[label == 0] = ignore
    terms = []
    for lab in (bg, fg):
        if bool((lab != ignore).any()):
            terms.append(F.cross_entropy(logits, lab, ignore_index=ignore))
        else:
            terms.append(logits.sum() * 0)
    return 0.5 * (terms[0] + terms[1])
