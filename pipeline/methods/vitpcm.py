"""ViT-PCM: patch classification with global max pooling (Rossetti et al., ECCV 2022,
"Max Pooling with Vision Transformers reconciles class and shape in WSSS";
``shared/papers/vit-pcm-max-pooling-supplementary.txt``, official TensorFlow code
``deepplants/ViT-PCM`` ``model.py``).

Model (supplementary Sec. 1):

* ``F in R^{s x e}``: the ViT's patch tokens (class token dropped, final norm applied);
* optional HV-BiLSTM (official code, ``HVBiLSTM``): dropout, then a bidirectional LSTM
  along every row and one along every column of the token grid, outputs concatenated
  (``4 * lstm_units`` channels) and used *instead of* ``F`` (no residual, as in the code);
  ``lstm_form: keras`` (default) adds Keras' per-LSTM input dropout and initialisation;
* dropout, then ``A = F W`` with a bias-free ``W in R^{e x (K+1)}`` — background is class 0;
* Eq. 3: ``Z = softmax(A)`` over the K+1 classes of each patch;
* Eq. 2: ``y_k = max_i Z_i^k`` (global max pooling over patches);
* Eq. 1: ``L_MCE = mean_k BCE(t_k, y_k)`` over the K+1 classes; ``t_0``, the background
  label, is 1 where the image's mask has background pixels (``bg_label: gt``, default,
  official ``seg2multihot``; the manifest's ``no_background``) or always 1
  (``bg_label: always``, the paper's reading).

Equivariance loss (official code ``compute_cce_loss``; not in the paper): a second view is
classified and trained by cross entropy towards the stop-gradient, label-merged predictions
of the first view (:func:`merge_class_labels`: absent classes zeroed, each class divided by
its spatial max, renormalised per patch) put into the second view's geometry.
``eq_views: official`` (default): per image an independent patch-aligned crop (p 0.3),
resize and dihedral transform, four views tiled into one 2 x 2 mosaic and classified
together (:func:`official_views`, the code's ``merged_step``; view 2 is drawn from view 1, so
it shares view 1's colour jitter, where the code jitters it independently).
``eq_views: batch`` (earlier form): one transform ``T`` in {hflip, vflip, rot90, rot270} of
the whole batch, its predictions mapped back with ``f^{-1}`` (the token permutation of
:func:`pipeline.methods.common.tokens.inverse_token_permutation`). The target comes, as in
the code, from an extra dropout-free pass without gradients (``eq_target: eval``; ``train``:
the detached first-view pass of ``L_MCE``).

Baseline pseudo-mask (BPM): per patch, argmax of ``Z`` over background + the present
classes (``bpm_norm: none``, the paper/issue definition) or of the official
``merge_class_labels`` output (``bpm_norm: max``: each class first divided by its spatial
max).

Staged training (official ``main.py`` with ``model.warmup()`` / ``model.unfreeze()``;
``configs/voc12.yaml``: ``EPOCHS_WARMUP 1``, ``LR_WARMUP 1e-3``, ``LR 1e-4``,
``NUM_BLOCK_UNFREEZE 5``): ``unfreeze_blocks: N`` keeps every ViT parameter frozen except its
last ``N`` blocks and final norm (null: all trainable, the paper's reading); for the first
``freeze_warmup_iters`` iterations only the head (HV-BiLSTM and classifier) trains, the ViT
running under ``no_grad``, at ``warmup_lr_mult`` x the lr (the code's 1e-3 / 1e-4 = 10).
``fresh_optimizer_after_warmup: true`` (default, official: ``main.py`` compiles a new Adam
for the second phase) clears the optimiser state of every parameter at iteration
``freeze_warmup_iters`` (:meth:`ViTPCM.optimizer_resets`); ``false`` keeps the head's Adam
moments across the switch. The `voc` profile's ``adam_eps: 1e-7`` is Keras' Adam epsilon.

Seeds (:meth:`ViTPCM.maps`, :meth:`ViTPCM.finish_maps`): ``seeds.h5`` stores foreground
maps only, so the background probability is folded into the stored map:
``cams_k = Z_k / (Z_k + Z_0)`` (pairwise class-vs-background probability, in [0, 1]); the
arg-max over background + the present classes is then exactly
``maps_to_label(cams, bg_threshold=0.5)`` (``x / (x + c)`` grows with ``x``, ties go to
background in both), so the seeds evaluated at ``methods.vitpcm.eval_seeds.bg_threshold: 0.5``
ARE the BPM. Where the ratio is formed (``export_seeds.bpm_upsample``):

* ``probs`` (default, official ``main.py: test``): the label-merged distribution is upsampled
  to the image (both halves, bilinear) and the ratio formed per pixel, so the stored seeds
  are the code's ``argmax(resize(merge_class_labels(preds)))`` exactly;
* ``ratio`` (this project's earlier form): the ratio is formed at token resolution and
  upsampled (identical labels at the token centres, not between them).

With several export scales / flips the maps are averaged (``norm: mean``), a multi-scale BPM.
``probs`` keeps the raw foreground probabilities ``Z_k`` (averaged too).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.engine.runtime import eval_mode
from pipeline.models.vit import input_stride, patch_grid, patch_tokens, vit_from_params
from pipeline.methods.common.tokens import SPATIAL_TRANSFORMS, inverse_token_permutation, transform_image
from pipeline.methods.base import Method


#: forms of the HV-BiLSTM's LSTMs (:class:`HVBiLSTM`)
LSTM_FORMS = ("keras", "torch")


def keras_lstm_init(lstm: nn.LSTM) -> None:
    """Keras ``LSTM`` initialisation on a one-layer ``nn.LSTM``: ``glorot_uniform`` input
    kernel, ``orthogonal`` recurrent kernel, zero bias with ``unit_forget_bias`` (forget gate
    bias 1; PyTorch's two biases sum, so ``bias_ih`` holds it and ``bias_hh`` is 0). Gate
    order is the same in both (i, f, c/g, o); PyTorch's ``(4u, in)`` matrices are Keras'
    ``(in, 4u)`` transposed, for which both initialisers are symmetric."""
    for name, w in lstm.named_parameters():
        if name.startswith("weight_ih"):
            nn.init.xavier_uniform_(w)
        elif name.startswith("weight_hh"):
            nn.init.orthogonal_(w)
        elif name.startswith("bias"):
            nn.init.zeros_(w)
            if name.startswith("bias_ih"):
                u = w.shape[0] // 4
                w.data[u:2 * u] = 1.0


class HVBiLSTM(nn.Module):
    """Row + column bidirectional LSTMs over a token grid (official ``model.py: HVBiLSTM``).

    Input ``(B, h, w, D)`` float32 -> output ``(B, h, w, 4 * units)``: dropout on the
    features, then the row BiLSTM reads each row left-to-right and right-to-left, the column
    BiLSTM each column; per position ``[rows fw, rows bw, cols fw, cols bw]`` (Keras'
    ``Bidirectional`` concatenates forward then backward).

    ``form``:

    * ``keras`` (default, the official code): four one-direction LSTMs with Keras'
      initialisation (:func:`keras_lstm_init`) and Keras' ``LSTM(dropout=p)``: each LSTM
      draws its own input-dropout mask per sequence, the same at every time step (the
      non-cuDNN Keras kernel's ``get_dropout_mask_for_cell``), on top of the shared dropout;
    * ``torch`` (the previous form): two ``nn.LSTM(bidirectional=True)`` with PyTorch's
      initialisation and only the shared dropout.

    Raises:
        ValueError: unknown ``form``.
    """

    def __init__(self, dim: int, units: int, dropout: float = 0.0, form: str = "keras"):
        super().__init__()
        if form not in LSTM_FORMS:
            raise ValueError(f"methods.vitpcm.lstm_form must be one of {LSTM_FORMS}, got {form!r}")
        self.form, self.p = form, float(dropout)
        self.drop = nn.Dropout(dropout)
        if form == "torch":
            self.rows = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
            self.cols = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
        else:
            self.lstms = nn.ModuleDict({k: nn.LSTM(dim, units, batch_first=True)
                                        for k in ("rows_fw", "rows_bw", "cols_fw", "cols_bw")})
            for m in self.lstms.values():
                keras_lstm_init(m)
        self.out_dim = 4 * units

    def sequence_dropout(self, s: torch.Tensor) -> torch.Tensor:
        """Keras ``LSTM(dropout=p)`` on ``(N, T, D)`` sequences: one Bernoulli(1 - p) mask per
        sequence and feature, scaled by ``1 / (1 - p)``, the same at every step (training
        mode only; identity in eval mode or at p = 0)."""
        if not self.training or self.p <= 0:
            return s
        keep = torch.empty(s.shape[0], 1, s.shape[2], device=s.device, dtype=s.dtype)
        return s * keep.bernoulli_(1 - self.p) / (1 - self.p)

    def _bidirectional(self, s: torch.Tensor, fw: str, bw: str) -> torch.Tensor:
        a, _ = self.lstms[fw](self.sequence_dropout(s))
        b, _ = self.lstms[bw](self.sequence_dropout(s).flip(1))
        return torch.cat([a, b.flip(1)], -1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        B, h, w, D = f.shape
        f = self.drop(f)
        rows = f.reshape(B * h, w, D)
        cols = f.transpose(1, 2).reshape(B * w, h, D)
        if self.form == "torch":
            r, _ = self.rows(rows)
            c, _ = self.cols(cols)
        else:
            r = self._bidirectional(rows, "rows_fw", "rows_bw")
            c = self._bidirectional(cols, "cols_fw", "cols_bw")
        r = r.reshape(B, h, w, -1)
        c = c.reshape(B, w, h, -1).transpose(1, 2)
        return torch.cat([r, c], -1)


class PCMClassifier(nn.Module):
    """timm ViT + (optional HV-BiLSTM) + bias-free patch classifier over K+1 classes
    (``classifier_init_std``: ``W ~ N(0, std)`` as the official Keras ``RandomNormal(0, 0.05)``;
    None: PyTorch's ``nn.Linear`` initialisation).

    ``forward(x)``: ``(B, 3, H, W)`` -> patch logits ``A`` of shape ``(B, h, w, K+1)``
    (channel 0 = background), ``h, w`` = token grid.
    """

    def __init__(self, p: dict, num_classes: int):
        super().__init__()
        bb = p["backbone"]
        self.vit = vit_from_params(bb)
        dim = self.vit.num_features
        drop = float(p.get("dropout", 0.2))
        if p.get("hv_bilstm", True):
            units = p.get("lstm_units") or max(1, dim // 4)
            self.lstm = HVBiLSTM(dim, int(units), drop, str(p.get("lstm_form", "keras")))
            dim = self.lstm.out_dim
        else:
            self.lstm = None
        self.drop = nn.Dropout(drop)
        self.classifier = nn.Linear(dim, num_classes + 1, bias=False)
        std = p.get("classifier_init_std")
        if std is not None:   # official model.py: kernel_initializer=RandomNormal(0.0, 0.05)
            nn.init.normal_(self.classifier.weight, 0.0, float(std))
        n = p.get("unfreeze_blocks")
        if n is not None:     # official model.unfreeze(): encoder_norm + the last N blocks
            n = int(n)
            if not 0 <= n <= len(self.vit.blocks):
                raise ValueError(f"methods.vitpcm.unfreeze_blocks must be in 0..{len(self.vit.blocks)} "
                                 f"(the ViT's blocks) or null, got {n}")
            self.vit.requires_grad_(False)
            for blk in list(self.vit.blocks)[len(self.vit.blocks) - n:]:
                blk.requires_grad_(True)
            self.vit.norm.requires_grad_(True)
        #: True during the head-only warm-up (set by :meth:`ViTPCM.loss`): the ViT runs
        #: under no_grad
        self.vit_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.vit_frozen else nullcontext():
            _, f = patch_tokens(self.vit, x)                  # (B, n, D)
        h, w = patch_grid(self.vit, x.shape[-2], x.shape[-1])
        f = f.reshape(f.shape[0], h, w, f.shape[-1])
        if self.lstm is not None:
            f = self.lstm(f)
        return self.classifier(self.drop(f))


def pcm_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 then Eq. 2.

    Args:
        logits: ``A``, ``(B, h, w, C)`` (C = K+1, background first).
    Returns:
        ``Z`` ``(B, h, w, C)`` softmax over classes per patch (rows sum to 1) and
        ``y`` ``(B, C)`` = max of ``Z`` over the ``h*w`` patches, in (0, 1).
    """
    z = logits.softmax(-1)
    return z, z.flatten(1, 2).amax(1)


def with_background(y_fg: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` multi-hot foreground labels -> ``(B, K+1)`` with ``t_0 = 1``."""
    return torch.cat([torch.ones_like(y_fg[:, :1]), y_fg], 1)


def mce_loss(y: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 1: mean over batch and the K+1 classes of ``BCE(t_k, y_k)``.

    Args:
        y: ``(B, K+1)`` pooled probabilities (Eq. 2); t: ``(B, K+1)`` targets in {0, 1}
            (background column included, see :func:`with_background`).
        eps: ``y`` is clipped to ``[eps, 1 - eps]`` (Keras' ``BinaryCrossentropy``, used by
            the official code).
    """
    y = y.clamp(eps, 1 - eps)
    return -(t * y.log() + (1 - t) * (1 - y).log()).mean()


def merge_class_labels(z: torch.Tensor, t: torch.Tensor, spatial_norm: bool = True,
                       eps: float = 1e-12) -> torch.Tensor:
    """Label-merged patch distributions (official ``merge_class_labels``).

    Args:
        z: ``(B, h, w, C)`` patch probabilities; t: ``(B, C)`` labels with background.
        spatial_norm: divide each class by its max over patches before renormalising.
    Returns:
        ``(B, h, w, C)``: absent classes 0, each patch renormalised to sum 1 (patches whose
        present-class mass is 0 stay 0, as TF's ``divide_no_nan``).
    """
    z = z * t[:, None, None, :]
    if spatial_norm:
        mx = z.flatten(1, 2).amax(1)[:, None, None, :]
        z = torch.where(mx > eps, z / mx.clamp_min(eps), torch.zeros_like(z))
    s = z.sum(-1, keepdim=True)
    return torch.where(s > eps, z / s.clamp_min(eps), torch.zeros_like(z))


def invert_patch_grid(z: torch.Tensor, t: str, grid: tuple[int, int]) -> torch.Tensor:
    """``f^{-1}`` of per-patch predictions of the view ``transform_image(x, t)``.

    Args:
        z: ``(B, h', w', C)`` predictions on the view's token grid.
        grid: ``(h, w)`` token grid of the original view (``h' x w' = h x w``; rot90/270
            swap the sides).
    Returns:
        ``(B, h, w, C)`` in the original geometry: ``out[:, r, c] = z`` at the view position
        showing original token ``(r, c)``.
    """
    h, w = grid
    inv = inverse_token_permutation(h, w, t)
    B, C = z.shape[0], z.shape[-1]
    return z.reshape(B, h * w, C)[:, inv].reshape(B, h, w, C)


def equivariance_loss(z1: torch.Tensor, z2: torch.Tensor, t_lab: torch.Tensor, transform: str,
                      spatial_norm: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """Cross entropy between view-1 targets and the back-mapped view-2 predictions.

    ``L_eq = mean_{b, patch} - sum_c q_c log p_c`` with ``q = stopgrad(merge(z1, t))`` and
    ``p = f^{-1}(z2)`` (official ``compute_cce_loss``, with the inverse mapping applied to
    the view instead of the forward mapping to the target; CE per patch is invariant to
    that choice).

    Args:
        z1: ``(B, h, w, C)`` view-1 probabilities; z2: ``(B, h', w', C)`` view-2 ones.
        t_lab: ``(B, C)`` labels with background; transform: a ``SPATIAL_TRANSFORMS`` name.
    """
    return merged_cross_entropy(z1, invert_patch_grid(z2, transform, z1.shape[1:3]), t_lab,
                                spatial_norm, eps)


def merged_cross_entropy(target: torch.Tensor, pred: torch.Tensor, t_lab: torch.Tensor,
                         spatial_norm: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """``mean_{b, patch} - sum_c q_c log clamp(p_c, eps, 1)`` with ``q =
    stopgrad(merge_class_labels(target, t_lab))`` (official ``compute_cce_loss``: Keras
    ``CategoricalCrossentropy`` against the label-merged, stop-gradient target).

    Args:
        target, pred: ``(B, h, w, C)`` patch probabilities on the same grid; t_lab: ``(B, C)``.
    """
    q = merge_class_labels(target.detach(), t_lab, spatial_norm)
    return -(q * pred.clamp(eps, 1.0).log()).sum(-1).mean()


#: forms of the equivariance views (:meth:`ViTPCM.loss`)
EQ_VIEWS = ("official", "batch")


def dihedral(a: torch.Tensor, code: tuple[bool, bool, bool], dims: tuple[int, int]) -> torch.Tensor:
    """Official ``apply_affine_transform_invertible``: left-right flip, then up-down flip, then
    transpose, each if its flag in ``code = (fliplr, flipud, transpose)`` is set.

    Args:
        a: any tensor; dims: its ``(row, column)`` dimensions (``(-2, -1)`` for
            ``(..., H, W)`` images, ``(0, 1)`` for ``(h, w, C)`` patch grids).
    """
    r, c = dims
    if code[0]:
        a = a.flip(c)
    if code[1]:
        a = a.flip(r)
    if code[2]:
        a = a.transpose(r, c)
    return a


def official_views(x: torch.Tensor, target: torch.Tensor, stride: int, crop: int, crop_p: float,
                   scale: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list]:
    """ViT-PCM's second view and its target (official ``dataloader.py``: ``affine_transform``
    with ``crop_size``/``scale_size``; ``model.py``: ``merged_step``, ``compute_cce_loss``).

    For each of the first ``4 * (B // 4)`` images, independently: with probability
    ``crop_p`` a ``crop x crop`` box whose corner is ``min(U{0, stride, ..., S}, S - crop)``
    per axis (``bbox_for_crop``), the image (or the box) resized to ``scale x scale``
    (bilinear, ``align_corners=True``: TF1 ``resize``), then the dihedral
    :func:`dihedral` with three fair coin flips. Four consecutive views are tiled into one
    ``2 scale x 2 scale`` mosaic (row-major: view ``4i + 2r + c`` at tile ``(r, c)``). The
    target is the view-1 patch distribution put through the same crop (in patches), resize
    (to ``scale / stride`` patches, bilinear, ``align_corners=True``) and dihedral.

    The code draws view 2 from the un-augmented image with its own colour jitter and
    dihedral, and un-flips view 1's predictions before mapping them; here view 2 is drawn
    from view 1 (so it carries view 1's colour jitter) with a fresh dihedral, which gives
    view 2 the same geometry distribution relative to view 1 (a uniform dihedral of a uniform
    dihedral is uniform and independent of the first); the crop corner's bias towards the
    last position lies along view 1's axes rather than the original image's.

    Args:
        x: ``(B, 3, S, S)`` view-1 images, ``S`` a multiple of ``stride``.
        target: ``(B, S/stride, S/stride, C)`` view-1 patch distributions (detached).
        crop, scale: pixels, multiples of ``stride``, ``crop <= S``.
        generator: draws of every coin, corner and flag (on ``x``'s device or CPU).
    Returns:
        ``(mosaics (B//4, 3, 2 scale, 2 scale), targets (4 (B//4), g, g, C) with
        g = scale / stride, draws)`` — ``draws``: per view ``(box or None, dihedral code)``,
        ``box = (y0, x0)`` in pixels.
    Raises:
        ValueError: fewer than 4 images, a non-square input, or sizes that are not multiples
            of the stride.
    """
    B, _, S, S2 = x.shape
    n = 4 * (B // 4)
    if n == 0 or S != S2 or S % stride or crop % stride or scale % stride or not 0 < crop <= S:
        raise ValueError(f"methods.vitpcm eq_views: official needs a batch of >= 4 square images and "
                         f"eq_crop / eq_scale multiples of the token stride {stride} (crop <= side); got "
                         f"batch {B}, {S}x{S2} px, eq_crop {crop}, eq_scale {scale}: set eq_views: batch, "
                         f"or batch_size / eq_crop / eq_scale accordingly")
    g = scale // stride
    views, targets, draws = [], [], []
    starts = torch.arange(0, S + 1, stride)
    for b in range(n):
        u = torch.rand(4, generator=generator)
        box = None
        img, tgt = x[b:b + 1], target[b:b + 1].permute(0, 3, 1, 2)
        if u[0] < crop_p:
            yx = starts[torch.randint(len(starts), (2,), generator=generator)].clamp(max=S - crop)
            box = (int(yx[0]), int(yx[1]))
            y0, x0 = box
            img = img[..., y0:y0 + crop, x0:x0 + crop]
            ty, tx, tc = y0 // stride, x0 // stride, crop // stride
            tgt = tgt[..., ty:ty + tc, tx:tx + tc]
        img = F.interpolate(img, size=(scale, scale), mode="bilinear", align_corners=True)
        tgt = F.interpolate(tgt, size=(g, g), mode="bilinear", align_corners=True)
        code = (bool(u[1] < 0.5), bool(u[2] < 0.5), bool(u[3] < 0.5))
        views.append(dihedral(img[0], code, (-2, -1)))
        targets.append(dihedral(tgt[0].permute(1, 2, 0), code, (0, 1)))
        draws.append((box, code))
    v = torch.stack(views).reshape(n // 4, 2, 2, 3, scale, scale)
    mosaics = v.permute(0, 3, 1, 4, 2, 5).reshape(n // 4, 3, 2 * scale, 2 * scale)
    return mosaics, torch.stack(targets), draws


def mosaic_tiles(z: torch.Tensor) -> torch.Tensor:
    """``(M, 2g, 2g, C)`` patch predictions of mosaics -> ``(4M, g, g, C)`` per tile, in the
    order :func:`official_views` tiled them (``extract_nonoverlapping_patches``)."""
    M, H, W, C = z.shape
    g = H // 2
    return z.reshape(M, 2, g, 2, g, C).permute(0, 1, 3, 2, 4, 5).reshape(4 * M, g, g, C)


def bpm(z: torch.Tensor, class_ids: torch.Tensor, spatial_norm: bool = False) -> torch.Tensor:
    """Baseline pseudo-mask of one image (paper Sec. 1: ``\\hat Y``).

    Args:
        z: ``(h, w, K+1)`` patch probabilities; class_ids: ``(k,)`` int64 VOC ids (1..K) of
            the present foreground classes.
        spatial_norm: official ``merge_class_labels`` normalisation before the argmax.
    Returns:
        ``(h, w)`` int64 labels in {0} + class_ids: argmax over background and the present
        classes (first index wins ties, i.e. background).
    """
    keep = torch.cat([torch.zeros(1, dtype=torch.long), class_ids.long().cpu()]).to(z.device)
    sel = z[..., keep]
    if spatial_norm:
        sel = sel / sel.flatten(0, 1).amax(0).clamp_min(1e-12)
    return keep[sel.argmax(-1)]


class ViTPCM(Method):
    name = "vitpcm"
    seed_keys = ("cams", "probs")

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        return PCMClassifier(p, num_classes)

    def param_groups(self, model, p):
        """With ``freeze_warmup_iters > 0`` (staged training, module docstring): the ViT at
        1x and the head at ``warmup_lr_mult`` x the lr for the warm-up iterations, then 1x
        (a piecewise multiplier, :func:`pipeline.engine.trainer.mult_at`); else one group."""
        w = int(p.get("freeze_warmup_iters") or 0)
        if w <= 0:
            return None
        head = [q for name, q in model.named_parameters() if not name.startswith("vit.")]
        return [{"params": list(model.vit.parameters()), "lr_mult": 1.0},
                {"params": head, "lr_mult": [[0, float(p.get("warmup_lr_mult", 10.0))], [w, 1.0]]}]

    @staticmethod
    def _eq_target(model, x, z1, p):
        """View-1 probabilities the equivariance target is built from: ``eq_target: eval``
        (default, official ``VITPCM.train_step``: ``outputs_sg = self(images,
        training=False)`` outside the gradient tape, i.e. a dropout-free forward without
        gradients) or ``train`` (the training-mode forward of ``L_MCE``, detached).

        Raises:
            ValueError: unknown ``eq_target``.
        """
        form = p.get("eq_target", "eval")
        if form == "train":
            return z1
        if form != "eval":
            raise ValueError(f"methods.vitpcm.eq_target must be eval or train, got {form!r}")
        with eval_mode(model), torch.no_grad():
            return pcm_scores(model(x))[0]

    def optimizer_resets(self, p):
        """``(freeze_warmup_iters,)`` when the staged training is on and
        ``fresh_optimizer_after_warmup`` (default true: the official ``main.py`` compiles a fresh
        Keras Adam after the warm-up epoch); else ``()``."""
        w = int(p.get("freeze_warmup_iters") or 0)
        return (w,) if w > 0 and p.get("fresh_optimizer_after_warmup", True) else ()

    def wants_background_label(self, p):
        """``bg_label: gt`` (default; official ``dataloader.py``: ``seg2multihot`` of the
        training mask, so ``t_0 = 1`` only when the mask has background pixels): True, the
        trainer hands :meth:`loss` ``(B, K+1)`` labels, background first, from the manifest's
        ``no_background``. ``always`` (the paper's reading of Eq. 1, ``t_0 = 1``): False.

        Raises:
            ValueError: another ``bg_label``.
        """
        form = p.get("bg_label", "gt")
        if form not in ("gt", "always"):
            raise ValueError(f"methods.vitpcm.bg_label must be gt or always, got {form!r}")
        return form == "gt"

    def loss(self, model, x, y, p, generator):
        """``L_MCE`` (Eq. 1) + ``eq_weight * L_eq`` (+ ``classifier_l2 * ||W||^2``).

        ``y``: ``(B, K+1)`` labels with the background first (``bg_label: gt``, from the
        trainer) or ``(B, K)`` foreground labels, completed with ``t_0 = 1``
        (:func:`with_background`).

        ``equivariance: true``: ``eq_views: official`` (default; official ``merged_step`` +
        ``compute_cce_loss``): per image an independent crop (``eq_crop`` px, probability
        ``eq_crop_p``, default 0.3) / resize (``eq_scale`` px) / dihedral view, four views per
        2 x 2 mosaic, CE towards the target put through the same transforms
        (:func:`official_views`; ``eq_crop`` / ``eq_scale`` null: a third / a half of the
        input side, down to a multiple of the token stride = the code's 128 / 192 at 384).
        ``eq_views: batch`` (this project's earlier form): one of ``eq_transforms`` for the
        whole batch (generator), exact token permutation back. During the first
        ``freeze_warmup_iters`` iterations (:attr:`iteration`) the ViT runs under no_grad
        (head-only warm-up).

        Raises:
            ValueError: unknown ``eq_views`` / ``eq_transforms``, or an ``official`` view that
                the batch cannot form (:func:`official_views`).
        """
        model.vit_frozen = self.iteration < int(p.get("freeze_warmup_iters") or 0)
        t_lab = y if y.shape[1] == model.classifier.out_features else with_background(y)
        z1, y1 = pcm_scores(model(x))
        l_mce = mce_loss(y1, t_lab)
        loss, parts = l_mce, {"mce": l_mce.item()}
        views = p.get("eq_views", "official")
        if views not in EQ_VIEWS:
            raise ValueError(f"methods.vitpcm.eq_views must be one of {EQ_VIEWS}, got {views!r}")
        w_eq = float(p.get("eq_weight", 1.0))
        if p.get("equivariance", True) and w_eq > 0:
            spatial_norm = bool(p.get("eq_spatial_norm", True))
            if views == "official":
                stride, S = input_stride(model), x.shape[-1]
                crop = int(p.get("eq_crop") or max(stride, S // 3 // stride * stride))
                scale = int(p.get("eq_scale") or max(stride, S // 2 // stride * stride))
                mosaics, target, _ = official_views(x, self._eq_target(model, x, z1, p).detach(), stride,
                                                    crop, float(p.get("eq_crop_p", 0.3)), scale, generator)
                z2 = mosaic_tiles(pcm_scores(model(mosaics))[0])
                l_eq = merged_cross_entropy(target, z2, t_lab[:len(z2)], spatial_norm)
            else:
                choices = list(p.get("eq_transforms", ["hflip", "vflip", "rot90", "rot270"]))
                bad = [c for c in choices if c not in SPATIAL_TRANSFORMS]
                if bad or not choices:
                    raise ValueError(f"methods.vitpcm.eq_transforms must be a non-empty subset of "
                                     f"{SPATIAL_TRANSFORMS}, got {choices}")
                t = choices[int(torch.randint(len(choices), (1,), generator=generator))]
                z2, _ = pcm_scores(model(transform_image(x, t)))
                l_eq = equivariance_loss(self._eq_target(model, x, z1, p), z2, t_lab, t, spatial_norm)
            loss = loss + w_eq * l_eq
            parts["eq"] = l_eq.item()
        l2 = float(p.get("classifier_l2", 0.0))
        if l2 > 0:
            reg = l2 * model.classifier.weight.pow(2).sum()
            loss = loss + reg
            parts["l2"] = reg.item()
        return loss, parts

    @torch.no_grad()
    def maps(self, model, x, fg, p):
        """Maps of the classes ``fg`` at token resolution (stored maps: module docstring).

        ``bpm_upsample: probs`` (default; official ``main.py: test``: ``merge_class_labels``
        of the predictions, bilinear ``resize`` (``align_corners=True``) to the image, then the
        arg-max): ``{"bpm_bg": (1, h, w), "bpm_fg": (k, h, w), "probs": (k, h, w)}``, the
        label-merged distribution over background + the present classes (each patch
        renormalised, :func:`merge_class_labels`), split into its background and foreground
        channels; :meth:`finish_maps` forms ``cams = fg / (fg + bg)`` after the upsampling, so
        ``cams > 0.5`` at a pixel is the official arg-max of the upsampled distribution.
        ``ratio`` (this project's earlier form): ``{"cams": Z_k / (Z_k + Z_0), "probs"}``, the
        ratio taken at token resolution and upsampled itself (the same labels at token
        resolution, slightly different ones between token centres).

        Args:
            x: ``(1, 3, H, W)``; fg: ``(k,)`` 0-based foreground indices (class id - 1).
            p: ``export_seeds`` params; ``bpm_norm: max`` applies the official per-class
                spatial max normalisation (over background + present classes) first.
        Returns:
            float32 maps in [0, 1] as above.
        Raises:
            ValueError: unknown ``bpm_norm`` / ``bpm_upsample``, or ``bpm_upsample: probs``
                with an ``export_seeds.norm`` other than ``mean`` (a per-channel max / min-max
                would rescale the two halves of the distribution apart).
        """
        norm, order = p.get("bpm_norm", "none"), p.get("bpm_upsample", "probs")
        if norm not in ("none", "max"):
            raise ValueError(f"methods.vitpcm.bpm_norm must be none or max, got {norm!r}")
        if order not in ("probs", "ratio"):
            raise ValueError(f"methods.vitpcm.bpm_upsample must be probs or ratio, got {order!r}")
        z = model(x)[0].softmax(-1)                         # (h, w, K+1)
        keep = torch.cat([torch.zeros(1, dtype=torch.long, device=fg.device), fg + 1])
        probs = z[..., fg + 1].permute(2, 0, 1).contiguous()
        if order == "probs":
            if p.get("norm", "mean") != "mean":
                raise ValueError("methods.vitpcm.bpm_upsample: probs needs export_seeds.norm: mean "
                                 f"(got {p.get('norm')!r}); set bpm_upsample: ratio for other norms")
            t = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
            t[keep] = 1
            q = merge_class_labels(z[None], t[None], spatial_norm=norm == "max")[0][..., keep]
            q = q.permute(2, 0, 1)
            return {"bpm_bg": q[:1].contiguous(), "bpm_fg": q[1:].contiguous(), "probs": probs}
        sel = z[..., keep]
        if norm == "max":
            sel = sel / sel.flatten(0, 1).amax(0).clamp_min(1e-12)
        bg, fgz = sel[..., :1], sel[..., 1:]
        cams = fgz / (fgz + bg).clamp_min(1e-12)
        return {"cams": cams.permute(2, 0, 1).contiguous(), "probs": probs}

    def finish_maps(self, maps, p):
        """``bpm_upsample: probs``: ``cams = bpm_fg / (bpm_fg + bpm_bg)`` (0 where both are 0,
        i.e. background, as the official arg-max of an all-zero patch) on the merged,
        upsampled maps; ``bpm_bg`` / ``bpm_fg`` are dropped. Other maps pass unchanged.

        Args:
            maps: ``{"bpm_bg": (1, H, W), "bpm_fg": (k, H, W), ...}`` float32 (or already
                ``{"cams", ...}``).
        Returns:
            ``{"cams": (k, H, W) float32 in [0, 1], "probs": ...}``.
        """
        if "bpm_fg" not in maps:
            return maps
        out = {k: v for k, v in maps.items() if k not in ("bpm_bg", "bpm_fg")}
        fgm, bgm = maps["bpm_fg"], maps["bpm_bg"]
        out["cams"] = fgm / (fgm + bgm).clamp_min(1e-12)
        return out
