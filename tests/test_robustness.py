"""Robustness, tried as a hostile-but-fair user: nothing vanishes silently, resume survives a bad
checkpoint, every user error is one clear line (exit 2 for bad arguments), never advice to load
with ``weights_only=False``.

1. NaN / Inf guidance scales are refused; metrics files are strict JSON.
2. A shard cut inside a tar header is reported (tarfile reads it as a clean end).
3. ``nbcore.data check`` and training agree on the same bad shards; training skips and counts them.
4. Resume falls back from an unreadable ``last.pt`` to the newest readable milestone.
5. Non-checkpoints and other bad arguments are refused in one line.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nbcore.data import DataError, Stats, check_shards, make_loader, shard_list, shard_samples
from nbcore.model import preset
from nbcore.train import TooManySkipsError, TrainConfig, Trainer, _lr_lambda, load_train_log, parse_model_overrides, train
from nbcore.utils import CheckpointError, atomic_save, load_checkpoint, write_json

REPO = Path(__file__).resolve().parents[1]
SMALL = '{"depth": 1, "hidden_size": 32, "num_heads": 2}'   # tiny preset sizes, a fast model
SMALL_MODEL = parse_model_overrides("tiny", SMALL)


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Raw samples {"__key__", member: bytes} -> a tar, members in order."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for name, data in s.items():
                if name.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def copy_data(src: Path, dst: Path) -> Path:
    """A private copy of the shared shapes-world folder (shards, stats.json with the shard counts)."""
    shutil.copytree(src, dst)
    return dst


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity tokens (what strict JSON parsers do)."""
    def no(tok):
        raise ValueError(f"non-finite token {tok}")
    return json.loads(text, parse_constant=no)


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)


def one_line(stderr: str, after_progress: bool = False) -> str:
    """The error output must be exactly one line (no traceback); ``after_progress``: the last line,
    after status lines and a progress bar."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr and "weights_only=False" not in stderr, stderr[-2000:]
    if not after_progress:
        assert len(lines) == 1, stderr[-2000:]
    return lines[-1]


# --------------------------------------------------------------------------- 1. NaN guidance, strict JSON

@pytest.mark.parametrize("flag,value", [("--text-scale", "nan"), ("--dino-scale", "inf"), ("--patch-scale", "-inf"),
                                        ("--interval", "nan")])
def test_nonfinite_guidance_scale_refused(tiny_shards, tmp_path, capsys, flag, value):
    from nbcore.cli.validate import main
    ck = atomic_save({"config": {}, "model": {}}, tmp_path / "c.pt")   # never read: the arguments fail first
    args = [str(ck), "--data", str(tiny_shards), "--out", str(tmp_path / "o"), f"{flag}={value}"]
    if flag == "--interval":
        args[-1:] = [flag, value]
        args.append("1.0")
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert "finite" in line and flag in line, line
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_metrics_json_is_strict_with_reasons(tmp_path):
    path = write_json({"settings": {"n": 4}, "checkpoints": {"a.pt": {"recon_psnr": float("nan"), "swap": 0.25,
                                                                      "bins": [1.0, float("inf")]}}},
                      tmp_path / "metrics.json")
    d = strict_json(path.read_text())
    assert d["checkpoints"]["a.pt"] == {"recon_psnr": None, "swap": 0.25, "bins": [1.0, None]}
    assert d["nonfinite"] == {"checkpoints.a.pt.recon_psnr": "nan", "checkpoints.a.pt.bins[1]": "inf"}
    assert d["settings"] == {"n": 4}


# --------------------------------------------------------------------------- 2. header cut

def _header_offset(data: bytes, key: str) -> int:
    """Byte offset of the tar header of ``key``'s first member."""
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return next(m.offset for m in t.getmembers() if m.name.startswith(key + "."))


