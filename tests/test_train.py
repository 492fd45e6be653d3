"""Training: loss and dropout pieces against explicit references, loss falls on the shapes world,
SIGKILL + resume equals an uninterrupted run, warm start, 2-process DDP (gloo), NaN guard, CLI;
model sizes from the data's stats.json, checkpoints carrying stats and codec, lean milestones."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nbcore.data import Stats
from nbcore.model import NanoDiT, preset
from nbcore.train import (DROPOUT_CASES, NonFiniteLossError, TrainConfig, Trainer, _lr_lambda, batch_to_device,
                          check_fits_data, data_sizes, data_stats, flow_matching_loss, load_train_log,
                          model_config_for_data, parse_model_overrides, sample_dropout, sample_timesteps, train)
from nbcore.utils import load_checkpoint
from nbcore.validate import sample_grid_hook, validation_hook

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- stand-in batches

def stand_in_source(mcfg, B, n_batches=4, seed=0, nan_batches=()):
    """Plumbing stand-in for the loader: ``source(epoch, rank, world)`` yielding ``n_batches``
    random batches in the loader's dict format (padded captions of varied length). Batch number
    ``k`` (counted over the whole stream of a rank, from 0) in ``nan_batches`` has a NaN latent."""
    def source(epoch, rank=0, world=1):
        g = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + rank)
        for i in range(n_batches):
            lens = torch.randint(3, mcfg.text_len + 1, (B,), generator=g)
            L = int(lens.max())
            mask = torch.arange(L)[None] < lens[:, None]                               # (B, L)
            lat = torch.randn(B, mcfg.in_channels, mcfg.input_size, mcfg.input_size, generator=g)
            if epoch * n_batches + i in nan_batches:
                lat[0, 0, 0, 0] = float("nan")
            yield {"latent": lat, "dino_emb": torch.randn(B, mcfg.dino_dim, generator=g),
                   "dino_patches": torch.randn(B, mcfg.num_patches, mcfg.dino_dim, generator=g),
                   "text_emb": torch.randn(B, L, mcfg.text_dim, generator=g) * mask[..., None],
                   "text_mask": mask, "txt": ["stand-in"] * B, "key": [f"{rank}-{epoch}-{i}-{j}" for j in range(B)]}
    return source


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), steps=6, batch_size=4, log_every=1, ckpt_every=0, warmup=2,
                resume="none", progress=False, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _random_model(seed=0, **over):
    """A tiny model with every weight random (a fresh model predicts v = 0 everywhere)."""
    torch.manual_seed(seed)
    m = NanoDiT(preset("tiny", depth=1, hidden_size=32, num_heads=2, **over))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


# --------------------------------------------------------------------------- pieces

def test_sample_dropout_frequencies_match_config():
    n = 200_000
    for probs in [(0.10, 0.30, 0.05, 0.55), (0.25, 0.25, 0.25, 0.25), (0.0, 0.5, 0.0, 0.5)]:
        g = torch.Generator().manual_seed(1)
        drop_text, drop_dino = sample_dropout(n, probs, g)
        assert drop_text.shape == drop_dino.shape == (n,) and drop_text.dtype == torch.bool
        cases = {"both_dropped": drop_text & drop_dino, "text_only": ~drop_text & drop_dino,
                 "dino_only": drop_text & ~drop_dino, "both_kept": ~drop_text & ~drop_dino}
        for name, p in zip(DROPOUT_CASES, probs):
            freq = cases[name].float().mean().item()
            sd = math.sqrt(p * (1 - p) / n)
            assert abs(freq - p) <= 5 * sd + 1e-12, (probs, name, freq, p)
    with pytest.raises(ValueError, match="sum"):
        sample_dropout(4, (0.5, 0.5, 0.5, 0.5))


def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(100_000, "logit_normal", 0.0, 1.0, g)
    logit = torch.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1) < 0.02
    u = sample_timesteps(100_000, "uniform", generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01 and (u < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError):
        sample_timesteps(3, "bogus")


def test_flow_matching_loss_matches_reference():
    m = _random_model()
    mcfg = m.cfg
    raw = next(iter(stand_in_source(mcfg, 5)(0)))
    b = batch_to_device(raw, "cpu")
    assert b["text_emb"].shape[1] <= raw["text_emb"].shape[1] and b["text_mask"] is not None
    g = torch.Generator().manual_seed(3)
    t = torch.rand(5, generator=g)
    noise = torch.randn(raw["latent"].shape, generator=g)
    dt = torch.tensor([True, False, False, True, False])
    dd = torch.tensor([True, True, False, False, False])
    loss, aux = flow_matching_loss(m, b, t=t, noise=noise, drop_text=dt, drop_dino=dd, loss_bins=4)
    x0 = raw["latent"]
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    v = m(x_t, t, raw["dino_emb"], raw["dino_patches"], raw["text_emb"], raw["text_mask"], drop_text=dt, drop_dino=dd)
    ref = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))                               # (B,)
    torch.testing.assert_close(aux["per_sample"], ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref.mean(), rtol=1e-5, atol=1e-6)
    bins = (t * 4).long()
    for k in range(4):
        assert aux["bin_count"][k].item() == (bins == k).sum().item()
        torch.testing.assert_close(aux["bin_sum"][k], ref.detach()[bins == k].sum(), rtol=1e-5, atol=1e-6)
    # the generator path draws the same things from the same seed
    l1, _ = flow_matching_loss(m, b, generator=torch.Generator().manual_seed(9))
    l2, _ = flow_matching_loss(m, b, generator=torch.Generator().manual_seed(9))
    assert l1.item() == l2.item()


def test_lr_schedule_and_config_validation():
    cfg = TrainConfig(steps=110, warmup=10, lr_min_ratio=0.1)
    f = _lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert _lr_lambda(TrainConfig(schedule="constant", warmup=0))(500) == 1.0
    assert TrainConfig().dropout_probs == pytest.approx((0.10, 0.30, 0.05, 0.55))
    for bad in [dict(schedule="linear"), dict(p_drop_both=0.9), dict(steps=0), dict(timestep_sampling="x"),
                dict(warm_start_weights="both")]:
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError):
        parse_model_overrides("tiny", "{")
    with pytest.raises(ValueError, match="unknown ModelConfig"):
        parse_model_overrides("tiny", '{"nope": 1}')
    mc = TrainConfig(use_dino_patches=False, model=parse_model_overrides("tiny", '{"depth": 2}')).model_config()
    assert mc.use_dino_patches is False and mc.depth == 2 and mc.hidden_size == preset("tiny").hidden_size


# --------------------------------------------------------------------------- loop behaviour

def test_checkpoint_contents_and_nan_guard(tmp_path):
    mcfg = preset("tiny")
    # batches 2 and 3 (steps 3 and 4) carry a NaN: two skips in a row, K = 3 -> training goes on
    src = stand_in_source(mcfg, 4, nan_batches=(2, 3))
    cfg = _cfg(tmp_path, steps=7, nan_max_consecutive=3, ckpt_every=7, milestone_every=7)
    tr = Trainer(cfg, data=src)
    before = {}
    for step in range(1, 8):
        params = [p.detach().clone() for p in tr.model.parameters()]
        ema = [p.detach().clone() for p in tr.ema.module.parameters()]
        s = tr.train_step()
        changed = any(not torch.equal(a, b) for a, b in zip(params, tr.model.parameters()))
        ema_changed = any(not torch.equal(a, b) for a, b in zip(ema, tr.ema.module.parameters()))
        before[step] = (s["applied"], changed, ema_changed)
    assert [before[k][0] for k in range(1, 8)] == [True, True, False, False, True, True, True]
    for k, (applied, changed, ema_changed) in before.items():
        assert changed == applied and ema_changed == applied, k
    assert tr.skipped == 2 and tr.n_updates == 5
    assert tr.optimizer.state[next(iter(tr.model.parameters()))]["step"].item() == 5
    assert tr.scheduler.last_epoch == 5

    # checkpoint: every part present, readable with weights_only=True
    path = tr.checkpoint(milestone=True)
    assert (tmp_path / "run" / "ckpt" / "step_000007.pt").exists()
    ck = load_checkpoint(path)
    assert set(ck) >= {"config", "train_config", "model", "ema", "optimizer", "scheduler", "step", "rng", "data_state"}
    assert ck["step"] == 7 and ck["config"] == mcfg.to_dict() and ck["train_config"]["steps"] == 7
    assert ck["data_state"] == {"world_size": 1, "ranks": [{"epoch": 1, "index": 3}]}
    assert isinstance(ck["rng"]["python"]["state"], list) and ck["rng"]["numpy"]["keys"].shape == (624,)
    assert set(ck["model"]) == set(tr.model.state_dict())
    assert ck["stats"] is None and ck["codec"] is None                                # stand-in batches: no stats.json

    # K in a row raises with a clear message
    src = stand_in_source(mcfg, 4, nan_batches=(1, 2, 3, 4, 5))
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(_cfg(tmp_path, out=str(tmp_path / "nan"), steps=10, nan_max_consecutive=3), data=src)
    events = load_train_log(tmp_path / "nan", kind="event")
    assert events[-1]["event"] == "nan_stop" and events[-1]["step"] == 4
    recs = load_train_log(tmp_path / "nan")
    assert [r["skipped"] for r in recs] == [0, 1, 2] and recs[1]["loss"] is None   # NaN logged as null


def test_train_summary_and_log(tmp_path):
    mcfg = preset("tiny", use_dino_patches=False)
    cfg = _cfg(tmp_path, steps=6, log_every=2, use_dino_patches=False, grad_accum=2, schedule="constant")
    s = train(cfg, data=stand_in_source(mcfg, 4))
    assert s["steps"] == 6 and s["skipped"] == 0 and math.isfinite(s["final_loss"])
    assert Path(s["checkpoint"]).exists() and len(s["loss_by_bin"]) == cfg.loss_bins
    recs = load_train_log(s["log"])
    assert [r["step"] for r in recs] == [2, 4, 6]
    r = recs[-1]
    for key in ("loss", "loss_avg", "loss_bins", "v_pred_rms", "v_target_rms", "grad_norm", "samples_per_s", "lr"):
        assert r[key] is not None, key
    assert r["grad_norm_patch_proj"] is None                                          # no patches
    assert r["v_target_rms"] == pytest.approx(math.sqrt(2), rel=0.1)                 # unit latents and noise
    # grad_accum=2 with 4 batches per epoch: 6 steps took 12 batches = 3 epochs
    assert load_checkpoint(s["checkpoint"])["data_state"]["ranks"][0] == {"epoch": 2, "index": 4}
    # a fresh run (resume none) in the same folder starts a new log and keeps the old one aside
    train(_cfg(tmp_path, steps=2, log_every=1, use_dino_patches=False), data=stand_in_source(mcfg, 4))
    assert [r["step"] for r in load_train_log(tmp_path / "run")] == [1, 2]
    kept = list((tmp_path / "run").glob("log.*.jsonl"))
    assert len(kept) == 1 and [r["step"] for r in load_train_log(kept[0])] == [2, 4, 6]


def test_ema_update_rule():
    from nbcore.train import EMA
    m = _random_model()
    ema = EMA(m, decay=0.9)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m, n_updates=1)                       # warm-up decay min(0.9, 2 / 11)
    d = 2 / 11
    for e, s0, p in zip(ema.module.parameters(), start, m.parameters()):
        torch.testing.assert_close(e, d * s0 + (1 - d) * p)
        assert not e.requires_grad
    ema.update(m, n_updates=1000)                    # steady state: the configured decay
    for e, s0, p in zip(ema.module.parameters(), start, m.parameters()):
        torch.testing.assert_close(e, 0.9 * (d * s0 + (1 - d) * p) + 0.1 * p)


def test_grad_accumulation_and_clipping_match_reference(tmp_path):
    """The update applied after 2 micro-batches is the clipped mean of their gradients, computed
    here by hand with the same draws (t, noise, dropout) from the same generator."""
    import copy
    mcfg = preset("tiny")
    src = stand_in_source(mcfg, 3)
    tr = Trainer(_cfg(tmp_path, grad_accum=2, grad_clip=0.05), data=src)
    torch.manual_seed(5)
    with torch.no_grad():                         # random weights: a fresh model has zero gradients almost everywhere
        for p in tr.model.parameters():
            p.normal_(0, 0.05)
    ref = copy.deepcopy(tr.model)
    g = torch.Generator().manual_seed(0)
    g.set_state(tr.gen.get_state())
    captured = {}
    tr.optimizer.register_step_pre_hook(  # the gradients the optimiser is about to apply
        lambda opt, args, kwargs: captured.update({n: p.grad.clone() for n, p in tr.model.named_parameters()}))
    s = tr.train_step()
    losses = []
    for raw in list(src(0))[:2]:
        loss, _ = flow_matching_loss(ref, batch_to_device(raw, "cpu"), generator=g, probs=tr.cfg.dropout_probs)
        (loss / 2).backward()
        losses.append(loss.item())
    grads = {n: p.grad for n, p in ref.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in grads.values()])).item()
    assert s["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 0.05                # clipping is active
    assert s["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    for n, gr in grads.items():
        torch.testing.assert_close(captured[n], gr * (0.05 / (norm + 1e-6)), rtol=1e-4, atol=1e-8)


@pytest.mark.slow
def test_loss_falls_on_shapes_world(tmp_path, tiny_shards):
    cfg = TrainConfig(data=str(tiny_shards), out=str(tmp_path / "run"), steps=80, batch_size=8, lr=2e-3,
                      warmup=10, schedule="constant", log_every=1, ckpt_every=0, resume="none", progress=False)
    s = train(cfg)
    losses = [r["loss"] for r in load_train_log(s["log"])]
    assert len(losses) == 80 and s["skipped"] == 0
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)


@pytest.mark.slow
def test_warm_start_from_baseline(tmp_path):
    base_cfg = preset("tiny", use_dino_patches=False)
    s = train(_cfg(tmp_path, out=str(tmp_path / "base"), steps=3, use_dino_patches=False, milestone_every=3),
              data=stand_in_source(base_cfg, 4))
    base = load_checkpoint(s["checkpoint"])
    milestone = tmp_path / "base" / "ckpt" / "step_000003.pt"      # lean, as nbcore.experiment's warm arms read it
    assert "optimizer" not in load_checkpoint(milestone)
    cfg = _cfg(tmp_path, out=str(tmp_path / "patch"), steps=3, use_dino_patches=True, warm_start=str(milestone),
               lr=1e-3, warm_start_lr_scale=0.5)
    tr = Trainer(cfg, data=stand_in_source(preset("tiny"), 4))
    rep = tr.warm_report
    assert rep["new"] == tr.model.new_parameter_names() == ["dino_patch_proj.bias", "dino_patch_proj.weight",
                                                           "null_dino_patches"]
    assert rep["unexpected"] == [] and rep["mismatched"] == [] and set(rep["loaded"]) == set(base["model"])
    sd = tr.model.state_dict()
    for name in rep["loaded"]:
        assert torch.equal(sd[name], base["model"][name]), name
    ema_sd = tr.ema.state_dict()
    assert all(torch.equal(ema_sd[n], sd[n]) for n in sd)                             # EMA starts from the warm start
    assert [g["initial_lr"] for g in tr.optimizer.param_groups] == [5e-4, 5e-4]
    out = tr.run()
    assert out["steps"] == 3 and out["warm_start"] and math.isfinite(out["final_loss"])
    ev = [e for e in load_train_log(tmp_path / "patch", kind="event") if e["event"] == "warm_start"]
    assert ev and ev[0]["new"] == rep["new"] and ev[0]["lr_scale"] == 0.5
    # the patch path learns: its gradient norm is logged and non-zero
    assert all(r["grad_norm_patch_proj"] > 0 for r in load_train_log(tmp_path / "patch"))


def test_new_param_lr_scale_groups(tmp_path):
    """The patch parameters get lr x new_param_lr_scale (on top of the warm-start scale); every
    parameter sits in exactly one group; scale 1 keeps the two-group layout."""
    cfg = _cfg(tmp_path, steps=2, lr=1e-3, new_param_lr_scale=10.0, weight_decay=0.01)
    tr = Trainer(cfg, data=stand_in_source(preset("tiny"), 4))
    names = {id(p): n for n, p in tr.model.named_parameters()}
    lr_of = {names[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in tr.optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in tr.optimizer.param_groups) == len(names) == len(lr_of)
    assert lr_of["dino_patch_proj.weight"] == (pytest.approx(1e-2), 0.01)
    assert lr_of["dino_patch_proj.bias"] == (pytest.approx(1e-2), 0.0)
    assert lr_of["null_dino_patches"] == (pytest.approx(1e-2), 0.0)
    assert lr_of["dino_proj.weight"] == (pytest.approx(1e-3), 0.01) and lr_of["null_text"][0] == pytest.approx(1e-3)
    tr.run()                                   # the scheduler scales every group alike
    lrs = [g["lr"] / g["initial_lr"] for g in tr.optimizer.param_groups]
    assert max(lrs) == pytest.approx(min(lrs))
    plain = Trainer(_cfg(tmp_path, out=str(tmp_path / "plain"), steps=1), data=stand_in_source(preset("tiny"), 4))
    assert len(plain.optimizer.param_groups) == 2
    with pytest.raises(ValueError, match="new_param_lr_scale"):
        TrainConfig(new_param_lr_scale=0)


def test_train_config_in_checkpoints_old_and_new(tmp_path):
    """A checkpoint stores TrainConfig as plain dicts (its ModelConfig nested) and rebuilds it; a
    checkpoint of the older layout (``model_overrides`` JSON over the preset) still rebuilds, resumes,
    warm-starts and loads for sampling / validation."""
    from nbcore.sample import load_model_with_info
    from nbcore.utils import atomic_save
    over = {"depth": 1, "hidden_size": 32, "num_heads": 2}
    mcfg = preset("tiny", **over)
    cfg = _cfg(tmp_path, steps=2, model=mcfg, patch_pos_embed="sincos")
    s = train(cfg, data=stand_in_source(mcfg, 4))
    ck = load_checkpoint(s["checkpoint"])                                    # weights_only=True
    assert ck["train_config"]["model"] == mcfg.to_dict()
    assert TrainConfig.from_dict(ck["train_config"]) == cfg
    assert ck["config"] == TrainConfig.from_dict(ck["train_config"]).model_config().to_dict()
    assert ck["config"]["patch_pos_embed"] == "sincos" and ck["config"]["depth"] == 1

    old = dict(ck, train_config={**{k: v for k, v in ck["train_config"].items() if k != "model"},
                                 "model_overrides": json.dumps(over)})
    old_path = atomic_save(old, tmp_path / "old.pt")
    assert TrainConfig.from_dict(old["train_config"]).model_config() == cfg.model_config()
    assert TrainConfig.from_dict({"preset": "tiny", "model_overrides": ""}).model is None
    with pytest.raises(ValueError, match="lacks"):
        TrainConfig.from_dict({"preset": "tiny", "warp_drive": 1})
    # resume from it: step 2 -> 3, the same as resuming from the new layout
    a = train(_cfg(tmp_path, out=str(tmp_path / "a"), steps=3, model=mcfg, patch_pos_embed="sincos",
                   resume=str(old_path)), data=stand_in_source(mcfg, 4))
    b = train(_cfg(tmp_path, out=str(tmp_path / "b"), steps=3, model=mcfg, patch_pos_embed="sincos",
                   resume=s["checkpoint"]), data=stand_in_source(mcfg, 4))
    assert a["steps_this_run"] == 1 and a["final_loss"] == b["final_loss"]
    # warm start from it, and load it for sampling / validation
    tr = Trainer(_cfg(tmp_path, out=str(tmp_path / "w"), steps=1, model=mcfg, patch_pos_embed="sincos",
                      warm_start=str(old_path)), data=stand_in_source(mcfg, 4))
    assert tr.warm_report["new"] == [] and set(tr.warm_report["loaded"]) == set(ck["model"])
    model, info = load_model_with_info(old_path, device="cpu")
    assert model.cfg.to_dict() == ck["config"] and info["step"] == 2


# --------------------------------------------------------------------------- crash + resume

def _cli(args, out, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "nbcore.train", "--out", str(out), "--no-progress", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_shards):
    # 64 train samples, batch 8 -> 8 batches per epoch: the runs cross epochs
    args = ["--data", str(tiny_shards), "--steps", "20", "--batch-size", "8", "--log-every", "1",
            "--ckpt-every", "4", "--warmup", "3", "--lr", "1e-3"]
    ref = _cli(args, tmp_path / "ref")                          # uninterrupted, runs alongside
    victim = _cli(args, tmp_path / "victim")
    last = tmp_path / "victim" / "ckpt" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    ck = load_checkpoint(last)                                  # intact, weights_only=True
    k = ck["step"]
    assert 4 <= k < 20 and k % 4 == 0
    killed_steps = [r["step"] for r in load_train_log(tmp_path / "victim")]
    assert max(killed_steps) < 20

    resumed = _cli(["--resume", *args], tmp_path / "victim")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resumed from {last} at step {k}" in err
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-2000:]

    a = {r["step"]: r["loss"] for r in load_train_log(tmp_path / "ref")}
    b = {r["step"]: r["loss"] for r in load_train_log(tmp_path / "victim")}
    assert sorted(b) == list(range(1, 21))                      # log truncated at k, then continued
    assert b[k + 1] == a[k + 1]                                 # the step after the resume: bit-equal
    assert all(b[s] == a[s] for s in range(1, 21))              # and every other step
    fin_a, fin_b = load_checkpoint(tmp_path / "ref" / "ckpt" / "last.pt"), load_checkpoint(last)
    assert all(torch.equal(fin_a["ema"][n], fin_b["ema"][n]) for n in fin_a["ema"])
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 20


def test_cli_help_and_bad_arguments(tmp_path, capsys):
    from nbcore.cli.train import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "--warm-start" in help_text and "--use-dino-patches" in help_text and "--resume" in help_text
    for args, needle in [(["--out", str(tmp_path)], "--data"),
                         (["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist"),
                         (["--data", str(tmp_path), "--schedule", "linear"], "schedule"),
                         (["--data", str(tmp_path), "--steps", "x"], "invalid int")]:
        with pytest.raises(SystemExit) as e:
            main(args)
        msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code != 0 and needle in msg, (args, msg)


# --------------------------------------------------------------------------- DDP

def _ddp_worker(rank, world, port, out, data_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = TrainConfig(data=data_dir, out=out, steps=4, batch_size=8, log_every=2, ckpt_every=4, warmup=1,
                      lr=1e-3, resume="none", progress=False, device="cpu")
    tr = Trainer(cfg)
    keys, source = [], tr.stream.source
    tr.stream.source = lambda epoch: (keys.extend(b["key"]) or b for b in source(epoch))  # record what this rank saw
    summary = tr.run()
    torch.save({"model": tr.model.state_dict(), "ema": tr.ema.state_dict(), "keys": keys, "summary": summary},
               os.path.join(out, f"rank{rank}.pt"))
    tr.close()


@pytest.mark.slow
def test_ddp_two_processes_cpu_keep_parameters_equal(tmp_path, tiny_shards):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, port, out, str(tiny_shards)), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}/rank0.pt"), torch.load(f"{out}/rank1.pt")
    assert r0["keys"] and r1["keys"] and not set(r0["keys"]) & set(r1["keys"])    # data split per rank
    for part in ("model", "ema"):
        for n in r0[part]:
            assert torch.equal(r0[part][n], r1[part][n]), (part, n)
    assert r0["summary"]["final_loss"] == r1["summary"]["final_loss"]                 # reduced over ranks
    assert r0["summary"]["world_size"] == 2
    init = NanoDiT(preset("tiny")).state_dict()
    assert any(not torch.equal(init[n], r0["model"][n]) for n in init)               # it did train
    recs = load_train_log(out)
    assert [r["step"] for r in recs] == [2, 4]                                       # rank 0 alone wrote
    ck = load_checkpoint(f"{out}/ckpt/last.pt")
    assert ck["data_state"]["world_size"] == 2 and len(ck["rng"]["train"]) == 2


@pytest.mark.slow
def test_validation_and_sample_hooks(tmp_path, tiny_shards):
    cfg = TrainConfig(data=str(tiny_shards), out=str(tmp_path / "run"), steps=2, batch_size=8, log_every=1,
                      ckpt_every=0, val_every=2, sample_every=2, val_n=4, val_sample_steps=2, resume="none",
                      progress=False)
    train(cfg, val_fn=validation_hook, sample_fn=sample_grid_hook)     # the hooks the CLI wires
    val = load_train_log(tmp_path / "run", kind="val")
    assert len(val) == 1 and val[0]["step"] == 2 and "recon_psnr" in val[0] and val[0]["n"] == 4
    assert (tmp_path / "run" / "val" / "step_000002" / "metrics.json").exists()
    assert (tmp_path / "run" / "samples" / "step_000002.png").stat().st_size > 0
    # custom hooks get the trainer and the checkpoint just written; what they return is logged
    seen = []
    hook = lambda tr, path: seen.append((tr.step, load_checkpoint(path)["step"])) or {"custom": 1.5}  # noqa: E731
    train(_cfg(tmp_path, out=str(tmp_path / "run2"), steps=4, val_every=2), data=stand_in_source(preset("tiny"), 4),
          val_fn=hook)
    assert seen == [(2, 2), (4, 4)]
    assert [r["custom"] for r in load_train_log(tmp_path / "run2", kind="val")] == [1.5, 1.5]


def test_hooks_come_from_the_caller(tmp_path, capsys):
    """train() has no default hooks: val_every / sample_every without hooks only checkpoint; a hook
    raising HookUnavailable is turned off after its first call."""
    from nbcore.utils import HookUnavailable
    train(_cfg(tmp_path, steps=4, val_every=2, sample_every=2), data=stand_in_source(preset("tiny"), 4))
    assert load_train_log(tmp_path / "run", kind="val") == []
    assert not (tmp_path / "run" / "val").exists() and not (tmp_path / "run" / "samples").exists()
    assert "no val_fn given" in capsys.readouterr().err
    calls = []

    def unavailable(trainer, path):
        calls.append(trainer.step)
        raise HookUnavailable("nothing to validate on")
    train(_cfg(tmp_path, out=str(tmp_path / "run2"), steps=6, val_every=2), data=stand_in_source(preset("tiny"), 4),
          val_fn=unavailable)
    assert calls == [2] and "val hook off: nothing to validate on" in capsys.readouterr().err


def test_skip_allowance_and_model_override_checks():
    from nbcore.train import check_model_config, skip_allowance
    assert [skip_allowance(0.01, n) for n in (0, 1, 100, 101, 1000)] == [0, 1, 1, 2, 10]   # rounded up
    assert skip_allowance(50, 10) == 50 and skip_allowance(0, 10 ** 6) == 0
    base = preset("tiny")
    assert check_model_config(base, {"depth": 2}).depth == 2
    for ov, needle in [({"num_heads": 0}, "must be > 0"), ({"depth": "3"}, "must be int"), ({"depth": True}, "must be int"),
                       ({"mlp_ratio": float("nan")}, "must be float"), ({"hidden_size": 30, "num_heads": 4}, "not divisible"),
                       ({"input_size": 33}, "not divisible by patch_size"), ({"nope": 1}, "unknown ModelConfig field")]:
        with pytest.raises(ValueError, match=needle):
            check_model_config(base, ov)
    with pytest.raises(ValueError, match="max_skips must be"):
        TrainConfig(max_skips=2.5)


# --------------------------------------------------------------------------- model sizes from the data

def _real_like_stats(image_size=32, n=14) -> Stats:
    """Statistics laid out as ``nbcore.encoders.precompute`` writes them: 4-channel VAE latents
    (downsample 2), 32-d DINO with 196 patches per image, 16-d T5, aspect buckets."""
    entries = {name: {"mean": [0.0] * d, "std": [1.0] * d, "count": n * rows}
               for name, d, rows in (("dinov3", 32, 1), ("dinov3_patches", 32, 196), ("t5", 16, 9), ("latent", 4, 256))}
    vae = {"kind": "vae", "path": "/models/vae", "scaling_factor": 0.13, "shift_factor": 0.0, "channels": 4,
           "downsample": 2, "dtype": "float32"}
    return Stats(entries, {"image_size": image_size, "buckets": [[40, 24], [32, 32], [24, 40]], "codec": vae})


def test_model_config_for_data_takes_the_sizes_of_the_stats():
    st = _real_like_stats()
    assert data_sizes(st) == {"in_channels": 4, "input_size": 16, "text_dim": 16, "dino_dim": 32, "dino_grid": 14}
    tiny = preset("tiny")
    cfg = model_config_for_data(tiny, st)
    assert cfg == replace(tiny, in_channels=4, input_size=16, text_dim=16, dino_dim=32, dino_grid=14)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.text_len) == (96, 3, 4, 2, 32)  # the preset's
    # older data records less (no latent entry, no image size or codec; P not a square): those stay the preset's
    old = Stats({**{k: v for k, v in st.entries.items() if k != "latent"},
                 "dinov3_patches": {"mean": [0.0] * 32, "std": [1.0] * 32, "count": 14 * 200}}, {})
    assert data_sizes(old) == {"text_dim": 16, "dino_dim": 32}
    assert model_config_for_data(tiny, old) == replace(tiny, text_dim=16, dino_dim=32)
    with pytest.raises(ValueError, match="input_size 15 not divisible by patch_size 2"):
        model_config_for_data(tiny, _real_like_stats(image_size=30))
    # sizes that contradict the data: one line naming both; the grid counts only with patches
    with pytest.raises(ValueError) as e:
        check_fits_data(replace(cfg, dino_dim=1024, text_dim=4096), st, "preset production", "DATA/stats.json")
    assert str(e.value) == ("data has text_dim 16, dino_dim 32 (DATA/stats.json), "
                            "the model text_dim 4096, dino_dim 1024 (preset production)")
    check_fits_data(replace(cfg, use_dino_patches=False, dino_grid=8), st, "a pre-patch model")
    # --model-overrides: architecture over the data's sizes; a pinned size must agree with the data
    over = parse_model_overrides("tiny", '{"hidden_size": 32, "num_heads": 2, "patch_tie": true}', stats=st)
    assert over == replace(cfg, hidden_size=32, num_heads=2, patch_tie=True)
    assert parse_model_overrides("tiny", '{"dino_dim": 32}', stats=st) == cfg
    with pytest.raises(ValueError, match=r"^data has dino_dim 32 \(stats.json\), the model dino_dim 1024 \(--model-overrides\)$"):
        parse_model_overrides("tiny", '{"dino_dim": 1024}', stats=st)
    # TrainConfig: model None takes the data's sizes; an explicit model is checked against them
    assert TrainConfig(preset="tiny").model_config(st) == cfg
    assert TrainConfig(preset="tiny", use_dino_patches=False).model_config(st) == replace(cfg, use_dino_patches=False)
    with pytest.raises(ValueError, match=r"the model in_channels 12, input_size 32, text_dim 64, dino_dim 64, "
                                         r"dino_grid 8 \(TrainConfig.model\)$"):
        TrainConfig(preset="tiny", model=tiny).model_config(st)


def test_shapes_world_data_gives_its_presets_config(tmp_path, tiny_shards):
    """Shapes-world data at its own preset, and the experiment's data at its profile's model, give
    exactly the ModelConfig they gave before sizes came from the data."""
    from nbcore import experiment as ex
    from nbcore.shapes import make_dataset
    assert model_config_for_data(preset("tiny"), data_stats(tiny_shards)) == preset("tiny")
    assert TrainConfig(preset="tiny", data=str(tiny_shards)).model_config(data_stats(tiny_shards)) == preset("tiny")
    p = ex.PROFILES["cpu"]
    run = tmp_path / "exp"
    make_dataset(run / "data", 12, seed=0, val_fraction=0.2, cfg=p.model_config(), rules=p.world, progress=False)
    st = data_stats(run / "data")
    for arm in p.arms + ex.SECONDARY_ARMS:
        assert ex.train_config(p, arm, run).model_config(st) == p.model_config(arm), arm
        assert model_config_for_data(p.model_config(arm), st) == p.model_config(arm), arm


@pytest.fixture(scope="module")
def micro_shards(tmp_path_factory):
    """Shapes-world data at the micro preset's sizes (16x16 latents, a 4x4 DINO grid): 16 train samples."""
    from nbcore.shapes import make_dataset
    return make_dataset(tmp_path_factory.mktemp("micro_shards"), n=20, seed=0, preset="micro", val_fraction=0.2,
                        shard_size=8, progress=False)


