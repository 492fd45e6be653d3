"""nbcore.encoders: real encoder classes (tiny, randomly initialised, built in-process and saved to
local folders; no downloads), the precompute CLI's contract shapes, aspect-ratio buckets, resume
after an interrupted run, and the real-data path end to end (precompute -> shard check -> train ->
save_pretrained / from_pretrained).

The encoder folders are ``nbcore.encoders.tiny_random_encoders``' plumbing stand-ins (conftest
``real_encoder_dirs``); their T5 tokenizer is a real ``transformers`` fast tokenizer built offline
from a ``tokenizers`` WordLevel model (SentencePiece is not available offline).
"""
from __future__ import annotations

import io
import math
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from nbcore.data import check_shards, make_loader, shard_list, Stats
from nbcore.cli.encoders import main
from nbcore.encoders import MANIFEST, DinoV3Encoder, T5TextEncoder, VAECodec, aspect_buckets, choose_bucket, precompute

WORDS = ["a", "red", "blue", "green", "circle", "square", "at", "the", "top", "left", "right", "bottom", "and",
         "small", "large"]   # caption words of the generated folders: all in the stand-in tokenizer's vocabulary


@pytest.fixture(scope="module")
def model_dirs(real_encoder_dirs, tmp_path_factory):
    """The session's stand-in encoder folders (conftest ``real_encoder_dirs``), a DINOv2-with-registers
    folder beside them, and the reference modules loaded straight from those folders."""
    import transformers
    import diffusers
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    reg = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
        image_size=224, num_register_tokens=4)).eval()
    reg.save_pretrained(root / "dinov2reg")
    d = real_encoder_dirs
    models = {"dino": transformers.DINOv3ViTModel.from_pretrained(d["dino"]).eval(), "dinov2reg": reg,
              "t5": transformers.T5EncoderModel.from_pretrained(d["t5"]).eval(),
              "vae": diffusers.AutoencoderKL.from_pretrained(d["vae"]).eval()}
    return {**d, "dinov2reg": root / "dinov2reg", "models": models}


@pytest.mark.slow
@pytest.mark.parametrize("which, registers", [("dino", 2), ("dinov2reg", 4)])
def test_dino_cls_first_registers_skipped(model_dirs, which, registers):
    enc = DinoV3Encoder(model_dirs[which], device="cpu")
    assert (enc.grid, enc.num_registers, enc.dim) == (14, registers, 32)
    images = torch.rand(2, 3, 64, 48 + 16)
    cls, patches = enc(images)
    assert cls.shape == (2, 32) and patches.shape == (2, 196, 32)
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        h = model_dirs["models"][which](pixel_values=(x.clamp(0, 1) - mean) / std).last_hidden_state
    assert h.shape[1] == 1 + registers + 196
    torch.testing.assert_close(cls, h[:, 0])
    torch.testing.assert_close(patches, h[:, 1 + registers:])


@pytest.mark.slow
def test_t5_hidden_states_and_mask(model_dirs):
    enc = T5TextEncoder(model_dirs["t5"], device="cpu")
    caps = ["a red circle at the top left", "a blue square"]
    emb, mask = enc(caps)
    assert emb.shape == (2, 512, 16) and mask.shape == (2, 512) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [8, 4]                                     # words + </s>
    assert not emb[~mask].any()
    ids = torch.tensor([enc.tokenizer.convert_tokens_to_ids(caps[1].split() + ["</s>"])])
    with torch.no_grad():
        ref = model_dirs["models"]["t5"](input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb[1, :4], ref[0])                            # padding does not leak in