@pytest.mark.parametrize("index", [True, False], ids=["with_recorded_counts", "without"])
def test_shard_cut_inside_a_header_is_reported(tiny_shards, tmp_path, index):
    data_dir = copy_data(tiny_shards, tmp_path / "d")
    if not index:                                              # data written elsewhere: no recorded counts
        st = json.loads((data_dir / "stats.json").read_text())
        del st["meta"]["shards"]
        (data_dir / "stats.json").write_text(json.dumps(st))
    shard = data_dir / "train-000000.tar"
    data = shard.read_bytes()
    keys = [r["__key__"] for r in shard_samples([{"url": str(shard)}])]
    assert len(keys) == 16
    cut = _header_offset(data, keys[10]) + 300                 # inside the header of sample 10
    shard.write_bytes(data[:cut])
    with tarfile.open(shard) as t:                             # what fooled the check: tarfile sees a clean end
        assert len({m.name.split(".")[0] for m in t.getmembers()}) == 10

    res = check_shards(str(shard), progress=False)
    lost = 6 if index else 1                                   # the recorded count makes the loss exact
    assert res["good"] == 10 and res["skipped"] == {"truncated_tar": lost}
    assert res["samples"] == 10 + lost
    r = cli("nbcore.data", "check", str(shard), "--strict")
    assert r.returncode != 0
    assert "truncated_tar" in r.stderr and "train-000000.tar" in r.stderr and "end-of-archive" in r.stderr
    # training's loader reports it the same way
    loader = make_loader(str(shard), 4, shuffle=0, on_error="skip")
    assert sum(len(b["key"]) for b in loader) == 10 and dict(loader.counts.skipped) == {"truncated_tar": lost}
    with pytest.raises(DataError, match="truncated_tar"):
        list(make_loader(str(shard), 4, shuffle=0))


def test_cut_at_every_offset_of_a_small_shard_is_reported(tmp_path):
    """A 3-sample tar cut at every 128th byte: every cut that loses a sample is reported."""
    g = np.random.default_rng(0)
    samples = [{"__key__": f"k{i}", "latent.npy": npy(g.standard_normal((2, 4, 4)).astype(np.float16)),
                "dinov3.npy": npy(g.standard_normal(8).astype(np.float32)),
                "dinov3_patches.npy": npy(g.standard_normal((4, 8)).astype(np.float16)),
                "t5.npy": npy(g.standard_normal((3, 6)).astype(np.float16)), "txt": b"x"} for i in range(3)]
    full = write_tar(tmp_path / "full.tar", samples).read_bytes()
    end = len(full)
    with tarfile.open(fileobj=io.BytesIO(full)) as t:
        end = max(m.offset_data + m.size for m in t.getmembers())   # the last member's last data byte
    cut_file = tmp_path / "cut.tar"
    for off in range(1, end, 128):
        cut_file.write_bytes(full[:off])
        res = check_shards(str(cut_file), progress=False, stats=None)
        assert res["skipped"].get("truncated_tar", 0) >= 1, off
        assert res["good"] < 3, off


def test_corrupt_header_mid_shard_is_reported(tiny_shards, tmp_path):
    """Found on the way: a corrupt header (one flipped byte) after the first member also reads as a
    clean end in tarfile; the samples behind it were lost without a word."""
    data_dir = copy_data(tiny_shards, tmp_path / "d")
    shard = data_dir / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    keys = [r["__key__"] for r in shard_samples([{"url": str(shard)}])]
    data[_header_offset(bytes(data), keys[12]) + 100] ^= 0xFF           # the mode field: checksum mismatch
    shard.write_bytes(bytes(data))
    res = check_shards(str(shard), progress=False)
    assert res["good"] == 12 and res["skipped"] == {"truncated_tar": 4} and res["samples"] == 16
    with pytest.raises(DataError, match="no readable tar header"):
        check_shards(str(shard), progress=False, strict=True)


# --------------------------------------------------------------------------- 3. check and training agree

