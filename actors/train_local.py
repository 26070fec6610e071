"""Single-process training: the loop lives in models/training.py (Ray-free, shared by local training, the Ray
Train workers, QAT and the sweep); these names stay importable from here for the callers that use them."""

from models.training import (  # noqa: F401
    BNSample,
    EpochStats,
    FitResult,
    TrainConfig,
    evaluate,
    fit_epochs,
    fit_local,
    make_optimizer,
    optimizer_step,
    recompute_bn_stats_,
    shuffled_batches,
    train_epoch,
    train_one_epoch,
)
