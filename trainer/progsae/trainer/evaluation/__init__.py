"""`progsae eval`: every metric at every rung of a checkpoint's ladder (results.py holds their types
and metrics.json), CE loss recovered by splicing into the language model, the (G, k') grid, and the
auto ladder `progsae order --ladder auto:R` stores."""