def _bad_shards(data_dir: Path) -> int:
    """Add two shards that pass a sample-by-sample check but not the data's / model's sizes:
    16 patch rows instead of 64, and a text dim of 63 instead of 64. Returns the bad samples added."""
    raws = list(shard_samples([{"url": str(data_dir / "train-000000.tar")}]))[:4]
    few, narrow = [], []
    for i, r in enumerate(raws):
        patches = np.load(io.BytesIO(r["dinov3_patches.npy"]))
        t5 = np.load(io.BytesIO(r["t5.npy"]))
        few.append({**r, "__key__": f"few-patches-{i}", "dinov3_patches.npy": npy(patches[:16])})
        narrow.append({**r, "__key__": f"narrow-text-{i}", "t5.npy": npy(t5[:, :63])})
    write_tar(data_dir / "train-000004.tar", few)
    write_tar(data_dir / "train-000005.tar", narrow)
    return len(few) + len(narrow)


def test_check_and_training_agree_on_bad_shards(tiny_shards, tmp_path):
    data_dir = copy_data(tiny_shards, tmp_path / "d")
    n_bad = _bad_shards(data_dir)

    r = cli("nbcore.data", "check", str(data_dir / "train-*.tar"), "--preset", "tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["good"] == 64 and summary["skipped"] == {"wrong_shape": n_bad}
    assert "train-000004.tar: 4 samples, 4 with patches, 0 good, skipped {'wrong_shape': 4}" in r.stdout
    # the data's own stats.json already fixes P (row counts) and Dt: the check agrees without a preset
    assert check_shards(shard_list(data_dir, "train"), progress=False)["skipped"] == {"wrong_shape": n_bad}

    # training: skipped and counted by reason (log and summary), one epoch = 64 good samples = 8 batches
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), steps=9, batch_size=8, log_every=1,
                      shuffle=0, warmup=1, resume="none", progress=False, model=SMALL_MODEL, max_skips=n_bad)
    s = train(cfg)
    assert s["data_skipped"] == {"wrong_shape": n_bad}
    assert s["data_samples"] == 64 + 8                      # epoch 1, and the first batch of epoch 2
    recs = load_train_log(tmp_path / "run")
    assert recs[-1]["data_skipped"] == {"wrong_shape": n_bad} and recs[-1]["step"] == 9
    assert recs[0]["data_skipped"] == {} and recs[0]["data_samples"] == 8   # bad shards come last (shuffle 0)
    end = load_train_log(tmp_path / "run", kind="event")[-1]
    assert end["event"] == "end" and end["data_skipped"] == {"wrong_shape": n_bad}

    # past the limit (default 1% of the samples read): a clear stop, logged
    with pytest.raises(TooManySkipsError, match=rf"{n_bad} bad samples skipped of 80 read \(wrong_shape {n_bad}\)"):
        train(replace(cfg, out=str(tmp_path / "limit"), max_skips=0.01))
    assert load_train_log(tmp_path / "limit", kind="event")[-1]["event"] == "data_skip_limit"
    # --strict: the first bad sample ends the run, naming shard, key and reason
    r = cli("nbcore.train", "--data", str(data_dir), "--out", str(tmp_path / "strict"), "--steps", "9",
            "--batch-size", "8", "--shuffle", "0", "--model-overrides", SMALL, "--strict", "--no-progress")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "train-000004.tar" in line and "'few-patches-0'" in line and "wrong_shape" in line and "P=16 (want 64)" in line


@pytest.mark.parametrize("entry,value,needle", [("t5", float("nan"), "non-finite"), ("dinov3", 0.0, "std <= 0")])
def test_bad_stats_json_refused(tiny_shards, tmp_path, entry, value, needle):
    data_dir = copy_data(tiny_shards, tmp_path / "d")
    d = json.loads((data_dir / "stats.json").read_text())
    d[entry]["std"][3] = value
    (data_dir / "stats.json").write_text(json.dumps(d))        # json.dumps writes NaN as a bare token
    with pytest.raises(DataError, match=needle):
        Stats.load(data_dir / "stats.json")
    r = cli("nbcore.data", "check", str(data_dir))
    assert r.returncode != 0 and needle in one_line(r.stderr) and "stats.json" in r.stderr


# --------------------------------------------------------------------------- 4. resume after a bad last.pt

