"""nbcore.data: the WebDataset pipeline (round trip, padding, bad input, buckets, splitting, CLI)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nbcore.data import MEMBER_OF, DataError, SampleSpec, Stats, compute_stats, make_loader, shard_list
from nbcore.model import prepare_text
from nbcore.shapes import encode_sample_members

# --------------------------------------------------------------------------- helpers

C, H, W, P, DD, DT = 4, 6, 6, 9, 8, 16


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def sample_arrays(i: int, L: int = 5, hw=(H, W)):
    """Deterministic small arrays for sample i (contract layout, small dims)."""
    g = np.random.default_rng(i)
    return dict(latent=g.standard_normal((C, *hw)).astype(np.float16),
                dinov3=g.standard_normal(DD).astype(np.float32),
                patches=g.standard_normal((P, DD)).astype(np.float16),
                t5=g.standard_normal((L, DT)).astype(np.float16),
                txt=f"caption {i} é", png=g.integers(0, 256, (2 * hw[0], 2 * hw[1], 3), dtype=np.uint8),
                meta={"i": i})


def members(i: int, L: int = 5, hw=(H, W), **override) -> dict:
    a = sample_arrays(i, L, hw)
    m = encode_sample_members(a["latent"], a["dinov3"], a["patches"], a["t5"], a["txt"], a["png"], a["meta"])
    m.update(override)
    return {k: v for k, v in m.items() if v is not None}


def write_shard(path: Path, samples: list[tuple[str, dict]]) -> Path:
    """Write (key, {member: bytes}) pairs in order as a tar."""
    with tarfile.open(path, "w") as tar:
        for key, mem in samples:
            for name, data in mem.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


# --------------------------------------------------------------------------- round trip

def test_round_trip_every_member(tmp_path):
    shard = write_shard(tmp_path / "train-000000.tar", [(f"s{i:03d}", members(i, L=3 + i)) for i in range(4)])
    batch = next(iter(make_loader(str(shard), 4, shuffle=0)))
    for b, i in enumerate(range(4)):
        a = sample_arrays(i, 3 + i)
        assert batch["key"][b] == f"s{i:03d}"
        assert torch.equal(batch["latent"][b], torch.from_numpy(a["latent"]).float())
        assert torch.equal(batch["dino_emb"][b], torch.from_numpy(a["dinov3"]))
        assert torch.equal(batch["dino_patches"][b], torch.from_numpy(a["patches"]).float())
        n = 3 + i
        assert torch.equal(batch["text_emb"][b, :n], torch.from_numpy(a["t5"]).float())
        assert batch["text_mask"][b].tolist() == [True] * n + [False] * (batch["text_emb"].shape[1] - n)
        assert batch["txt"][b] == a["txt"]
        assert torch.equal(batch["png"][b], torch.from_numpy(a["png"]).permute(2, 0, 1).float() / 255)
        assert batch["json"][b] == a["meta"]
    assert batch["latent"].dtype == batch["dino_emb"].dtype == batch["text_emb"].dtype == torch.float32
    assert batch["text_emb"].shape == (4, 8, DT)            # longest caption 6 -> rounded up to 8
    assert not batch["text_emb"][~batch["text_mask"]].any()  # padding rows are zero


def test_shapes_world_round_trip(tiny_shards):
    """Shards written by the shapes world decode back to the world's own scenes and tensors."""
    from nbcore.model import preset
    from nbcore.shapes import Scene, ShapesWorld
    world = ShapesWorld(preset("tiny"), seed=0)
    batch = next(iter(make_loader(shard_list(tiny_shards, "val"), 16, shuffle=0)))
    idx = [int(k.split("-")[1]) for k in batch["key"]]
    scenes = [world.scene(i, "val") for i in idx]
    imgs = world.render_batch(scenes)
    ref = world.encode(imgs, [s.caption() for s in scenes])
    assert batch["txt"] == [s.caption() for s in scenes]
    assert [Scene.from_json(j) for j in batch["json"]] == scenes
    assert torch.equal(batch["png"], imgs)                                         # colours are k/255: exact
    torch.testing.assert_close(batch["latent"], ref["latent"].half().float())
    torch.testing.assert_close(batch["dino_emb"], ref["dino_emb"])
    torch.testing.assert_close(batch["dino_patches"], ref["dino_patches"].half().float())
    L = ref["text_emb"].shape[1]
    torch.testing.assert_close(batch["text_emb"][:, :L], ref["text_emb"].half().float() * ref["text_mask"][..., None])
    assert torch.equal(batch["text_mask"][:, :L], ref["text_mask"])


