"""The data analyzer: per-sample metrics -> memory-mapped metric indexes."""

from ds_data.analyzer.analyzer import DataAnalyzer
from ds_data.analyzer.datasets import FlatTokenDataset, write_flat_token_dataset
from ds_data.analyzer.index import MetricIndex, build_index
from ds_data.analyzer.metrics import BUILTIN_METRICS, Metric, sample_tokens

__all__ = [
    "BUILTIN_METRICS",
    "DataAnalyzer",
    "FlatTokenDataset",
    "Metric",
    "MetricIndex",
    "build_index",
    "sample_tokens",
    "write_flat_token_dataset",
]
