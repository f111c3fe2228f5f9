"""ACR: All-pairs Consistency Regularization (Sun et al., CVPR 2023 / ICCV-W 2023,
``shared/papers/acr-all-pairs-consistency-regularization.txt``; official code
OpenNLPLab/ACR_WSSS: ``train_acr.py``, ``infer_cam.py``, ``DPT/ACR.py``).

Policy: where the paper and the official code differ, the **official code is the default**
(it produced the published numbers) and the paper's literal reading is an option. Every
setting, with its paper value, official value and option, is tabulated in
``docs/methods/acr.md``.

Training (paper Sec. 3.2, Eq. 1-6; official ``train_acr.py``). A Siamese ViT sees a batch
and a transformed view; for the chosen blocks the head-averaged post-softmax attention ``A``
of view 1 is compared with the token-reordered attention ``f^{-1}(A')`` of view 2:

* Eq. 1  ``L_act = | A[0,1:] - f^{-1}(A'[0,1:]) |``  (class-to-patch attention row)
* Eq. 2  ``L_aff = | A[1:,1:] - f^{-1}(A'[1:,1:]) |`` (patch-to-patch attention)
* Eq. 3-5 flips are token permutations, rotations a transpose (commutation matrix) plus a
  flip; resize is undone by resizing the token grids.
* Eq. 6  ``L = L_cls + alpha L_act + beta L_aff``.

=================  ==========================================  ===============================
option             official code (DEFAULT)                     paper / other choices
=================  ==========================================  ===============================
``transforms``     ``[hflip]`` (``RandomHorizontalFlip(p=1)``  ``[hflip, rot90, rescale]``
                   of the batch, ``train_acr.py``)             (paper: "resize, flip, rotation")
``loss_layers``    ``all`` (``forward_cls`` stacks all 12      list of block indices
                   blocks, ``DPT/ACR.py``)
``reduction``      ``mean``: ``F.l1_loss(..., 'mean')``, the   ``sum`` (literal matrix norm
                   element mean over batch x blocks x rows x   per image), ``row`` (sum over
                   keys                                        keys, mean over rows)
``alpha/beta``     125 / 125 (``train_acr.sh --alpha 125``,     paper: unstated
                   one ``args.alpha`` for both terms)
``cls_loss``       ``sum``: ``L_cls(view1) + L_cls(view2)``    ``mean``: half of that
``cls_token_norm`` ``before``: the class token of the last     ``after``: timm's head on the
                   block's output, taken by a forward hook     class token after the final
                   BEFORE the final LayerNorm, into the linear LayerNorm (the paper says
                   head (``DPT/ACR.py: forward_cls``,          only "class token")
                   ``activations["4"]``)
=================  ==========================================  ===============================

Seeds (paper Sec. 3.3, Eq. 7-8; official ``infer_cam.py --start_layer 10 --getam_func grad
--aff True`` with ``DPT/ACR.py: getam``):

===================  ========================================  ==============================
option               official code (DEFAULT)                   paper literal
===================  ========================================  ==============================
``seed_layers``      ``[-2, -1]`` (``start_layer 10`` of 12)   same (paper Fig. 8: last two)
``grad_head_reduce`` ``relu_then_mean``: ReLU of each head's   ``mean_then_relu``: head mean
                     gradient, then mean over heads            (ReLU later, see ``relu``)
``layer_reduce``     ``sum`` over the seed layers              ``mean`` (``1/l sum``, Eq. 7)
``relu``             ``after_reduce``: ReLU of the reduced map ``per_layer`` (also before)
``eq8_form``         ``code``: ``M = A M*`` (matrix x column   ``paper``: ``M = M* A`` (row x
                     vector, ``torch.matmul(patch_aff,         matrix), ``A`` = mean of the
                     cam.unsqueeze(2))``), ``A`` = SUM over    head-averaged ``A[1:,1:]`` over
                     ``affinity_layers`` (default ALL blocks)  the SAME seed layers
                     of the head-averaged ``A[1:,1:]``
===================  ========================================  ==============================

(``relu: after_mean`` is accepted as the old name of ``after_reduce``; the removed option
``affinity_transpose`` raises an error naming ``eq8_form``.)

The seed export around these maps (scale 1 + horizontal flip, flip back, sum, bilinear
``align_corners=True``, per-class min-max with eps 1e-6, the official input resized to a
square ``crop``) is :func:`pipeline.steps.seeds.multiscale_maps` with ``methods.acr.export_seeds``
/ ``profiles.<d>.export_seeds.by_method.acr`` in params.yaml.

Resized views (option ``rescale``): the grid of ``A'`` is bilinearly resized and multiplied
by ``n'/n`` along key dimensions so each row keeps its attention mass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.engine.runtime import eval_mode
from pipeline.models.vit import attentions, num_prefix_tokens, patch_grid, token_stride
from pipeline.methods.base import Method, ViTClassifier, multilabel_loss
from pipeline.methods.common.tokens import inverse_token_permutation, transform_image


def invert_class_attention(a: torch.Tensor, t: str, grid: tuple[int, int],
                           view_grid: tuple[int, int]) -> torch.Tensor:
    """``f^{-1}`` of class-to-patch attention rows (Eq. 1, 5).

    Args:
        a: ``(B, n')`` attention of the view's class token to its patch tokens.
        t: a ``SPATIAL_TRANSFORMS`` name or ``"rescale"``.
        grid: token grid ``(h, w)`` of the original view; ``view_grid`` that of the view.
    Returns:
        ``(B, h*w)`` in the original token order.
    """
    h, w = grid
    if t == "rescale":
        hv, wv = view_grid
        r = F.interpolate(a.reshape(-1, 1, hv, wv), size=(h, w), mode="bilinear", align_corners=False)
        return r.reshape(a.shape[0], h * w) * (hv * wv) / (h * w)
    return a[:, inverse_token_permutation(h, w, t)]


def invert_patch_attention(A: torch.Tensor, t: str, grid: tuple[int, int],
                           view_grid: tuple[int, int]) -> torch.Tensor:
    """``f^{-1}`` of patch-to-patch attention (Eq. 2, 5): ``P^T A' P`` for permutations.

    Args:
        A: ``(B, n', n')`` (rows: queries, columns: keys).
    Returns:
        ``(B, h*w, h*w)`` in the original token order.
    """
    h, w = grid
    B = A.shape[0]
    if t == "rescale":
        hv, wv = view_grid
        # keys: (B*n', 1, hv, wv) -> (B, n', h*w), mass preserving
        k = F.interpolate(A.reshape(B * hv * wv, 1, hv, wv), size=(h, w), mode="bilinear",
                          align_corners=False).reshape(B, hv * wv, h * w) * (hv * wv) / (h * w)
        # queries: (B, h*w(keys), hv, wv) -> (B, h*w, h, w)
        q = F.interpolate(k.transpose(1, 2).reshape(B, h * w, hv, wv), size=(h, w),
                          mode="bilinear", align_corners=False)
        return q.reshape(B, h * w, h * w).transpose(1, 2)
    inv = inverse_token_permutation(h, w, t)
    return A[:, inv][:, :, inv]


#: official-code defaults of ``methods.acr.train_cls`` (OpenNLPLab/ACR_WSSS ``train_acr.py`` /
#: ``train_acr.sh``); params.yaml states the same values explicitly
TRAIN_DEFAULTS = {"transforms": ["hflip"], "loss_layers": "all", "reduction": "mean",
                  "alpha": 125.0, "beta": 125.0, "cls_loss": "sum", "rescale_range": [0.5, 1.5],
                  "cls_token_norm": "before"}
#: official-code defaults of ``methods.acr.export_seeds`` (``infer_cam.py --start_layer 10
#: --getam_func grad --aff True``, ``DPT/ACR.py: getam``)
SEED_DEFAULTS = {"seed_layers": [-2, -1], "grad_head_reduce": "relu_then_mean",
                 "layer_reduce": "sum", "relu": "after_reduce", "eq8_form": "code",
                 "affinity_layers": "all"}


def _l1(d: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``|d|`` of shape ``(B, rows, n)`` per the ACR ``reduction`` option.

    ``mean`` (official default): element mean, ``F.l1_loss(reduction='mean')`` of
    ``train_acr.py``; ``row``: sum over keys, mean over rows and batch; ``sum``: the literal
    matrix L1 norm of Eq. 1/2 per image, mean over the batch. Returns a 0-dim tensor >= 0.

    Raises:
        ValueError: unknown ``reduction``.
    """
    a = d.abs()
    if reduction == "row":
        return a.sum(-1).mean()
    if reduction == "sum":
        return a.sum((-2, -1)).mean()
    if reduction == "mean":
        return a.mean()
    raise ValueError(f"methods.acr reduction must be mean, row or sum, got {reduction!r}")


def select_layers(n_blocks: int, layers) -> list[int]:
    """``"all"`` or a list of block indices (negative allowed) -> sorted positive indices.

    Raises:
        ValueError: an empty list.
    """
    if layers in (None, "all"):
        return list(range(n_blocks))
    out = sorted({int(i) % n_blocks for i in layers})
    if not out:
        raise ValueError("methods.acr layers must not be empty")
    return out


def consistency_losses(attn1: list[torch.Tensor], attn2: list[torch.Tensor], t: str,
                       grid: tuple[int, int], view_grid: tuple[int, int], npre: int = 1,
                       reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_act, L_aff)`` of Eq. 1-2, averaged over the given blocks.

    Per block the attention is averaged over heads (official ``forward_cls``:
    ``torch.mean(attn, dim=1)``); ``L_act`` compares the class-to-patch row ``A[:, 0, 1:]``,
    ``L_aff`` the patch-to-patch block ``A[:, 1:, 1:]`` with the inverse-transformed view-2
    attention. With ``reduction="mean"`` (default) the result equals the official
    ``F.l1_loss(attn1[:, :, 0, 1:], f^{-1}(attn2)[...], reduction='mean')`` over the stacked
    ``(B, L, ...)`` tensors, because every block has the same number of elements.

    Args:
        attn1, attn2: per block, ``(B, heads, N, N)`` float attention (rows sum to 1) of the
            original and of the transformed view (``N = npre + n``).
        t: transform name (``SPATIAL_TRANSFORMS`` or ``"rescale"``).
        grid, view_grid: token grids ``(h, w)`` of the two views.
        npre: prefix tokens (class token, registers) before the patches.
        reduction: see :func:`_l1`.
    Returns:
        two 0-dim tensors >= 0 (in the autograd graph).
    """
    l_act, l_aff = [], []
    for A1, A2 in zip(attn1, attn2):
        a1, a2 = A1.mean(1), A2.mean(1)
        c1 = a1[:, 0, npre:]
        c2 = invert_class_attention(a2[:, 0, npre:], t, grid, view_grid)
        p1 = a1[:, npre:, npre:]
        p2 = invert_patch_attention(a2[:, npre:, npre:], t, grid, view_grid)
        l_act.append(_l1((c1 - c2).unsqueeze(1), reduction))
        l_aff.append(_l1(p1 - p2, reduction))
    return torch.stack(l_act).mean(), torch.stack(l_aff).mean()


class ACR(Method):
    name = "acr"
    seed_keys = ("cams", "cams_star")   # ACR (Eq. 8) is evaluated; ACR* (Eq. 7) kept too
    affinity_key = "cams_star"          # the paper trains PSA on ACR* ...
    refine_key = "cams"                 # ... and refines the ACR seeds with it (Sec. 4.2.2)

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        """:class:`ViTClassifier` with timm's linear head (with bias) on the class token.

        ``cls_token_norm`` (``methods.acr.train_cls``): ``before`` (official default) feeds
        the head the class token of the last block's output before the final LayerNorm, as
        the official ``forward_cls`` does (a forward hook on the last block,
        ``DPT/ACR.py``, ``DPT/vit.py: get_activation``): the ViT's final ``norm`` is replaced
        by an identity, whose output nothing else of ACR reads (the seeds use the logits and
        the attention). ``after``: timm's head after the final norm.

        Raises:
            ValueError: ``cls_token_norm`` is neither ``before`` nor ``after``.
        """
        where = p.get("cls_token_norm", TRAIN_DEFAULTS["cls_token_norm"])
        if where not in ("before", "after"):
            raise ValueError(f"methods.acr.train_cls.cls_token_norm must be before or after, "
                             f"got {where!r}")
        model = ViTClassifier({**p, "head": "cls_token"}, num_classes)
        if where == "before":
            model.vit.norm = nn.Identity()
        return model

    def loss(self, model, x, y, p, generator):
        """Eq. 6 on a batch and one randomly drawn transform (shared by the batch).

        Official default (``train_acr.py``): view 2 = the horizontally flipped batch;
        ``loss = L_cls(x) + L_cls(x2) + 125 L_act + 125 L_aff`` with element-mean L1 over all
        blocks' head-averaged attention. Options and their defaults: :data:`TRAIN_DEFAULTS`.

        Args:
            x: ``(B, 3, H, W)`` float32 normalised images; y: ``(B, K)`` multi-hot float.
            p: ``train_cls`` params (``transforms``, ``rescale_range``, ``loss_layers``,
                ``reduction``, ``alpha``, ``beta``, ``cls_loss``).
            generator: torch Generator drawing the transform (and the rescale factor).
        Returns:
            ``(loss 0-dim tensor, {"cls", "act", "aff"} floats)``.
        Raises:
            ValueError: unknown transform, ``reduction`` or ``cls_loss``.
        """
        q = {**TRAIN_DEFAULTS, **{k: v for k, v in p.items() if k in TRAIN_DEFAULTS}}
        choices = list(q["transforms"])
        t = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        vit = model.vit
        stride = token_stride(vit)
        if t == "rescale":
            lo, hi = q["rescale_range"]
            s = lo + (hi - lo) * float(torch.rand((), generator=generator))
            side = max(stride, int(round(x.shape[-1] * s / stride)) * stride)
            x2 = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        else:
            x2 = transform_image(x, t)
        logits1 = model(x)
        attn1 = attentions(vit)
        logits2 = model(x2)
        attn2 = attentions(vit)
        layers = select_layers(len(attn1), q["loss_layers"])
        grid = patch_grid(vit, x.shape[-2], x.shape[-1])
        vgrid = patch_grid(vit, x2.shape[-2], x2.shape[-1])
        l_act, l_aff = consistency_losses([attn1[i] for i in layers], [attn2[i] for i in layers],
                                          t, grid, vgrid, num_prefix_tokens(vit), q["reduction"])
        l_cls = multilabel_loss(logits1, y) + multilabel_loss(logits2, y)
        if q["cls_loss"] == "mean":
            l_cls = 0.5 * l_cls
        elif q["cls_loss"] != "sum":
            raise ValueError(f"methods.acr cls_loss must be sum or mean, got {q['cls_loss']!r}")
        loss = l_cls + float(q["alpha"]) * l_act + float(q["beta"]) * l_aff
        return loss, {"cls": l_cls.item(), "act": l_act.item(), "aff": l_aff.item()}

    def maps(self, model, x, fg, p):
        """Eq. 7 (``cams_star``) and Eq. 8 (``cams``) for the classes ``fg``.

        ``p``: ``export_seeds`` params; the keys of :data:`SEED_DEFAULTS` select the form
        (absent = official code). See :func:`acr_maps`.
        """
        if "affinity_transpose" in p:
            raise ValueError("methods.acr.export_seeds.affinity_transpose was replaced by "
                             "eq8_form: code (A @ M*, official infer_cam.py) | paper (M* A)")
        q = {**SEED_DEFAULTS, **{k: v for k, v in p.items() if k in SEED_DEFAULTS}}
        return acr_maps(model, x, fg, layers=q["seed_layers"],
                        grad_head_reduce=q["grad_head_reduce"], layer_reduce=q["layer_reduce"],
                        relu=q["relu"], eq8_form=q["eq8_form"],
                        affinity_layers=q["affinity_layers"])


def _check(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"methods.acr.export_seeds.{name} must be one of {allowed}, got {value!r}")


def acr_maps(model: nn.Module, x: torch.Tensor, fg: torch.Tensor, layers=(-2, -1),
             grad_head_reduce: str = "relu_then_mean", layer_reduce: str = "sum",
             relu: str = "after_reduce", eq8_form: str = "code",
             affinity_layers="all") -> dict[str, torch.Tensor]:
    """Gradient-based class localisation maps of ACR (Eq. 7 "ACR*" and Eq. 8 "ACR").

    Defaults = official code (``infer_cam.py`` + ``DPT/ACR.py: getam(func='grad')``):

    * Eq. 7: for each class ``c``, ``G_i = d y_c / d A_i`` for every seed block ``i``
      (post-softmax attention, all heads); ``g_i = mean_heads ReLU(G_i[h, 0, 1:])``;
      ``M* = ReLU(sum_i g_i)``.
    * Eq. 8: ``M = A M*`` (``A @ M*`` as a column vector: each patch's value becomes the
      attention-weighted sum of ``M*`` over the keys it attends to), with
      ``A = sum_{i in affinity_layers} mean_heads A_i[1:, 1:]`` (all blocks by default).

    Paper-literal options: ``grad_head_reduce="mean_then_relu"`` (head mean of the raw
    gradient, ReLU afterwards), ``layer_reduce="mean"`` (``1/l sum``), ``relu="per_layer"``
    (ReLU each block's map too), ``eq8_form="paper"`` (``M = M* A`` as a row vector, ``A`` =
    mean over the SAME seed layers; ``affinity_layers`` is ignored then).

    Args:
        model: :class:`ViTClassifier` with a class-token head (attention captured).
        x: ``(1, 3, H, W)`` float image (normalised).
        fg: ``(k,)`` int64 0-based foreground class indices (k may be 0).
        layers: seed blocks (indices, negative allowed); official ``--start_layer 10`` of 12
            blocks = ``[-2, -1]``.
        grad_head_reduce: ``relu_then_mean`` | ``mean_then_relu``.
        layer_reduce: ``sum`` | ``mean``.
        relu: ``after_reduce`` (``after_mean`` accepted) | ``per_layer``.
        eq8_form: ``code`` | ``paper``.
        affinity_layers: ``"all"`` or block indices summed into ``A`` for ``eq8_form="code"``.
    Returns:
        ``{"cams_star": (k, h, w), "cams": (k, h, w)}`` float32 (the model's dtype), >= 0, at
        token resolution (``h, w`` = token grid); not normalised.
    Raises:
        ValueError: an unknown option value.
    """
    _check("grad_head_reduce", grad_head_reduce, ("relu_then_mean", "mean_then_relu"))
    _check("layer_reduce", layer_reduce, ("sum", "mean"))
    _check("relu", relu, ("after_reduce", "after_mean", "per_layer"))
    _check("eq8_form", eq8_form, ("code", "paper"))
    vit = model.vit
    with eval_mode(model), torch.enable_grad():
        x = x.detach().requires_grad_(False)
        logits = model(x)                                   # (1, C)
        attn = attentions(vit)
        idx = select_layers(len(attn), layers)
        chosen = [attn[i] for i in idx]                     # (1, heads, N, N)
        npre = num_prefix_tokens(vit)
        h, w = patch_grid(vit, x.shape[-2], x.shape[-1])
        grads = []
        for c in fg.tolist():
            g = torch.autograd.grad(logits[0, c], chosen, retain_graph=True)
            rows = [gi[0, :, 0, npre:] for gi in g]         # per block (heads, n)
            if grad_head_reduce == "relu_then_mean":
                per_layer = torch.stack([r.clamp_min(0).mean(0) for r in rows])   # (l, n)
            else:
                per_layer = torch.stack([r.mean(0) for r in rows])
            if relu == "per_layer":
                per_layer = per_layer.clamp_min(0)
            red = per_layer.sum(0) if layer_reduce == "sum" else per_layer.mean(0)
            grads.append(red.clamp_min(0))
        mstar = torch.stack(grads).detach() if grads else x.new_zeros(0, h * w)
        if eq8_form == "code":
            aidx = select_layers(len(attn), affinity_layers)
            aff = torch.stack([attn[i][0].mean(0)[npre:, npre:] for i in aidx]).sum(0).detach()
            m = (aff @ mstar.t()).t()                       # A @ M* per class (column vectors)
        else:
            aff = torch.stack([a[0].mean(0)[npre:, npre:] for a in chosen]).mean(0).detach()
            m = mstar @ aff                                 # M* A (row vectors)
    k = len(fg)
    return {"cams_star": mstar.reshape(k, h, w), "cams": m.detach().reshape(k, h, w)}
