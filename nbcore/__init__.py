"""nbcore: NanoDiT with DINOv3 patch conditioning, as an interactive experimentation suite.

Modules (docs/DESIGN.md lists them by layer): model (NanoDiT, presets, arms, warm start;
``NanoDiT.from_pretrained`` / ``save_pretrained``), attention (routing capture), shapes (embedded
shapes world + stand-in encoders), encoders (real DINOv3 / T5 from local weights, precompute),
codec (pixel codec / VAE behind one interface), stats (stats.json), data (WebDataset pipeline,
shard check), tar_reader, sizes (the model sizes a dataset fixes), flow (the flow-matching loss),
train_config, train (Trainer), stream, ema, train_log, distributed, checkpoint (the checkpoint
format), model_folder (the model folder format), sample, metrics, validate, experiment (profiles,
arms, schedule, calibrated evaluation), notebooks (per-notebook context), runner (papermill
runner), analysis, viz, demo, bench, pretrained (save_pretrained / from_pretrained as functions),
pipeline (a model folder to images in one call), tracking (TensorBoard beside log.jsonl), compare
(two runs side by side), utils; cli (the command lines).
"""
__version__ = "0.1.0"