@pytest.mark.slow
def test_vae_scaling_and_shift(model_dirs):
    codec = VAECodec(model_dirs["vae"], device="cpu")
    assert (codec.scaling_factor, codec.shift_factor, codec.channels, codec.downsample) == (0.5, 0.1, 4, 2)
    x = torch.rand(2, 3, 32, 32)
    z = codec.encode(x)
    vae = model_dirs["models"]["vae"]
    with torch.no_grad():
        mean = vae.encode(x * 2 - 1).latent_dist.mean
        dec = vae.decode(mean).sample
    assert z.shape == (2, 4, 16, 16)
    torch.testing.assert_close(z, (mean - 0.1) * 0.5)
    torch.testing.assert_close(codec.decode(z), ((dec + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_local_folders_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="local model folder not found"):
        DinoV3Encoder(tmp_path / "facebook/dinov3-vitl16-pretrain-lvd1689m")


def _write_images(folder, n=5):
    from PIL import Image
    folder.mkdir()
    caps = {}
    g = np.random.default_rng(0)
    sizes = [(40, 30), (32, 32), (50, 64), (33, 47), (64, 64)]
    for i in range(n):
        ext = "png" if i % 2 else "jpg"
        Image.fromarray(g.integers(0, 256, (sizes[i][1], sizes[i][0], 3), dtype=np.uint8)).save(folder / f"img.{i}.{ext}")
        caps[f"img_{i}"] = " ".join(["a", "red", "circle", "and", "a", "blue", "square"][: 2 + i])
        (folder / f"img.{i}.txt").write_text(caps[f"img_{i}"])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "nocaption.png")
    return caps


@pytest.mark.slow
def test_precompute_cli_contract_shapes(model_dirs, tmp_path, capsys):
    caps = _write_images(tmp_path / "imgs")
    out = tmp_path / "shards"
    code = main(["precompute", str(tmp_path / "imgs"), str(out), "--dino", str(model_dirs["dino"]),
                 "--t5", str(model_dirs["t5"]), "--vae", str(model_dirs["vae"]), "--image-size", "32",
                 "--allow-upscale", "--batch-size", "2", "--shard-size", "3", "--device", "cpu"])   # img.0 is 40x30 px
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train"] == 5 and summary["skipped_no_caption"] == 1
    assert [p.split("/")[-1] for p in shard_list(out, "train")] == ["train-000000.tar", "train-000001.tar"]
    batch = next(iter(make_loader(shard_list(out, "train"), 8, shuffle=0)))
    assert sorted(batch["key"]) == sorted(caps) and batch["txt"] == [caps[k] for k in batch["key"]]
    assert batch["latent"].shape == (5, 4, 16, 16)
    assert batch["dino_emb"].shape == (5, 32) and batch["dino_patches"].shape == (5, 196, 32)
    assert batch["text_emb"].shape == (5, 8, 16)                                    # longest 7 tokens + </s>
    assert batch["text_mask"].sum(1).tolist() == [len(caps[k].split()) + 1 for k in batch["key"]]
    assert batch["png"].shape == (5, 3, 32, 32)
    # stored members follow the contract: real tokens only, float16
    with tarfile.open(shard_list(out, "train")[0]) as tar:
        t5 = np.load(io.BytesIO(tar.extractfile("img_0.t5.npy").read()))
        lat = np.load(io.BytesIO(tar.extractfile("img_0.latent.npy").read()))
        pt = np.load(io.BytesIO(tar.extractfile("img_0.dinov3_patches.npy").read()))
    assert t5.shape == (3, 16) and t5.dtype == np.float16
    assert lat.shape == (4, 16, 16) and lat.dtype == np.float16 and pt.shape == (196, 32) and pt.dtype == np.float16
    # the latents are the VAE's scaled latents of the stored image
    codec = VAECodec(model_dirs["vae"], device="cpu")
    torch.testing.assert_close(batch["latent"], codec.encode(batch["png"]).half().float(), atol=2e-3, rtol=2e-3)
    st = Stats.load(out / "stats.json")
    assert st.dim("dinov3") == 32 and st.dim("t5") == 16 and st.entries["dinov3"]["count"] == 5
    assert check_shards(str(out), progress=False)["with_patches"] == 5
    with pytest.raises(SystemExit) as e:
        main(["precompute", str(tmp_path / "nope"), str(out), "--dino", str(model_dirs["dino"]),
              "--t5", str(model_dirs["t5"]), "--vae", str(model_dirs["vae"])])
    assert "images folder not found" in str(e.value.code)


def test_aspect_buckets():
    b512 = aspect_buckets(512, 64)
    assert b512 == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    assert all(h * w <= 512 * 512 and h % 64 == 0 and w % 64 == 0 for h, w in b512)
    assert choose_bucket(1920, 1080, b512) == (384, 640)      # W/H 1.78 -> 1.67, not 1.29
    assert choose_bucket(1080, 1920, b512) == (640, 384)
    assert choose_bucket(700, 700, b512) == (512, 512)
    assert aspect_buckets(32, 8) == [(40, 24), (32, 32), (24, 40)]
    assert aspect_buckets(512, 64, max_aspect=1.0) == [(512, 512)]
    with pytest.raises(ValueError, match="not a multiple of the bucket step"):
        aspect_buckets(500, 64)


@pytest.mark.slow
def test_dino_without_vit_patches_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]).save_pretrained(tmp_path / "cnx")
    with pytest.raises(ValueError, match="'dinov3_convnext' model without ViT patch tokens.*use a DINOv3 ViT"):
        DinoV3Encoder(tmp_path / "cnx", device="cpu")