def stand_in(mcfg, B=4, n_batches=4):
    def source(epoch, rank=0, world=1):
        g = torch.Generator().manual_seed(epoch * 10 + rank)
        for i in range(n_batches):
            yield {"latent": torch.randn(B, mcfg.in_channels, mcfg.input_size, mcfg.input_size, generator=g),
                   "dino_emb": torch.randn(B, mcfg.dino_dim, generator=g),
                   "dino_patches": torch.randn(B, mcfg.num_patches, mcfg.dino_dim, generator=g),
                   "text_emb": torch.randn(B, 8, mcfg.text_dim, generator=g), "text_mask": torch.ones(B, 8, dtype=torch.bool),
                   "txt": ["x"] * B, "key": [f"{epoch}-{i}-{j}" for j in range(B)]}
    return source


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_falls_back_to_the_newest_readable_milestone(tmp_path, capsys, damage):
    mcfg = preset("tiny", depth=1, hidden_size=32, num_heads=2)
    base = dict(out=str(tmp_path / "run"), batch_size=4, log_every=1, warmup=1, lr=1e-3, progress=False,
                model=SMALL_MODEL, ckpt_every=2, milestone_every=4)
    train(TrainConfig(**base, steps=6, resume="none"), data=stand_in(mcfg))
    first = {r["step"]: r["loss"] for r in load_train_log(tmp_path / "run")}
    last = tmp_path / "run" / "ckpt" / "last.pt"
    assert load_checkpoint(last)["step"] == 6
    raw = last.read_bytes()
    last.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"")

    capsys.readouterr()
    tr = Trainer(TrainConfig(**base, steps=8, resume="auto"), data=stand_in(mcfg))
    milestone = tmp_path / "run" / "ckpt" / "step_000004.pt"
    # a milestone keeps model + EMA only: the optimiser restarts (fresh moments, the schedule at update 4)
    assert tr.step == tr.n_updates == 4 and tr.optimizer.state == {} and tr.scheduler.last_epoch == 4
    ms = load_checkpoint(milestone)
    assert all(torch.equal(tr.model.state_dict()[n], ms["model"][n]) for n in ms["model"])
    assert all(torch.equal(tr.ema.state_dict()[n], ms["ema"][n]) for n in ms["ema"])
    lr5 = 1e-3 * _lr_lambda(tr.cfg)(4)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(lr5)
    s = tr.run()
    tr.close()
    err = capsys.readouterr().err
    assert f"resume: {last}: " in err and f"falling back to the newest readable milestone {milestone} (step 4)" in err
    assert "optimiser state restarted" in err and "weights_only=False" not in err
    ev = {e["event"]: e for e in load_train_log(tmp_path / "run", kind="event")}
    assert ev["resume_fallback"]["path"] == str(milestone) and ev["resume_fallback"]["unreadable"] == str(last)
    assert ev["resume_fallback"]["optimizer"] == "restarted" == ev["resume"]["optimizer"]
    assert ev["resume"]["path"] == str(milestone) and ev["resume"]["step"] == 4
    assert s["steps"] == 8 and s["steps_this_run"] == 4
    recs = {r["step"]: r for r in load_train_log(tmp_path / "run")}
    assert sorted(recs) == list(range(1, 9))                    # log cut back to step 4, then continued
    assert recs[5]["loss"] == first[5]                          # weights, RNG and data position: the milestone's
    assert recs[5]["lr"] == pytest.approx(lr5)                  # the schedule at update 4 of this 8-step run
    assert recs[6]["loss"] != first[6]                          # fresh AdamW moments: the updates differ

    # an unreadable checkpoint named explicitly: one line naming the file and what is wrong
    last.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=rf"^{last}: not a readable checkpoint") as e:
        Trainer(TrainConfig(**base, steps=8, resume=str(last)), data=stand_in(mcfg))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


