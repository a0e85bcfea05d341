"""Ray Tune sweeps over training runs: throughput (the fastest batch/workers/amp/cache) and accuracy
(hyperparameters for the best mAP)."""
