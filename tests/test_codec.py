"""nbcore.codec: one interface over the shapes world's pixel codec and a diffusers VAE; specs that
rebuild the same codec; clear errors where a VAE folder is missing."""
from __future__ import annotations

import json

import pytest
import torch

from nbcore.codec import (Codec, ShapesPixelCodec, as_codec, codec_from_spec, codec_from_stats,
                          codec_spec_from_stats, record_codec, spec_of)
from nbcore.data import Stats
from nbcore.model import preset
from nbcore.shapes import PixelCodec, ShapesWorld


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(preset("micro"), seed=0)


def test_pixel_codec_behind_the_interface(world):
    codec = as_codec(world.codec)
    assert isinstance(codec, Codec) and (codec.channels, codec.downsample) == (12, 2)
    x = torch.rand(3, 3, 32, 48)                                     # non-square works too
    z = codec.encode(x)
    assert z.shape == (3, 12, 16, 24)
    torch.testing.assert_close(z, world.codec.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(z), x, rtol=0, atol=1e-5)
    assert codec.decode(z * 50).max() <= 1 and codec.decode(z * 50).min() >= 0   # clamped


def test_pixel_spec_is_json_and_rebuilds_the_same_codec(world):
    spec = spec_of(world.codec)
    assert spec["kind"] == "pixel" and spec["channels"] == 12 and spec["seed"] == 777
    assert spec["shift"] == pytest.approx([float(v) for v in world.codec.shift[::4]])
    again = codec_from_spec(json.loads(json.dumps(spec)))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again.encode(x), world.codec.encode(x))
    assert again.spec() == spec


def test_wrap_refuses_a_wrong_seed(world):
    other = PixelCodec(12, shift=(0.1, 0.1, 0.1), scale=2.0, seed=5)
    assert ShapesPixelCodec.wrap(other, seed=5).spec()["seed"] == 5
    with pytest.raises(ValueError, match="not built with seed 777"):
        ShapesPixelCodec.wrap(other)
    with pytest.raises(TypeError, match="not a codec"):
        as_codec(object())


def test_spec_from_stats_recorded_and_legacy(world, tmp_path):
    c = 12
    entries = {name: {"mean": [0.0] * d, "std": [1.0] * d, "count": 1}
               for name, d in (("dinov3", 4), ("dinov3_patches", 4), ("t5", 4), ("latent", c))}
    # shapes-world stats written before codecs were recorded: rebuilt from codec_shift / codec_scale
    legacy = Stats(entries, {"source": "nbcore.shapes (stand-in encoders)",
                             "codec_shift": [float(v) for v in world.codec.shift[::4]], "codec_scale": world.codec.scale})
    assert codec_spec_from_stats(legacy) == spec_of(world.codec)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(codec_from_stats(legacy).encode(x), world.codec.encode(x))
    # recorded: record_codec writes meta["codec"] into stats.json, which wins over the legacy fields
    path = legacy.save(tmp_path / "stats.json")
    other = ShapesPixelCodec(12, (0.5, 0.5, 0.5), 3.0, seed=1)
    assert record_codec(path, other) == other.spec()
    assert Stats.load(path).meta["codec"] == other.spec()
    assert codec_spec_from_stats(path) == other.spec()
    # real data precomputed before codecs were recorded: the user must name the VAE
    bare = Stats(entries, {"source": "nbcore.encoders.precompute"})
    assert codec_spec_from_stats(bare) is None
    with pytest.raises(ValueError, match="pass --vae DIR"):
        codec_from_stats(bare)


def test_vae_spec_without_a_reachable_folder_names_the_flag(tmp_path):
    spec = {"kind": "vae", "path": str(tmp_path / "gone"), "scaling_factor": 0.5, "shift_factor": 0.0,
            "channels": 4, "downsample": 8}
    with pytest.raises(FileNotFoundError, match=r"gone.*pass --vae DIR"):
        codec_from_spec(spec)
    with pytest.raises(FileNotFoundError, match="VAE: local model folder not found"):
        codec_from_spec(spec, vae_dir=tmp_path / "also-gone")
    with pytest.raises(ValueError, match="unknown codec spec"):
        codec_from_spec({"kind": "jpeg"})
    with pytest.raises(ValueError, match="unknown codec spec"):
        record_codec(tmp_path / "stats.json", {"kind": "jpeg"})


@pytest.mark.slow
def test_vae_spec_round_trip_and_folder_override(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1).eval()
    vae.save_pretrained(tmp_path / "vae")
    from nbcore.codec import VAECodec
    codec = VAECodec(tmp_path / "vae", device="cpu")
    spec = codec.spec()
    assert spec == {"kind": "vae", "path": str((tmp_path / "vae").resolve()), "scaling_factor": 0.5,
                    "shift_factor": 0.1, "channels": 4, "downsample": 2, "dtype": "float32"}
    x = torch.rand(2, 3, 16, 24)
    z = codec.encode(x)
    with torch.no_grad():
        ref = (vae.encode(x * 2 - 1).latent_dist.mean - 0.1) * 0.5
    torch.testing.assert_close(z, ref)
    again = codec_from_spec(json.loads(json.dumps(spec)), device="cpu")
    assert torch.equal(again.encode(x), z) and torch.equal(again.decode(z), codec.decode(z))
    # the folder moved: the recorded path fails, --vae DIR finds it; the recorded factors win
    moved = {**spec, "path": str(tmp_path / "old-place"), "scaling_factor": 0.25}
    with pytest.raises(FileNotFoundError, match="pass --vae DIR"):
        codec_from_spec(moved)
    over = codec_from_spec(moved, vae_dir=tmp_path / "vae", device="cpu")
    torch.testing.assert_close(over.encode(x), z / 0.5 * 0.25)
    with pytest.raises(ValueError, match="channels=4, but the data was encoded with channels=16"):
        codec_from_spec({**spec, "channels": 16})
