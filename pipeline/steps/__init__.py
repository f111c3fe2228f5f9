"""Steps: one module per DAG step (classifier training, seeds, refinement, pseudo labels,
DeepLabV2 training and test, own head, comparison, report); the stage CLIs in stages/ call them."""
