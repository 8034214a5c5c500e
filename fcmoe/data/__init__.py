"""Data: offline assets, corpora, partitions (imports no model code)."""
