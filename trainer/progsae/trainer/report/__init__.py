"""`progsae report` (write.py): report.md and PNG figures from evaluated checkpoints: their curves
(curves.py), the paper's claims checked on them (claims.py), figures (plots.py) and the interp
section (interp_section.py)."""