# --------------------------------------------------------------------------- padding

def test_rebuilt_padding_equals_original_padded_layout(tmp_path):
    """Legacy padded layout (512 rows + mask) and the real-tokens layout give the same batch, and
    the batch equals the original padded tensors (fixed length) or their trim (batch longest)."""
    lens = [3, 11, 7]
    padded = torch.zeros(3, 512, DT)
    mask = torch.zeros(3, 512, dtype=torch.bool)
    new, legacy = [], []
    for i, n in enumerate(lens):
        m = members(i, L=n)
        a = sample_arrays(i, n)
        padded[i, :n] = torch.from_numpy(a["t5"]).float()
        mask[i, :n] = True
        new.append((f"k{i}", m))
        leg = dict(m)
        leg["t5.npy"] = npy(padded[i].half().numpy())
        leg["t5_mask.npy"] = npy(mask[i].numpy())
        legacy.append((f"k{i}", leg))
    s_new = write_shard(tmp_path / "new.tar", new)
    s_leg = write_shard(tmp_path / "legacy.tar", legacy)
    for shard in (s_new, s_leg):
        fixed = next(iter(make_loader(str(shard), 3, shuffle=0, text_len=512)))
        assert torch.equal(fixed["text_emb"], padded) and torch.equal(fixed["text_mask"], mask)
        trimmed = next(iter(make_loader(str(shard), 3, shuffle=0)))
        ref_emb, ref_mask = prepare_text(padded, mask, multiple=8)
        assert trimmed["text_emb"].shape == (3, 16, DT)
        assert torch.equal(trimmed["text_emb"], ref_emb) and torch.equal(trimmed["text_mask"], ref_mask)


def test_fixed_text_len_truncates_and_counts(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [("k0", members(0, L=12)), ("k1", members(1, L=4))])
    loader = make_loader(str(shard), 2, shuffle=0, text_len=8)
    batch = next(iter(loader))
    assert batch["text_emb"].shape == (2, 8, DT)
    assert batch["text_mask"].sum(1).tolist() == [8, 4]
    assert loader.counts.text_truncated == 1


# --------------------------------------------------------------------------- bad input

def test_missing_patches_skipped_and_counted(tmp_path):
    samples = [("k0", members(0)), ("k1", members(1, **{"dinov3_patches.npy": None})), ("k2", members(2))]
    shard = write_shard(tmp_path / "train-000000.tar", samples)
    loader = make_loader(str(shard), 8, shuffle=0)
    assert keys_of(loader) == ["k0", "k2"]
    assert dict(loader.counts.skipped) == {"missing_patches": 1} and loader.counts.samples == 2
    with pytest.raises(DataError, match=r"train-000000\.tar.*'k1'.*missing_patches"):
        keys_of(make_loader(str(shard), 8, shuffle=0, strict=True))


