"""progsae's shared core: the progressive SAE codec, orderings, checkpoints, metrics.

Free of Ray and gRPC so the trainer, the server and any user script can import it.
"""

from .checkpoint import Checkpoint, CheckpointError, CheckpointMeta, load, save
from .codec import SAE, Codes, Rung, default_ladder
from .ordering import ImportanceAccumulator, Ordering

__all__ = [
    "SAE", "Codes", "Rung", "default_ladder", "Ordering", "ImportanceAccumulator",
    "Checkpoint", "CheckpointError", "CheckpointMeta", "load", "save",
]
