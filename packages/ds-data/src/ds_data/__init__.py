"""ds_data: Data efficiency: curriculum learning, data analyzer and sampler, random-LTD.

Entry points: `ds_data.integration.DataEfficiency` (for training engines), `DataAnalyzer`
(build metric indexes), `CurriculumSampler` (draw batches from the curriculum window).
Submodules import torch/transformers only where needed.
"""

__version__ = "0.1.0"