def test_resume_with_nothing_readable_says_so(tmp_path):
    mcfg = preset("tiny", depth=1, hidden_size=32, num_heads=2)
    base = dict(out=str(tmp_path / "run"), batch_size=4, log_every=1, warmup=1, progress=False,
                model=SMALL_MODEL, ckpt_every=2)
    train(TrainConfig(**base, steps=2, resume="none"), data=stand_in(mcfg))
    (tmp_path / "run" / "ckpt" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot resume: .*last.pt: not a readable checkpoint.*no readable milestone"):
        Trainer(TrainConfig(**base, steps=4, resume="auto"), data=stand_in(mcfg))


# --------------------------------------------------------------------------- 5. one clear line

class _Foo:
    """Any class: pickling it makes a file that only an unsafe load would read."""


def test_non_checkpoint_warm_start_refused_in_one_line(tiny_shards, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    r = cli("nbcore.train", "--data", str(tiny_shards), "--out", str(tmp_path / "o"), "--warm-start", str(text))
    assert r.returncode == 2
    assert one_line(r.stderr) == f"nbcore.train: error: --warm-start {text}: not a checkpoint (17 bytes, no torch zip archive)"
    # a torch file holding arbitrary objects: refused at load, one line, no unsafe advice
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {}, "extra": _Foo()}, pickled)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(pickled)
    assert str(e.value) == f"{pickled}: holds objects beyond tensors and plain types, e.g. {__name__}._Foo; " \
                           "refused (not an nbcore checkpoint)"
    r = cli("nbcore.train", "--data", str(tiny_shards), "--out", str(tmp_path / "o2"), "--warm-start", str(pickled),
            "--steps", "1", "--no-progress")
    assert r.returncode == 1 and "refused (not an nbcore checkpoint)" in one_line(r.stderr)
    r = cli("nbcore.validate", str(pickled), "--data", str(tiny_shards), "--out", str(tmp_path / "v"))
    assert r.returncode == 1 and "refused (not an nbcore checkpoint)" in one_line(r.stderr, after_progress=True)


