"""ViT-PCM's network (official deepplants/ViT-PCM ``model.py``: ``get_model``, ``ViT``,
``HVBiLSTM``, ``PC``): the ViT's patch tokens, the optional HV-BiLSTM, the bias-free
classifier over K+1 classes and the per-patch softmax + global max pooling (supplementary
Eq. 2-3). The method and its losses: :mod:`pipeline.methods.vitpcm`."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from pipeline.models.vit import patch_grid, patch_tokens, vit_from_params


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
        #: True during the head-only warm-up (set by :meth:`pipeline.methods.vitpcm.ViTPCM.loss`): the ViT runs
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
