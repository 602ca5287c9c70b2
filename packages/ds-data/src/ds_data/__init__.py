"""ds_data: Data efficiency: curriculum learning, data analyzer and sampler, random-LTD."""

__version__ = "0.1.0"
