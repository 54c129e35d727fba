"""`progsae interp` (measure.py): interpretability per granularity band, offline: simulation
correlation, feature splitting and first-letter absorption."""
