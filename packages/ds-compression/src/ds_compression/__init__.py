"""ds_compression: Model compression: ZeroQuant, XTC, pruning, low-rank, QAT, export."""

__version__ = "0.1.0"
