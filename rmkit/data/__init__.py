"""Data layer: canonical preference records, readers for every format, mixing, splitting,
statistics, and tokenization/collation. Nothing here touches torch.distributed."""
