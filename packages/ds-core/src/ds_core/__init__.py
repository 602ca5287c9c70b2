"""ds_core: Foundation of the ds packages: config, accelerator, communication, topology, logging."""

__version__ = "0.1.0"