@pytest.mark.slow
def test_t5_longest_padding_keeps_the_real_token_states(model_dirs):
    enc = T5TextEncoder(model_dirs["t5"], device="cpu")
    caps = ["a red circle at the top left", "a blue square"]
    full, mask = enc(caps)
    short, smask = enc(caps, padding="longest")
    assert short.shape == (2, 8, 16) and torch.equal(smask, mask[:, :8])
    torch.testing.assert_close(short, full[:, :8], atol=1e-5, rtol=1e-5)
    assert [t.shape[0] for t in enc.trimmed(caps)] == [8, 4] and enc.n_tokens(caps) == [8, 4]


class _CrashAfter:
    """An encoder that raises on its (n+1)-th call: a precompute killed mid-run."""

    def __init__(self, enc, n):
        self.enc, self.n, self.calls = enc, n, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def __call__(self, images):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("simulated crash")
        return self.enc(images)


def _write_folder(folder):
    """14 captioned images (6 square, 4 landscape, 4 portrait, interleaved), one unreadable captioned
    file, one image without a caption."""
    from PIL import Image
    folder.mkdir()
    g = np.random.default_rng(1)
    sizes = {"sq": (40, 40), "land": (64, 36), "port": (30, 56)}
    kinds = ["sq", "land", "port", "sq", "land", "port", "sq", "land", "port", "sq", "land", "port", "sq", "sq"]
    words = WORDS
    for i, kind in enumerate(kinds):
        w, h = sizes[kind]
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(" ".join(words[(i + k) % len(words)] for k in range(1 + i % 6)))
    (folder / "img99.png").write_bytes(b"not a png")
    (folder / "img99.txt").write_text("a red circle")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "nocaption.png")


