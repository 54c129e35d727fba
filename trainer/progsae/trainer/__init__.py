"""progsae trainer: from a language model's activations to an evaluated, ordered, reported SAE.

Subpackages, each importing only those listed after it (no cycles):

    report/      `progsae report`: report.md and figures from evaluated checkpoints
    interp/      `progsae interp`: simulation, splitting and absorption per granularity band
    training/    `progsae train`: config, the training loop, its losses and resumable state
    evaluation/  `progsae eval`: every metric per rung, CE splice, the (G, k') grid, auto ladders
    data/        activation caches (format, outlier policy), corpora, `progsae harvest`

Two commands are single modules beside them: `order.py` (`progsae order`: pruning orderings)
and `features.py` (`progsae features`: feature cards for the dashboard).
"""