def _corrupt(kind: str) -> dict:
    if kind == "corrupt_npy":
        return members(1, **{"latent.npy": npy(np.zeros((C, H, W), np.float16))[:-40]})
    if kind == "wrong_shape":
        return members(1, **{"dinov3_patches.npy": npy(np.zeros((P, DD + 1), np.float16))})
    if kind == "nonfinite":
        t5 = sample_arrays(1)["t5"].copy()
        t5[2, 3] = np.nan
        return members(1, **{"t5.npy": npy(t5)})
    if kind == "empty_text":  # a caption with no real token would leave cross-attention no text key
        return members(1, **{"t5.npy": npy(np.zeros((0, sample_arrays(1)["t5"].shape[1]), np.float16))})
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["corrupt_npy", "wrong_shape", "nonfinite", "empty_text"])
def test_malformed_sample_error_or_counted_skip(tmp_path, kind):
    shard = write_shard(tmp_path / "train-000007.tar", [("k0", members(0)), ("k1", _corrupt(kind)), ("k2", members(2))])
    with pytest.raises(DataError, match=rf"train-000007\.tar.*'k1'.*{kind}") as e:
        keys_of(make_loader(str(shard), 8, shuffle=0))
    assert e.value.key == "k1" and e.value.reason == kind
    with pytest.raises(DataError, match=rf"^\S*train-000007\.tar: sample 'k1': {kind}: ") as e:   # from a worker process
        keys_of(make_loader(str(shard), 8, shuffle=0, num_workers=2))
    assert e.value.key == "k1" and e.value.reason == kind and e.value.shard == str(shard)
    loader = make_loader(str(shard), 8, shuffle=0, on_error="skip")
    assert keys_of(loader) == ["k0", "k2"]                     # no good sample lost around the bad one
    assert dict(loader.counts.skipped) == {kind: 1}


def test_shape_mismatch_against_stats(tmp_path):
    """Dims that disagree with stats.json (Dt 16 here vs 12 in the stats) are wrong_shape."""
    shard = write_shard(tmp_path / "a.tar", [("k0", members(0))])
    st = Stats({n: {"mean": [0.0] * d, "std": [1.0] * d} for n, d in
                (("dinov3", DD), ("dinov3_patches", DD), ("t5", 12))})
    with pytest.raises(DataError, match="wrong_shape.*Dt=16 \\(want 12\\)"):
        keys_of(make_loader(str(shard), 2, stats=st, shuffle=0))


def test_truncated_tar_error_or_counted_skip(tmp_path):
    first = write_shard(tmp_path / "train-000000.tar", [(f"a{i}", members(i)) for i in range(3)])
    data = first.read_bytes()
    # cut inside the last sample's patches member: a0, a1 complete, a2 broken
    off = data.index(b"a2.dinov3_patches.npy") + 512 + 100
    first.write_bytes(data[:off])
    second = write_shard(tmp_path / "train-000001.tar", [(f"b{i}", members(10 + i)) for i in range(2)])
    shards = [str(first), str(second)]
    with pytest.raises(DataError, match=r"train-000000\.tar.*'a2'.*truncated_tar"):
        keys_of(make_loader(shards, 8, shuffle=0))
    loader = make_loader(shards, 8, shuffle=0, on_error="skip")
    assert keys_of(loader) == ["a0", "a1", "b0", "b1"]
    assert dict(loader.counts.skipped) == {"truncated_tar": 1}


def test_truncated_between_samples_keeps_complete_sample(tmp_path):
    """A tar cut right after a complete sample (next sample's first member broken) loses nothing good."""
    first = write_shard(tmp_path / "x.tar", [(f"a{i}", members(i)) for i in range(3)])
    data = first.read_bytes()
    off = data.index(b"a2.latent.npy") + 512 + 10
    first.write_bytes(data[:off])
    loader = make_loader(str(first), 8, shuffle=0, on_error="skip")
    assert keys_of(loader) == ["a0", "a1"]
    assert dict(loader.counts.skipped) == {"truncated_tar": 1}


def test_pipe_url_reads_like_a_path_and_reports_a_cut(tmp_path):
    """``pipe:`` shards (webdataset's gopen) give the same samples; a cut stream is a truncation too."""
    shard = write_shard(tmp_path / "p.tar", [(f"k{i}", members(i)) for i in range(3)])
    assert keys_of(make_loader(f"pipe:cat {shard}", 8, shuffle=0)) == ["k0", "k1", "k2"]
    cut = len(shard.read_bytes()[:shard.read_bytes().index(b"k2.latent.npy")]) + 300    # inside k2's first header
    loader = make_loader(f"pipe:head -c {cut} {shard}", 8, shuffle=0, on_error="skip")
    assert keys_of(loader) == ["k0", "k1"] and dict(loader.counts.skipped) == {"truncated_tar": 1}


