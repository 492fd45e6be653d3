"""nbcore: NanoDiT with DINOv3 patch conditioning, as an interactive experimentation suite.

Modules: model (NanoDiT, presets, arms, warm start), attention (routing capture), shapes (embedded
shapes world + stand-in encoders), encoders (real DINOv3 / T5 from local weights, precompute),
codec (pixel codec / VAE behind one interface), data (WebDataset pipeline, shard check), train,
sample, metrics, validate, experiment (profiles, arms, schedule, calibrated evaluation), notebooks
(per-notebook context), runner (papermill runner), analysis, viz, demo, bench, pretrained
(save_pretrained / from_pretrained), utils.
"""
__version__ = "0.1.0"
