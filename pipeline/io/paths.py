"""Artifact paths of the DAG, shared by the Snakefile, the stage CLIs and dvc.yaml."""
from __future__ import annotations


def manifest(dataset: str) -> str:
    return f"results/{dataset}/dataset.json"


def artifacts(dataset: str, method: str) -> dict[str, str]:
    """Every output path of one (dataset, method) chain."""
    d = f"results/{dataset}/{method}"
    return {
        "cls_model": f"{d}/cls/model.pt", "cls_metrics": f"{d}/cls/metrics.json",
        "seeds": f"{d}/seeds.h5", "seeds_miou": f"{d}/seeds_miou.json",
        "aff_model": f"{d}/affinity/model.pt", "aff_metrics": f"{d}/affinity/metrics.json",
        "refined": f"{d}/refined.h5", "refined_miou": f"{d}/refined_miou.json",
        "pseudo": f"{d}/pseudo", "pseudo_miou": f"{d}/pseudo_miou.json",
        "seg_model": f"{d}/seg/model.pt", "seg_metrics": f"{d}/seg/metrics.json",
        "predictions": f"{d}/predictions", "miou": f"{d}/miou.json",
        "own_seg_miou": f"{d}/own_seg_miou.json",
    }