def test_writer_records_each_shards_count(tiny_shards):
    """make_dataset records every shard's sample count and size in stats.json (meta.shards)."""
    shards = json.loads((Path(tiny_shards) / "stats.json").read_text())["meta"]["shards"]
    assert {k: v["nsamples"] for k, v in shards.items()} == {**{f"train-{i:06d}.tar": 16 for i in range(4)},
                                                             "val-000000.tar": 16}
    assert all(v["filesize"] == (Path(tiny_shards) / k).stat().st_size for k, v in shards.items())


def test_sample_spec_from_stats_and_model(tiny_shards):
    """stats.json fixes C, Dd, Dt and P (row counts); a model that needs other sizes is a clear error."""
    from nbcore.model import preset
    st = Stats.load(Path(tiny_shards) / "stats.json")
    cfg = preset("tiny")
    data = SampleSpec.from_stats(st, "stats.json")
    assert data.sizes() == {"C": cfg.in_channels, "Dd": cfg.dino_dim, "P": cfg.num_patches, "Dt": cfg.text_dim}
    model = SampleSpec.from_model(cfg)
    assert data.merge(model).multiple == cfg.patch_size
    with pytest.raises(DataError, match=r"stats.json has Dt=64 but model needs Dt=32"):
        data.merge(SampleSpec.from_model(preset("tiny", text_dim=32)))
    with pytest.raises(DataError, match=r"Dt=64 but expect needs Dt=32"):
        make_loader(shard_list(tiny_shards, "train"), 4, stats=st, expect={"Dt": 32})


# --------------------------------------------------------------------------- buckets, shuffle, epochs

def test_buckets_never_mix_latent_shapes(tmp_path):
    shapes = [(H, W), (H, 2 * W), (2 * H, W)]
    samples = [(f"k{i:02d}", members(i, hw=shapes[i % 3])) for i in range(20)]
    shard = write_shard(tmp_path / "a.tar", samples)
    seen = []
    for batch in make_loader(str(shard), 3, shuffle=8, seed=1):
        B = len(batch["key"])
        assert batch["latent"].shape[0] == B == batch["png"].shape[0]
        assert all(sample_arrays(int(k[1:]), hw=shapes[int(k[1:]) % 3])["latent"].shape == batch["latent"].shape[1:]
                   for k in batch["key"])
        seen += batch["key"]
    assert sorted(seen) == sorted(k for k, _ in samples)


def test_shuffle_and_epochs(tiny_shards):
    train = shard_list(tiny_shards, "train")
    plain = keys_of(make_loader(train, 8, shuffle=0))
    assert plain == sorted(plain) and len(plain) == 64
    a = keys_of(make_loader(train, 8, shuffle=32, seed=3))
    b = keys_of(make_loader(train, 8, shuffle=32, seed=3))
    c = keys_of(make_loader(train, 8, shuffle=32, seed=4))
    assert a == b and a != plain and a != c and sorted(a) == plain
    two = make_loader(train, 8, shuffle=16, epochs=2)
    k2 = keys_of(two)
    assert sorted(k2) == sorted(plain * 2) and k2[:64] != k2[64:]
    assert two.counts.samples == 128
    sizes = [len(b["key"]) for b in make_loader(train[:1], 5, shuffle=0, drop_last=True)]
    assert sizes == [5, 5, 5]                        # 16 samples: the partial batch of 1 is dropped