@pytest.mark.slow
def test_real_folder_end_to_end(model_dirs, tmp_path, capsys):
    """The real-data path end to end on plumbing stand-ins: images (square and not) -> precompute
    interrupted, then resumed with workers (byte-identical to an uninterrupted run) -> `nbcore.data
    check` -> 2 training steps (sizes from stats.json) -> save_pretrained / from_pretrained (identical
    outputs) -> `nbcore.validate --vae` (the VAE moved) -> a DINO swap from two image files."""
    import torch.nn.functional as F
    from nbcore.cli import data as data_cli
    from nbcore.codec import codec_from_spec
    from nbcore.model import NanoDiT
    from nbcore.pretrained import from_pretrained, save_pretrained
    from nbcore.train import TrainConfig, parse_model_overrides, train
    from nbcore.utils import load_checkpoint

    imgs, out, fresh = tmp_path / "imgs", tmp_path / "shards", tmp_path / "fresh"
    _write_folder(imgs)
    dino = DinoV3Encoder(model_dirs["dino"], device="cpu")
    t5 = T5TextEncoder(model_dirs["t5"], device="cpu", dtype="bfloat16")
    vae = VAECodec(model_dirs["vae"], device="cpu")
    opts = dict(image_size=32, batch_size=2, shard_size=4, buckets=True, bucket_step=8, progress=False)
    # 1. a run that dies in its third shard
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute(imgs, out, _CrashAfter(dino, 6), t5, vae, **opts)
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["shards"]) == ["train-000000.tar", "train-000001.tar"] and not manifest["complete"]
    assert (out / "train-000002.tar.tmp").exists() and not (out / "train-000002.tar").exists()
    kept = {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in manifest["shards"]}
    # other settings do not silently overwrite an unfinished run
    with pytest.raises(ValueError, match=r"unfinished precompute with other settings \(seed differ\).*--restart"):
        precompute(imgs, out, dino, t5, vae, **opts, seed=1)
    # 2. the same command continues it, images decoded in 2 workers
    cli = ["precompute", str(imgs), "OUT", "--dino", str(model_dirs["dino"]), "--t5", str(model_dirs["t5"]),
           "--vae", str(model_dirs["vae"]), "--image-size", "32", "--batch-size", "2", "--shard-size", "4",
           "--buckets", "--bucket-step", "8", "--t5-dtype", "bfloat16", "--device", "cpu", "--no-progress"]
    assert main([a if a != "OUT" else str(out) for a in cli] + ["--workers", "2"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (resumed["shards_kept"], resumed["shards_written"], resumed["images"]) == (2, 2, 7)
    assert all((os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) == v for n, v in kept.items())
    assert not list(out.glob("*.tmp"))
    # 3. an uninterrupted run gives the same bytes
    assert main([a if a != "OUT" else str(fresh) for a in cli]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [os.path.basename(p) for p in shard_list(out)]
    assert names == [f"train-00000{i}.tar" for i in range(4)] == [os.path.basename(p) for p in shard_list(fresh)]
    assert all((out / n).read_bytes() == (fresh / n).read_bytes() for n in names)
    assert json.loads((out / "stats.json").read_text()) == json.loads((fresh / "stats.json").read_text())
    # a finished shard damaged later (its size no longer the recorded one) is written again, counted once
    with open(out / "train-000001.tar", "r+b") as f:
        f.truncate(1000)
    assert main([a if a != "OUT" else str(out) for a in cli]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["shards_kept"], again["shards_written"]) == (3, 1)
    assert all((out / n).read_bytes() == (fresh / n).read_bytes() for n in names)
    for summary in (resumed, full, again):
        assert (summary["train"], summary["val"], summary["unreadable"], summary["skipped_no_caption"]) == (14, 0, 1, 1)
        assert summary["buckets"] == {"32x32": 6, "24x40": 4, "40x24": 4}
        assert summary["unreadable_files"][0].startswith("img99.png: ")
    # 4. the shards pass the contract check, also against a preset taken as training takes it
    assert data_cli.main(["check", str(out), "--preset", "tiny"]) == 0   # the preset at the data's sizes, as training
    check = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (check["samples"], check["with_patches"], check["good"], check["skipped"]) == (14, 14, 14, {})
    st = Stats.load(out / "stats.json")
    assert st.meta["codec"] == vae.spec() and st.meta["codec"]["kind"] == "vae"
    assert st.meta["encoders"]["t5"]["dtype"] == "bfloat16" and st.meta["encoders"]["dino"]["dtype"] == "float32"
    assert st.meta["buckets"] == [[40, 24], [32, 32], [24, 40]] and st.meta["n_train"] == 14
    # 5. what a non-square sample holds: the whole image squeezed into DINO's 224 view (patch (i, j) =
    # image rows i/14.., columns j/14..), the VAE latents of the stored image, trimmed text
    caps = {f"img{i:02d}": (imgs / f"img{i:02d}.txt").read_text() for i in range(14)}
    shapes = {}
    for batch in make_loader(out, 8, shuffle=0):
        png = batch["png"]
        shapes[tuple(png.shape[2:])] = shapes.get(tuple(png.shape[2:]), 0) + len(png)
        assert batch["latent"].shape[1:] == (4, png.shape[2] // 2, png.shape[3] // 2)
        assert batch["dino_patches"].shape[1:] == (196, 32)
        x = F.interpolate(png, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            h = model_dirs["models"]["dino"](pixel_values=(x.clamp(0, 1) - mean) / std).last_hidden_state
        torch.testing.assert_close(batch["dino_emb"], h[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batch["dino_patches"], h[:, 3:], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(batch["latent"], vae.encode(png), atol=2e-3, rtol=2e-3)
        assert batch["text_mask"].sum(1).tolist() == [len(caps[k].split()) + 1 for k in batch["key"]]
    assert shapes == {(32, 32): 6, (24, 40): 4, (40, 24): 4}
    # 6. two training steps on these shards, then a shareable model that gives the same outputs
    # sizes (4 latent channels at 16x16, T5 16, DINO 32 with a 14x14 grid) come from stats.json
    over = dict(hidden_size=32, depth=1, num_heads=2, patch_tie=True)
    run = train(TrainConfig(preset="tiny", data=str(out), out=str(tmp_path / "run"), steps=2, batch_size=2,
                            shuffle=0, warmup=0, device="cpu", progress=False,
                            model=parse_model_overrides("tiny", json.dumps(over), stats=st)))
    assert run["steps"] == 2
    model_dir = save_pretrained(run["checkpoint"], tmp_path / "model", metrics={"final_loss": run["final_loss"]})
    model, info = from_pretrained(model_dir, device="cpu")
    ck = load_checkpoint(run["checkpoint"])
    ref = NanoDiT(model.cfg)
    ref.load_state_dict(ck["ema"])
    ref.eval()
    batch = next(b for b in make_loader(out, 4, stats=out / "stats.json", shuffle=0) if b["latent"].shape[-1] == 20)
    cond = dict(x=batch["latent"], t=torch.full((len(batch["latent"]),), 0.5), dino_emb=batch["dino_emb"],
                dino_patches=batch["dino_patches"], text_emb=batch["text_emb"], text_mask=batch["text_mask"])
    with torch.no_grad():
        assert torch.equal(model(**cond), ref(**cond))
    assert info["codec"] == vae.spec() and info["training"]["step"] == 2 and info["stats"].meta == st.meta
    assert info["training"]["data"] == str(out)
    codec = codec_from_spec(info["codec"], device="cpu")
    assert torch.equal(codec.decode(batch["latent"]), vae.decode(batch["latent"]))
    assert "diffusers AutoencoderKL" in (model_dir / "README.md").read_text()
    # 7. validation with --vae (the VAE folder moved: the recorded one is gone), on one bucket shape
    import shutil
    from nbcore.cli import validate as validate_cli
    moved = tmp_path / "vae-moved"
    shutil.copytree(model_dirs["vae"], moved)
    st_moved = Stats.load(out / "stats.json")
    st_moved.meta["codec"]["path"] = str(tmp_path / "gone")
    st_moved.save(out / "stats.json")
    args = [run["checkpoint"], "--data", str(out), "--out", str(tmp_path / "val"), "--n", "4", "--steps", "2",
            "--device", "cpu"]
    with pytest.raises(SystemExit, match="no val-.*--split train"):
        validate_cli.main(args)                          # this folder has no val split: said, with the way out
    args += ["--split", "train"]
    with pytest.raises(SystemExit, match="--vae DIR"):
        validate_cli.main(args)
    assert validate_cli.main(args + ["--vae", str(moved)]) == 0
    val = json.loads((tmp_path / "val" / "metrics.json").read_text())["checkpoints"][run["checkpoint"]]
    assert val["n"] == 4 and math.isfinite(val["recon_psnr"]) and -1 <= val["recon_dino_layout_corr"] <= 1
    assert "layout_error" in " ".join(val["shapes_world_only"]) and val["recon_layout_error"] is None
    # 8. the DINO swap from two image files and a typed caption, on the exported model
    from nbcore.demo import Demo, Source
    demo = Demo.load(model_dir, device="cpu", vae=moved, n_scenes=0)
    a, b = demo.add_source(imgs / "img00.png"), demo.add_source(imgs / "img03.png")
    res = demo.swap([Source(caption="a red circle at the top"), Source(caption="a blue square")], [a, b], steps=2)
    swap = res["images"]["swap"]
    assert swap.shape == (2, 3, 32, 32) and swap.min() >= 0 and swap.max() <= 1
    assert torch.equal(swap, demo.swap([Source(caption="a red circle at the top"), Source(caption="a blue square")],
                                       [a, b], steps=2)["images"]["swap"])     # same seed, same images


def test_dino_view_and_model_place_a_region_on_the_same_latent_tokens():
    """A block at a known place of a non-square (48 x 80 px) image: the DINO patches that see it
    (16 px patches of the 224 view), resampled onto the model's token grid by the model's own
    ``patch_cover_weights``, light up the tokens whose 8 px cells the block covers."""
    from nbcore.encoders import dino_view
    from nbcore.model import patch_cover_weights
    img = torch.zeros(1, 3, 48, 80)
    img[..., 20:48, 20:44] = 1                                              # rows 0.42..1, columns 0.25..0.55
    view = dino_view(img)                                                   # (1, 3, 224, 224)
    assert view.shape == (1, 3, 224, 224)
    patch = view[0, 0].reshape(14, 16, 14, 16).mean((1, 3)).flatten()     # (196,) brightness per DINO patch
    h, w = 6, 10                                                            # the model's token grid: 8 x 8 px cells
    token = (patch_cover_weights(14, h, w) @ patch).view(h, w)             # (h, w)
    truth = img[0, 0].reshape(h, 8, w, 8).mean((1, 3))                     # (h, w) share of each cell inside the block
    assert ((truth > 0) & (truth < 1)).sum() == 10                         # partly covered cells are checked too
    torch.testing.assert_close(token, truth, atol=0.02, rtol=0)
    # the aspect-keeping alternative (DINO on the centre 48 x 48 crop) puts the block elsewhere
    crop = dino_view(img[..., :, 16:64])[0, 0].reshape(14, 16, 14, 16).mean((1, 3)).flatten()  # (196,)
    assert ((patch_cover_weights(14, h, w) @ crop).view(h, w) - truth).abs().max() > 0.5


@pytest.mark.slow
def test_precompute_val_split_and_finished_rerun(model_dirs, tmp_path):
    _write_images(tmp_path / "imgs")
    dino = DinoV3Encoder(model_dirs["dino"], device="cpu")
    t5 = T5TextEncoder(model_dirs["t5"], device="cpu")
    vae = VAECodec(model_dirs["vae"], device="cpu")
    out = tmp_path / "shards"
    s = precompute(tmp_path / "imgs", out, dino, t5, vae, image_size=32, batch_size=4, val_fraction=0.4, seed=3,
                   progress=False, allow_upscale=True)   # img.0 is 40x30 px
    assert (s["train"], s["val"], s["shards_written"]) == (3, 2, 2)
    val_keys = json.loads((out / MANIFEST).read_text())["shards"]["val-000000.tar"]["keys"]
    assert len(val_keys) == 2 and check_shards(str(out / "val-000000.tar"), progress=False)["good"] == 2
    assert Stats.load(out / "stats.json").entries["dinov3"]["count"] == 3        # train split only
    mtime = os.stat(out / "train-000000.tar").st_mtime_ns
    again = precompute(tmp_path / "imgs", out, dino, t5, vae, image_size=32, batch_size=4, val_fraction=0.4, seed=3,
                       progress=False, allow_upscale=True)
    assert (again["shards_kept"], again["shards_written"], again["train"], again["val"]) == (2, 0, 3, 2)
    assert os.stat(out / "train-000000.tar").st_mtime_ns == mtime                # nothing redone
    # a finished run with other settings is replaced, as a fresh run would be
    other = precompute(tmp_path / "imgs", out, dino, t5, vae, image_size=32, batch_size=4, progress=False,
                       allow_upscale=True)
    assert (other["train"], other["val"], other["shards_written"]) == (5, 0, 1) and not (out / "val-000000.tar").exists()


@pytest.mark.slow
def test_shapes_folder_keeps_its_scenes_through_precompute(real_encoder_dirs, shapes_image_folder, tmp_path):
    """A shapes-world image folder (``write_image_folder``) holds ShapesWorld's own scenes; precompute
    stores each ``name.json`` as the sample's ``json`` member, and the stored png is the rendered scene."""
    from nbcore.shapes import WORLDS, Scene, ShapesWorld, render
    world = ShapesWorld(WORLDS["nano"], seed=0, rules="easy")
    first = json.loads((shapes_image_folder / "scene_000003.json").read_text())
    assert first == world.scene(3, "train").to_json()
    d = real_encoder_dirs
    precompute(shapes_image_folder, tmp_path / "shards", d["dino"], d["t5"], d["vae"], image_size=32,
               batch_size=8, progress=False, device="cpu")
    seen = 0
    for batch in make_loader(tmp_path / "shards", 8, shuffle=0):
        for key, meta, png, txt in zip(batch["key"], batch["json"], batch["png"], batch["txt"]):
            i = int(key.removeprefix("scene_"))
            scene = world.scene(i, "train")
            assert meta == scene.to_json() and txt == scene.caption()
            assert torch.allclose(png, render(Scene.from_json(meta), 32), atol=1 / 255)
            seen += 1
    assert seen == 24
    bad = tmp_path / "bad"
    bad.mkdir()
    for ext in (".png", ".txt"):
        (bad / f"x{ext}").write_bytes((shapes_image_folder / f"scene_000000{ext}").read_bytes())
    (bad / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        precompute(bad, tmp_path / "bad_shards", d["dino"], d["t5"], d["vae"], image_size=32, progress=False,
                   device="cpu")


@pytest.mark.slow
def test_data_encoders_rebuild_what_the_shards_hold(real_encoder_dirs, shapes_image_folder, tmp_path, tiny_shards):
    """``data_encoders(stats)`` re-encodes a sample's image and caption into the normalised
    conditions its shard holds: real encoders from the folders stats.json records, and the shapes
    world's stand-ins; a recorded folder that is gone names the flag."""
    from nbcore.encoders import data_encoders
    from nbcore.model import CONDITION_KEYS
    d = real_encoder_dirs
    out = tmp_path / "shards"
    precompute(shapes_image_folder, out, d["dino"], d["t5"], d["vae"], image_size=32, progress=False, device="cpu")
    for folder, tol in ((out, 2e-2), (tiny_shards, 2e-2)):
        enc = data_encoders(folder / "stats.json")
        assert enc.kind == ("real" if folder == out else "shapes")
        split = "train" if folder == out else "val"
        batch = next(iter(make_loader(shard_list(folder, split), 4, stats=folder / "stats.json", shuffle=0)))
        cond = enc.condition(batch["png"], batch["txt"])
        L = cond["text_mask"].shape[1]                  # the loader may pad text further: padding is masked
        assert not batch["text_mask"][:, L:].any()
        for k in CONDITION_KEYS:
            ref = batch[k][:, :L] if k.startswith("text") else batch[k]
            assert cond[k].shape == ref.shape, k
            torch.testing.assert_close(cond[k].float(), ref.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(enc.codec.encode(batch["png"]), batch["latent"], atol=2e-2, rtol=2e-2)
    st = Stats.load(out / "stats.json")
    st.meta["encoders"]["dino"]["path"] = str(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="pass --dino DIR"):
        data_encoders(st)
    assert data_encoders(st, dino=d["dino"]).kind == "real"
    st.meta["encoders"]["t5"]["path"] = str(tmp_path / "gone")
    enc = data_encoders(st, dino=d["dino"])              # no T5 needed until a caption is encoded
    with pytest.raises(FileNotFoundError, match="pass --t5 DIR"):
        enc.text(["a red circle"])


# --------------------------------------------------------------------------- images as a viewer shows them

def _stored_png(shards, key: str) -> np.ndarray:
    """The ``png`` member a precompute stored for ``key``: (H, W, 3) uint8."""
    from PIL import Image
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            if f"{key}.png" in names:
                return np.asarray(Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).convert("RGB"))
    raise KeyError(key)


def _exif_rotated_jpeg(path):
    """A 16 x 32 (W x H as stored) JPEG, top half red and bottom half blue, tagged EXIF orientation 6
    (a viewer rotates it 90 degrees clockwise: it shows 32 x 16, blue on the LEFT, red on the right)."""
    from PIL import Image
    a = np.zeros((32, 16, 3), np.uint8)
    a[:16, :, 0] = 255
    a[16:, :, 2] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, quality=95, exif=exif)


def test_every_pil_mode_is_read_as_its_real_8bit_rgb(tmp_path):
    """16-bit greyscale keeps its value (30000 of 65535 -> 117, not 255); palette, CMYK, greyscale
    with alpha (composited on white) and EXIF orientation as a viewer shows them."""
    from PIL import Image
    from nbcore.encoders import as_rgb
    g16 = Image.fromarray(np.full((4, 4), 30000, np.uint16))
    assert g16.mode == "I;16"
    assert np.asarray(as_rgb(g16))[0, 0].tolist() == [117, 117, 117]
    assert np.asarray(as_rgb(Image.fromarray(np.full((4, 4), 65535, np.int32), "I")))[0, 0].tolist() == [255] * 3
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    assert np.asarray(as_rgb(pal))[0, 0].tolist() == [10, 200, 30]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))                           # pure red in CMYK
    assert np.asarray(as_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    la = Image.new("LA", (4, 4), (0, 0))                                         # black, fully transparent
    assert np.asarray(as_rgb(la))[0, 0].tolist() == [255, 255, 255]
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 128))
    assert np.abs(np.asarray(as_rgb(rgba))[0, 0].astype(int) - [227, 127, 127]).max() <= 1
    _exif_rotated_jpeg(tmp_path / "phone.jpg")
    with Image.open(tmp_path / "phone.jpg") as im:
        seen = np.asarray(as_rgb(im))
    assert seen.shape == (16, 32, 3)                                              # rotated: landscape
    assert seen[8, 4, 2] > 200 and seen[8, 4, 0] < 60                             # blue on the left
    assert seen[8, 28, 0] > 200 and seen[8, 28, 2] < 60                           # red on the right


@pytest.mark.slow
def test_precompute_reads_real_world_folders_and_names_every_skip(model_dirs, tmp_path, capsys):
    """A folder as people have them: a 16-bit PNG, a phone JPEG with EXIF rotation, a cp1252 caption,
    a caption without an image, an image without a caption, a broken image. Nothing stops the run;
    the summary lists every skip and every fallback by file."""
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.full((32, 32), 30000, np.uint16)).save(imgs / "grey16.png")
    (imgs / "grey16.txt").write_text("a circle")
    _exif_rotated_jpeg(imgs / "phone.jpg")
    (imgs / "phone.txt").write_text("a red square")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(imgs / "latin.png")
    (imgs / "latin.txt").write_bytes("a caf\xe9 circle".encode("cp1252"))
    (imgs / "orphan.txt").write_text("a blue circle")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(imgs / "nocap.png")
    (imgs / "broken.png").write_bytes(b"not a png")
    (imgs / "broken.txt").write_text("a square")
    out = tmp_path / "shards"
    code = main(["precompute", str(imgs), str(out), "--dino", str(model_dirs["dino"]), "--t5", str(model_dirs["t5"]),
                 "--vae", str(model_dirs["vae"]), "--image-size", "32", "--batch-size", "4", "--device", "cpu",
                 "--no-progress", "--buckets", "--bucket-step", "8", "--allow-upscale"])   # the 32x16 photo: 1.5x
    assert code == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["train"] == 3
    assert summary["skips"] == {"no caption": ["nocap.png"], "caption without an image": ["orphan.txt"],
                                "unreadable image": [summary["skips"]["unreadable image"][0]]}
    assert summary["skips"]["unreadable image"][0].startswith("broken.png: ")
    assert summary["caption_fallbacks"] == ["latin.txt: not UTF-8, read as cp1252"]
    for needle in ("nocap.png", "orphan.txt", "broken.png", "latin.txt"):
        assert needle in cap.err
    shards = shard_list(out, "train")
    assert np.abs(_stored_png(shards, "grey16").astype(int) - 117).max() <= 1      # not white
    phone = _stored_png(shards, "phone")
    assert phone.shape[1] > phone.shape[0]                                        # landscape bucket, as shown
    assert phone[:, : phone.shape[1] // 4, 2].mean() > 150 and phone[:, -phone.shape[1] // 4:, 0].mean() > 150
    with tarfile.open(shards[0]) as tar:
        txt = {n: tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".txt")}
    assert txt["latin.txt"] == "a caf\xe9 circle"
