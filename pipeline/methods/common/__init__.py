"""Helpers shared by several method plug-ins, one module per topic:

* :mod:`.par` — Pixel-Adaptive Refinement (AFA Eq. 8-10) and PAR-refined labels of
  background-first maps (AFA, MCC);
* :mod:`.cam_labels` — CAM-to-label with two background scores (AFA Eq. 4), the "high/low"
  combination, PAR-refined CAM labels (AFA, MCC);
* :mod:`.token_affinity` — affinity labels at the token grid and the random walk with a
  learned affinity (AFA Sec. 3.3, Eq. 6-7; MCC);
* :mod:`.tokens` — token-permuting spatial transforms and their inverse (ACR, ViT-PCM).

Plug-in code: nothing here imports the host (``pipeline.steps.cls``, ``stages``) or a method.
"""