@pytest.mark.parametrize("extra,needle", [
    (["--model-overrides", '{"num_heads": 0}'], "num_heads=0: must be > 0"),
    (["--model-overrides", '{"depth": "3"}'], "depth='3': must be int"),
    (["--model-overrides", '{"depth": 0}'], "depth=0: must be > 0"),
    (["--model-overrides", '{"hidden_size": 30, "num_heads": 4}'], "not divisible"),
    (["--warm-start", "FOLDER"], "a folder, not a checkpoint file"),
    (["--out", "UNDER_A_FILE"], "cannot write there"),
    (["--max-skips", "2.5"], "max_skips must be"),
    (["--lr", "nan"], "lr must be"),
    (["--preset", "huge"], "invalid choice"),
    (["--steps", "x"], "invalid int value"),
])
def test_bad_train_arguments_one_line_exit_2(tiny_shards, tmp_path, capsys, extra, needle):
    from nbcore.cli.train import main
    afile = tmp_path / "a-file"
    afile.write_text("x")
    extra = [str(tmp_path) if a == "FOLDER" else str(afile / "out") if a == "UNDER_A_FILE" else a for a in extra]
    args = ["--data", str(tiny_shards), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("python -m nbcore.train: error:" if "invalid" in needle else "nbcore.train: error:")
    assert needle in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_one_line_exit_2(tiny_shards, tmp_path):
    for module, args in (("nbcore.train", ["--data", str(tiny_shards), "--out", str(tmp_path / "o")]),
                         ("nbcore.validate", [str(atomic_save({}, tmp_path / "c.pt")), "--data", str(tiny_shards),
                                              "--out", str(tmp_path / "v")])):
        r = cli(module, *args, "--device", "cuda")
        assert r.returncode == 2 and "CUDA is not available" in one_line(r.stderr), (module, r.stderr)


# --------------------------------------------------------------------------- preemption, full disks

def _train_cli(args, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    # SIGINT at its default, as for a job in a terminal: a job started in the background of a
    # non-interactive shell (CI harnesses may be one) inherits SIGINT ignored, and training keeps it so
    return subprocess.Popen([sys.executable, "-m", "nbcore.train", "--out", str(out), "--no-progress", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_sigterm_and_sigint_checkpoint_the_step_reached_and_resume_bit_exactly(tmp_path, tiny_shards):
    """A preempted job (SIGTERM) and Ctrl-C (SIGINT): a checkpoint at the step reached, not at the last
    ``ckpt_every``, one line, exit 143 / 130; the resume continues bit-equal to an uninterrupted run."""
    args = ["--data", str(tiny_shards), "--steps", "40", "--batch-size", "8", "--log-every", "1",
            "--ckpt-every", "1000", "--warmup", "3", "--lr", "1e-3", "--model-overrides", SMALL]
    ref = _train_cli(args, tmp_path / "ref")
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out = tmp_path / sig.name
        victim = _train_cli(args, out)
        deadline = time.time() + 120
        while time.time() < deadline and victim.poll() is None:
            if (out / "log.jsonl").exists() and load_train_log(out):
                break
            time.sleep(0.01)
        victim.send_signal(sig)
        _, err = victim.communicate(timeout=120)
        assert victim.returncode == code, err[-2000:]
        lines = err.strip().splitlines()
        k = load_checkpoint(out / "ckpt" / "last.pt")["step"]
        assert 1 <= k < 40 and k == max(r["step"] for r in load_train_log(out))   # the step reached
        assert "Traceback" not in err and sig.name in lines[-1] and f"step {k}" in lines[-1]
        assert str(out / "ckpt" / "last.pt") in lines[-1]
        resumed = _train_cli(["--resume", *args], out)
        _, rerr = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, rerr[-2000:]
        assert f"at step {k}" in rerr
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    a = {r["step"]: r["loss"] for r in load_train_log(tmp_path / "ref")}
    fin_a = load_checkpoint(tmp_path / "ref" / "ckpt" / "last.pt")
    for sig in (signal.SIGTERM, signal.SIGINT):
        b = {r["step"]: r["loss"] for r in load_train_log(tmp_path / sig.name)}
        assert sorted(b) == list(range(1, 41)) and all(b[s] == a[s] for s in b)
        fin_b = load_checkpoint(tmp_path / sig.name / "ckpt" / "last.pt")
        assert all(torch.equal(fin_a["ema"][n], fin_b["ema"][n]) for n in fin_a["ema"])


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_last_pt(tmp_path, tiny_shards, monkeypatch, capsys):
    """ENOSPC while the checkpoint is written: one line naming the path and "No space left on device"
    (not torch's inline_container enforce failure), the previous last.pt intact, no temporary left."""
    from nbcore import utils
    from nbcore.cli.train import main
    args = ["--data", str(tiny_shards), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
            "--ckpt-every", "1", "--log-every", "1", "--model-overrides", SMALL, "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    last = tmp_path / "run" / "ckpt" / "last.pt"
    before = last.read_bytes()
    real = torch.save

    class FullDisk(io.RawIOBase):
        """The checkpoint file on a disk that fills up after 1000 bytes."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

    def full(obj, f, *a, **kw):   # torch turns the OSError into "[enforce fail at inline_container.cc:672]"
        real(obj, FullDisk(f), *a, **kw)

    monkeypatch.setattr(utils.torch, "save", full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([a if a != "2" else "4" for a in args] + ["--resume"])
    msg = str(e.value.code)
    assert len(msg.splitlines()) == 1 and "No space left on device" in msg and str(tmp_path / "run" / "ckpt") in msg
    assert "inline_container" not in msg
    assert last.read_bytes() == before and not list(last.parent.glob("*.tmp"))


def test_disk_full_in_atomic_save_names_the_path(tmp_path, monkeypatch):
    from nbcore import utils
    atomic_save({"a": torch.zeros(2)}, tmp_path / "x.pt")

    def full(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.torch, "save", full)
    with pytest.raises(OSError) as e:
        atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "x.pt") in str(e.value)
    assert "No space left on device" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert torch.equal(load_checkpoint(tmp_path / "x.pt")["a"], torch.zeros(2))
    assert not list(tmp_path.glob("*.tmp"))
