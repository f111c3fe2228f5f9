"""GPU benchmark: ACR ViT-B/16 @384 training step time and export_seeds images/s.

``python -m bench gpu`` -> ``results/bench/gpu.json``. On a CUDA machine it measures the
paper-scale setting of the ``voc`` profile: timm ``vit_base_patch16_384`` (the ACR method,
``methods.acr`` settings), batch ``profiles.voc.train_cls.batch_size`` at crop 384, the
profile's ``amp`` (``off`` = fp32 for ACR, as its official code trains) + ``channels_last``,
without and with ``compile``; then the ACR seed export
(Eq. 7/8, which needs a backward per image) with the voc ``export_seeds`` scales and flip on
500 x 375 images (the typical VOC size). Inputs are synthetic tensors (the step time is that
of the model, not of JPEG decoding) and weights are random init (no download is attempted;
timings do not depend on weight values) - the JSON says so.

Without CUDA it says so in one line and measures a reduced CPU version (same architecture,
batch 2, 3 steps at crop 192, one 94 x 125 image, no compile) so the command is exercised;
``"device": "cpu"`` in the JSON.
"""
from __future__ import annotations

import sys
import time

import torch

from pipeline.engine.accel import amp_mode
from pipeline.io.config import load_params, stage_params

#: reduced CPU settings (the command is exercised, not a meaningful measurement): the full
#: 384 px version took 61 s per step and 52 s per exported image on 2 busy cores (7.3 min)
CPU = {"batch_size": 2, "steps": 3, "warmup": 0, "crop": 192, "images": 1, "image_hw": (94, 125),
       "compile": [False]}
#: CUDA settings (warm-up steps excluded from the timing; compile needs several)
GPU = {"steps": 20, "warmup": 5, "images": 10, "image_hw": (375, 500), "compile": [False, True]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step_time(method, p: dict, device, compile_: bool, bs: int, steps: int,
                     warmup: int) -> dict:
    from pipeline.engine.accel import Accel
    from pipeline.steps.cls import make_optimizer
    torch.manual_seed(0)
    acc = Accel(dict(p, compile=compile_), device, "bench")
    model = acc.prepare(method.build_model(p, 20).to(device).train())
    opt = make_optimizer(model, p)
    gen = torch.Generator().manual_seed(0)
    crop = int(p["crop"])
    x = torch.randn(bs, 3, crop, crop, device=device)
    y = (torch.rand(bs, 20, device=device) < 0.15).float()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with acc.autocast():
            loss, _ = method.loss(model, acc.input(x), y, p, gen)
        opt.zero_grad(set_to_none=True)
        acc.backward_step(loss, opt)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    out = {"compile": compile_, "batch_size": bs, "steps": steps, "warmup_steps": warmup,
           "step_s_median": round(times[len(times) // 2], 4), "step_s_min": round(times[0], 4),
           "images_per_s": round(bs / times[len(times) // 2], 2),
           "final_loss": round(float(loss.detach()), 4)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def _export_rate(method, p_cls: dict, p_exp: dict, device, n: int, hw) -> dict:
    from pipeline.engine.accel import Accel
    from pipeline.steps.seeds import multiscale_maps
    torch.manual_seed(0)
    acc = Accel(p_exp, device, "bench")
    model = acc.prepare(method.build_model(p_cls, 20).to(device).eval())
    rng = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (*hw, 3), generator=rng, dtype=torch.uint8).numpy()
            for _ in range(n + 1)]
    fg = torch.tensor([4, 14])                    # two present classes (VOC images: ~1.5)
    multiscale_maps(method, model, imgs[0], fg, p_exp, device, acc)   # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for im in imgs[1:]:
        multiscale_maps(method, model, im, fg, p_exp, device, acc)
    _sync(device)
    secs = time.perf_counter() - t0
    return {"images": n, "image_hw": list(hw), "scales": p_exp.get("scales"),
            "flip": p_exp.get("flip"), "seconds": round(secs, 3),
            "images_per_s": round(n / secs, 3)}


def gpu_bench(dataset: str = "voc", overrides: dict | None = None) -> dict:
    """ACR ViT-B/16 @384 train step time (with/without compile) and export images/s.

    Args:
        dataset: ignored (the settings are always those of the ``voc`` profile).
        overrides: test hook: ``{"train_cls": {...}, "export_seeds": {...}, "run": {...}}``
            merged over the voc settings / the CPU or GPU run settings.
    Returns:
        JSON-ready dict with ``device``, ``weights``, ``train`` (one row per compile
        setting), ``export``, ``summary``.
    """
    ov = overrides or {}
    cfg = load_params()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    run = dict(GPU if cuda else CPU, **ov.get("run", {}))
    if not cuda:
        print("[bench gpu] no CUDA GPU here: measuring a reduced CPU version (batch 2, 3 steps at "
              "crop 192, no compile); GPU numbers need a CUDA machine", file=sys.stderr)
    from pipeline.methods import get_method
    method = get_method("acr")
    p_cls = stage_params(cfg, "voc", "acr", "train_cls")
    p_cls["backbone"] = {"name": "vit_base_patch16_384", "pretrained": "none", "overrides": {}}
    p_cls.update(crop=int(run.get("crop", 384)), device=str(device))
    p_cls = {**p_cls, **ov.get("train_cls", {})}
    p_exp = {**stage_params(cfg, "voc", "acr", "export_seeds"), **ov.get("export_seeds", {})}
    bs = int(run.get("batch_size", p_cls["batch_size"]))
    train = [_train_step_time(method, p_cls, device, c, bs, int(run["steps"]), int(run["warmup"]))
             for c in run["compile"]]
    export = _export_rate(method, p_cls, p_exp, device, int(run["images"]), tuple(run["image_hw"]))
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    best = min(train, key=lambda r: r["step_s_median"])
    return {"device": name, "cuda": cuda,
            "backbone": p_cls["backbone"]["name"], "crop": int(p_cls["crop"]),
            "amp": amp_mode(p_cls.get("amp")), "channels_last": p_cls.get("channels_last"),
            "weights": "random init (no download attempted; timings do not depend on weight values)",
            "inputs": "synthetic tensors (model compute only, no data loading)",
            "reduced_cpu_version": not cuda, "train": train, "export": export,
            "summary": f"{name}: train step {best['step_s_median']}s (batch {bs}, "
                       f"compile={best['compile']}), export {export['images_per_s']} img/s"}
