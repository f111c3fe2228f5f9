"""Engine: the machinery every step shares (training loop, evaluation, inference)."""
