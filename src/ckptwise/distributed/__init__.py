"""Multi-process runs (``torchrun``, DDP, FSDP2): every rank saves, rank 0 commits.

:mod:`.ranks` is the checkpoint's own process group and its few collectives; :mod:`.save`
the protocol by which all ranks write one checkpoint and rank 0 commits it; :mod:`.restore`
how a rank reads its part back, on the same or another number of ranks; :mod:`.shards` the
chunks of tensors sharded across ranks (``DTensor``).
"""

__all__: list[str] = []
