"""nbcore: NanoDiT with DINOv3 patch conditioning, as an interactive experimentation suite.

Modules: model (NanoDiT, presets, warm start), attention (routing capture), shapes (embedded
shapes world + stand-in encoders), encoders (real DINOv3 / T5 / VAE from local weights), data
(WebDataset pipeline, shard check), train, sample, metrics, validate, viz, notebooks (runner),
bench, utils.
"""
__version__ = "0.1.0"