def test_normalisation_with_stats(tiny_shards):
    st = Stats.load(Path(tiny_shards) / "stats.json")
    train = shard_list(tiny_shards, "train")
    raw = next(iter(make_loader(train, 16, shuffle=0)))
    norm = next(iter(make_loader(train, 16, shuffle=0, stats=st)))
    assert torch.equal(norm["latent"], raw["latent"])                              # latents untouched
    for key, name in (("dino_emb", "dinov3"), ("dino_patches", "dinov3_patches")):
        torch.testing.assert_close(norm[key], st.normalise(name, raw[key]))
    m = raw["text_mask"]
    torch.testing.assert_close(norm["text_emb"][m], st.normalise("t5", raw["text_emb"][m]))
    assert not norm["text_emb"][~m].any()                                                # padding stays zero


def test_normalise_condition_equals_the_loaders_normalisation(tiny_shards):
    """``Stats.normalise_condition`` (the demo's path, model names) = what ``collate`` does."""
    st = Stats.load(Path(tiny_shards) / "stats.json")
    train = shard_list(tiny_shards, "train")
    raw = next(iter(make_loader(train, 16, shuffle=0)))
    norm = next(iter(make_loader(train, 16, shuffle=0, stats=st)))
    got = st.normalise_condition({k: raw[k] for k in ("dino_emb", "dino_patches", "text_emb", "text_mask")})
    assert set(got) == {"dino_emb", "dino_patches", "text_emb", "text_mask"} and set(MEMBER_OF) < set(got)
    for k in ("dino_emb", "dino_patches", "text_emb"):
        torch.testing.assert_close(got[k], norm[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["text_mask"], norm["text_mask"]) and not got["text_emb"][~got["text_mask"]].any()


def test_compute_stats_matches_stats_json(tiny_shards):
    st = compute_stats(shard_list(tiny_shards, "train"))
    ref = Stats.load(Path(tiny_shards) / "stats.json")
    for name in ("dinov3", "dinov3_patches", "t5", "latent"):
        np.testing.assert_allclose(st.entries[name]["mean"], ref.entries[name]["mean"], atol=1e-9)
        np.testing.assert_allclose(st.entries[name]["std"], ref.entries[name]["std"], rtol=1e-7)
    assert st.entries["dinov3"]["count"] == 64
    # the normalised conditioning has about zero mean and unit std per channel
    batch = next(iter(make_loader(shard_list(tiny_shards, "train"), 64, shuffle=0, stats=ref)))
    assert batch["dino_patches"].mean().abs() < 1e-3 and abs(batch["dino_patches"].std() - 1) < 1e-2


# --------------------------------------------------------------------------- splitting

@pytest.mark.parametrize("which", ["shard_split", "sample_split"])
def test_two_workers_two_ranks_see_each_sample_once(tiny_shards, tmp_path, which):
    if which == "shard_split":      # 4 shards for 4 slots: whole shards per slot
        shards = shard_list(tiny_shards, "train")
        expected = keys_of(make_loader(shards, 64, shuffle=0))
        bad = 0
    else:                           # 1 shard with a bad sample in it for 4 slots: split by sample
        good = [(f"k{i:02d}", members(i)) for i in range(13)]
        shards = [str(write_shard(tmp_path / "one.tar", good[:6] + [("bad", members(99, **{"dinov3_patches.npy": None}))] + good[6:]))]
        expected = [k for k, _ in good]
        bad = 1
    seen, skipped = [], 0
    for rank in range(2):
        loader = make_loader(shards, 4, shuffle=8, seed=5, num_workers=2, rank=rank, world_size=2)
        ks = keys_of(loader)
        assert ks, f"rank {rank} saw nothing"
        seen += ks
        skipped += loader.counts.total_skipped
        assert loader.counts.samples == len(ks)
    assert sorted(seen) == sorted(expected)        # every sample exactly once, no duplicates
    assert skipped == bad                          # the bad sample is counted once, by one slot


def test_shard_list_and_patterns(tiny_shards, tmp_path):
    train = shard_list(tiny_shards, "train")
    assert [Path(p).name for p in train] == [f"train-{i:06d}.tar" for i in range(4)]
    with pytest.raises(FileNotFoundError, match=r"no test-\*\.tar shards in"):
        shard_list(tiny_shards, "test")
    with pytest.raises(FileNotFoundError, match="no shards"):
        make_loader([], 4)
    brace = keys_of(make_loader(str(Path(tiny_shards) / "train-{000001..000002}.tar"), 64, shuffle=0))
    assert brace == keys_of(make_loader(train[1:3], 64, shuffle=0)) and len(brace) == 32
    assert len(keys_of(make_loader(str(tiny_shards), 128, shuffle=0))) == 80           # a folder: every .tar
    with pytest.raises(FileNotFoundError, match="shard not found"):
        make_loader(str(tmp_path / "train-000000.tar"), 4)


def test_rank_from_env(tiny_shards, monkeypatch):
    shards = shard_list(tiny_shards, "train")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ks = keys_of(make_loader(shards, 64, shuffle=0))
    assert len(ks) == 32 and set(ks) < set(keys_of(make_loader(shards, 64, shuffle=0, rank=0, world_size=1)))


# --------------------------------------------------------------------------- CLI

class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(*args, capsys=None):
    """Run the CLI in-process (fast) when capsys is given, else as ``python -m nbcore.data``."""
    if capsys is None:
        return subprocess.run([sys.executable, "-m", "nbcore.data", *args], capture_output=True, text=True)
    from nbcore.cli.data import main
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        msg = "" if isinstance(e.code, int) or e.code is None else str(e.code)
    else:
        msg = ""
    out = capsys.readouterr()
    return Result(code, out.out, out.err + msg)


@pytest.mark.slow
def test_check_cli(tiny_shards, tmp_path, capsys):
    r = run("check", str(Path(tiny_shards) / "train-{000000..000003}.tar"))   # the real entry point
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 64 and summary["with_patches"] == 64 and summary["skipped"] == {}
    assert r.stdout.count("16 samples, 16 with patches") == 4
    r = run("check", str(tiny_shards), "--preset", "tiny")   # python -m: the preset at the data's sizes (Stats checks)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["good"] == 64 + 16   # train + val
    shard = write_shard(tmp_path / "x.tar", [("k0", members(0)), ("k1", members(1, **{"dinov3_patches.npy": None})),
                                             ("k2", _corrupt("nonfinite"))])
    r = run("check", str(shard), capsys=capsys)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0
    assert summary["samples"] == 3 and summary["with_patches"] == 2 and summary["good"] == 1
    assert summary["skipped"] == {"missing_patches": 1, "nonfinite": 1}
    r = run("check", str(shard), "--strict", capsys=capsys)
    assert r.returncode != 0 and "'k1'" in r.stderr and "missing_patches" in r.stderr
    r = run("check", str(tmp_path / "nothing-*.tar"), capsys=capsys)
    assert r.returncode != 0 and "no shards match" in r.stderr


def test_stats_cli(tiny_shards, tmp_path, capsys):
    out = tmp_path / "s.json"
    r = run("stats", str(Path(tiny_shards) / "val-*.tar"), "--out", str(out), capsys=capsys)
    assert r.returncode == 0, r.stderr
    st = Stats.load(out)
    assert st.dim("dinov3") == 64 and st.dim("t5") == 64 and st.entries["dinov3"]["count"] == 16
    assert run("stats", str(tiny_shards), capsys=capsys).returncode != 0       # --out is required


def test_fast_npy_parser_matches_np_load():
    """The loader's .npy reader equals np.load (fast path and fallback) and rejects short data."""
    from nbcore.data import _npy_bytes
    arrays = [np.arange(12, dtype=np.float16).reshape(3, 4), np.float32(3.5) * np.ones(5, np.float32),
              np.array(2.0), np.zeros((2, 0, 3), bool), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              np.arange(4, dtype=">f4"), np.arange(6, dtype=np.int64).reshape(1, 2, 3)]
    for a in arrays:
        b = npy(a)
        got = _npy_bytes(b)
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
    with pytest.raises(ValueError):
        _npy_bytes(npy(np.zeros((4, 4), np.float16))[:-2])
