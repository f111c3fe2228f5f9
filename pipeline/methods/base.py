"""The method plug-in interface.

A method is everything that differs between WSSS methods in the DAG's first stages: the
classifier it trains, its training loss, and how it turns a trained classifier into class
maps (seeds). Every later stage (affinity refinement, CRF pseudo labels, DeepLabV2) is
shared, so ``{dataset}/{method}`` wildcards select everything.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.vit import patch_tokens, vit_from_params


class Method(ABC):
    """Base class of a WSSS method plug-in.

    Attributes:
        name: the ``{method}`` wildcard value.
        seed_keys: map kinds written into ``seeds.h5`` (first one = the seeds evaluated).
        aux_keys: further map kinds written into ``seeds.h5`` when :meth:`finish_maps`
            returns them, never evaluated as seeds (ViT-PCM's ``bpm_bg`` / ``bpm_fg``, read by
            ``make_pseudo_labels.source: seeds``).
        affinity_key: map kind the AffinityNet is trained from.
        refine_key: map kind the random walk refines.
    """

    name: str = ""
    seed_keys: tuple[str, ...] = ("cams",)
    aux_keys: tuple[str, ...] = ()
    affinity_key: str = "cams"
    refine_key: str = "cams"

    #: current training iteration (0-based), set by the trainer before each ``loss`` call
    iteration: int = 0
    #: True if the classifier has its own segmentation head (single-stage methods: AFA, MCC);
    #: then :meth:`segment` gives its logits and stage ``eval_own_seg`` scores them.
    has_seg_head: bool = False
    #: defaults of the seed export's multi-scale merge (``ms_flip_merge``, ``ms_relu``; see
    #: :func:`pipeline.steps.seeds.multiscale_maps`) that ``export_seeds`` params override
    seed_merge: dict = {}

    def param_groups(self, model: nn.Module, p: dict) -> list[dict] | None:
        """Optimiser parameter groups ``[{"params": [...], "lr_mult": float}, ...]`` (each
        group's lr is the scheduled lr times ``lr_mult``); None (default): one group with
        every parameter at the scheduled lr."""
        return None

    def optimizer_resets(self, p: dict) -> tuple[int, ...]:
        """Iterations (0-based) before which the trainer clears the optimiser state (a fresh
        optimiser from there on, :class:`pipeline.engine.trainer.Trainer`); default none."""
        return ()

    def wants_background_label(self, p: dict) -> bool:
        """True if the training labels ``y`` of :meth:`loss` should carry the background
        label first (``(B, C)``, ``y[:, 0]`` = 1 where the image's mask has background
        pixels; the manifest's ``no_background``); default False (``(B, C-1)`` foreground
        multi-hot)."""
        return False

    def extra_views(self, p: dict) -> str | None:
        """Which extra training views :meth:`loss` gets as keyword arguments
        (:class:`pipeline.data.datasets.ClassificationDataset` ``extra_views``); default None.

        * ``"base"``: ``base`` ``(B, 3, S, S)`` (the resized image with a colour jitter of its
          own, no flip) and ``base_code`` ``(B, 3)`` int64 (view 1's left-right flip, up-down
          flip, transpose, applied in that order to the base) - ViT-PCM;
        * ``"mcc"``: ``global2`` and ``local`` ``(B, 3, S, S)`` (a second global view and the
          local view's image; ``x`` is then global view 1) - MCC;
        * ``"geometry"``: ``geometry`` ``(B, 6)`` int64 (dataset index, rescaled size, flip,
          crop offset: where each crop came from, for maps of the whole image) - SMAF.
        """
        return None

    def after_step(self, model: nn.Module, it: int, p: dict) -> None:
        """Called by the trainer after each optimiser step (e.g. EMA updates); default no-op."""

    def segment(self, model: nn.Module, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Logits of the method's own segmentation head.

        Args:
            x: ``(1, 3, H, W)`` float32 normalised image.
            p: ``eval_own_seg`` params.
        Returns:
            ``(1, C + 1, h, w)`` float32 logits, background first (21 channels for VOC), at
            any resolution (the caller resizes to ``(H, W)``).
        Raises:
            NotImplementedError: the method has no segmentation head (``has_seg_head`` False).
        """
        raise NotImplementedError(f"method {self.name!r} has no segmentation head")

    @abstractmethod
    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        """Classifier for ``num_classes`` foreground classes from the ``train_cls`` params."""

    def setup(self, model: nn.Module, p: dict, inputs: dict[str, Classifier],
              device: torch.device | str = "cpu") -> None:
        """Optional hook run once by :func:`pipeline.steps.cls.train_classifier` after
        :meth:`build_model` and before the first :meth:`loss` (no-op by default).

        Methods that need other trained classifiers of the DAG (e.g. SMAF's frozen teacher)
        get them here, already loaded by the trainer (the host owns checkpoint loading, a
        plug-in never imports :mod:`pipeline.steps.cls`), and may initialise ``model`` from them.

        Args:
            model: the freshly built classifier (already on ``device``).
            p: ``train_cls`` params.
            inputs: the trainer's extra input classifiers by name, each loaded by
                :func:`pipeline.steps.cls.load_classifier` onto ``device`` as a :data:`Classifier`
                ``(method, model, params)`` (model in eval mode), e.g. ``{"teacher": ...}``;
                empty when the stage has none.
            device: the training device.
        """

    def setup_data(self, p: dict, dataset, device: torch.device | str = "cpu") -> None:
        """Optional hook run once by :func:`pipeline.steps.cls.train_classifier` after
        :meth:`setup` and the training set are built, before the first :meth:`loss` (no-op by
        default); e.g. SMAF's teacher maps of every training image, computed once.

        Args:
            p: ``train_cls`` params.
            dataset: the :class:`pipeline.data.datasets.ClassificationDataset` of training
                (``root``, ``ids``, ``labels``, ``num_classes``, ``mean``, ``std``; item ``i``
                of a batch is ``dataset.ids[i]``).
            device: the training device.
        """

    @abstractmethod
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: dict,
             generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Training loss of one batch.

        Args:
            x: ``(B, 3, S, S)`` float32 normalised images.
            y: ``(B, C-1)`` float32 multi-hot foreground labels (``(B, C)``, background
                first, when :meth:`wants_background_label`).
            p: ``train_cls`` params (method section merged in).
            generator: torch Generator for the method's own randomness (views, masks).
            (the views of :meth:`extra_views`, e.g. ``base``, ``base_code``, when it is not
            None.)
        Returns:
            ``(scalar loss, {name: float})`` — the dict is logged.
        """

    def finish_maps(self, maps: dict[str, torch.Tensor], p: dict) -> dict[str, torch.Tensor]:
        """Turn merged maps into the stored ``seed_keys`` (default: unchanged).

        Called on what :meth:`maps` returned, after :func:`pipeline.steps.seeds.multiscale_maps`
        has upsampled and merged every key over the scales and flips (``(k, H, W)`` float32),
        or directly on one pass's token-grid maps by callers that use :meth:`maps` at token
        resolution (SMAF's teacher). A method whose stored map is a non-linear function of
        quantities that must be upsampled first (ViT-PCM's ``bpm_upsample: probs``) returns
        those quantities from :meth:`maps` and combines them here.

        Args:
            maps: ``{key: (k_key, h, w) float32}``; p: ``export_seeds`` params.
        Returns:
            ``{key: (k, h, w) float32 >= 0}`` with every ``seed_keys`` entry.
        """
        return maps

    @abstractmethod
    def maps(self, model: nn.Module, x: torch.Tensor, fg: torch.Tensor, p: dict) -> dict[str, torch.Tensor]:
        """Class maps of one image for its present classes.

        Args:
            x: ``(1, 3, H, W)`` float32 normalised image (one scale/flip of the export).
            fg: ``(k,)`` int64 0-based foreground class indices (VOC id - 1).
            p: ``export_seeds`` params.
        Returns:
            ``{key: (k, h, w) float32 >= 0}`` at the model's token/feature resolution, one
            entry per ``seed_keys`` (or the inputs of :meth:`finish_maps`); not yet
            normalised.
        """


#: A trained classifier as :func:`pipeline.steps.cls.load_classifier` returns it and
#: :meth:`Method.setup` receives it: ``(method, model, params)`` — the plug-in that trained
#: it, its model (on the device, eval mode) and its ``train_cls`` params.
Classifier = tuple[Method, nn.Module, dict]


def multilabel_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss (BCE with logits averaged over classes), the standard
    image-level classification loss of PSA/IRN/MCTformer. ``logits, y: (B, C-1)``."""
    return F.multilabel_soft_margin_loss(logits, y)


class ViTClassifier(nn.Module):
    """timm ViT + a classification head.

    ``head``: ``"cls_token"`` (timm's linear head on the class token; ACR), ``"gmp"`` /
    ``"gap"`` (global max / average pooling of patch tokens, then a bias-free linear layer
    acting as a 1x1 conv, so CAM = ``W^T F``; the CAM baseline).

    ``backbone.stem`` (optional): a hybrid ViT on a pretrained CNN stem
    (:func:`pipeline.models.vit.create_vit`).
    """

    def __init__(self, p: dict, num_classes: int):
        super().__init__()
        self.head_type = p.get("head", "cls_token")
        if self.head_type not in ("cls_token", "gmp", "gap"):
            raise ValueError(f"train_cls.head must be cls_token, gmp or gap, got {self.head_type!r}")
        bb = p["backbone"]
        n_vit = num_classes if self.head_type == "cls_token" else 0
        self.vit = vit_from_params(bb, n_vit)
        if self.head_type != "cls_token":
            self.classifier = nn.Linear(self.vit.num_features, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        if self.head_type == "cls_token":
            return self.vit(x)
        _, f = patch_tokens(self.vit, x)
        pooled = f.amax(1) if self.head_type == "gmp" else f.mean(1)
        return self.classifier(pooled)