def test_training_takes_the_datas_sizes_and_checkpoints_carry_stats_and_codec(tmp_path, micro_shards, tiny_shards,
                                                                               capsys):
    from nbcore.codec import codec_from_spec
    from nbcore.pretrained import checkpoint_step, from_pretrained, save_pretrained
    from nbcore.cli.train import main
    data = tmp_path / "data"
    shutil.copytree(micro_shards, data)
    stats_json = json.loads((data / "stats.json").read_text())
    cfg = TrainConfig(preset="tiny", model=preset("tiny", depth=1), data=str(data), out=str(tmp_path / "run"),
                      steps=2, batch_size=4, warmup=1, ckpt_every=2, milestone_every=2, resume="none", progress=False)
    # an explicit model that does not fit the data: one line naming both sizes
    with pytest.raises(ValueError, match="^" + re.escape(f"data has input_size 16, dino_grid 4 ({data / 'stats.json'}), "
                                                         "the model input_size 32, dino_grid 8 (TrainConfig.model)") + "$"):
        Trainer(cfg)
    # the preset alone (model None): the tiny architecture at the micro data's sizes
    cfg = replace(cfg, model=None)
    tr = Trainer(cfg)
    assert tr.model_cfg == replace(preset("tiny"), input_size=16, dino_grid=4)
    s = tr.run()
    tr.close()
    last = load_checkpoint(s["checkpoint"])                                           # weights_only=True
    assert last["stats"] == stats_json and last["codec"] == stats_json["meta"]["codec"]
    assert last["codec"]["kind"] == "pixel" and last["config"] == tr.model_cfg.to_dict()
    assert last["train_config"]["model"] is None
    # the milestone is lean: model + EMA and the small state, no optimiser or scheduler
    ms_path = tmp_path / "run" / "ckpt" / "step_000002.pt"
    ms = load_checkpoint(ms_path)
    assert set(last) - set(ms) == {"optimizer", "scheduler"} and "optimizer" not in ms
    assert ms["stats"] == stats_json and ms["codec"] == last["codec"] and ms["data_state"] == last["data_state"]
    assert all(torch.equal(ms["ema"][n], last["ema"][n]) for n in last["ema"])
    assert ms_path.stat().st_size < 0.6 * Path(s["checkpoint"]).stat().st_size   # AdamW's moments: 2 x the weights
    assert checkpoint_step(ms_path) == 2
    # the checkpoint alone says how to normalise and decode: export with the data folder gone
    data.rename(tmp_path / "moved")
    model, info = from_pretrained(save_pretrained(s["checkpoint"], tmp_path / "model"), device="cpu")
    assert model.cfg == tr.model_cfg and info["codec"] == stats_json["meta"]["codec"]
    assert info["stats"].entries == Stats.load(tmp_path / "moved" / "stats.json").entries
    assert info["stats"].meta == stats_json["meta"] and info["training"]["step"] == 2
    assert codec_from_spec(info["codec"]).channels == 12
    # resuming this run on data of other sizes names both
    other = replace(cfg, data=str(tiny_shards), resume="auto", steps=3)
    with pytest.raises(ValueError, match=re.escape(
            f"cannot resume from {tmp_path / 'run' / 'ckpt' / 'last.pt'}: the checkpoint has input_size 16, dino_grid 4, "
            f"this run input_size 32, dino_grid 8 (sizes from {tiny_shards / 'stats.json'})")):
        Trainer(other)
    # the CLI: sizes from the data, pinned architecture over them; a pinned size against the data refused
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path / "moved"), "--out", str(tmp_path / "cli"), "--model-overrides", '{"dino_dim": 1024}'])
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code != 0 and msg.endswith(f"data has dino_dim 64 ({tmp_path / 'moved' / 'stats.json'}), "
                                              "the model dino_dim 1024 (--model-overrides)"), msg
    assert main(["--data", str(tmp_path / "moved"), "--out", str(tmp_path / "cli"), "--steps", "1", "--batch-size", "4",
                 "--no-progress", "--model-overrides", '{"depth": 1, "hidden_size": 32, "num_heads": 2}']) == 0
    assert load_checkpoint(tmp_path / "cli" / "ckpt" / "last.pt")["config"] == replace(
        preset("tiny"), input_size=16, dino_grid=4, depth=1, hidden_size=32, num_heads=2).to_dict()
