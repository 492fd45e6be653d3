"""nbcore.encoders: real encoder classes (tiny, randomly initialised, built in-process and saved to
local folders; no downloads) and the precompute CLI's contract shapes.

The T5 tokenizer is a real ``transformers`` fast tokenizer built offline from a ``tokenizers``
WordLevel model (SentencePiece is not available offline), saved and reloaded through AutoTokenizer.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

# Building and saving the tiny models takes several seconds on 2 cores: the whole file is slow.
pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from nbcore.data import check_shards, make_loader, shard_list, Stats  # noqa: E402
from nbcore.encoders import DinoV3Encoder, T5TextEncoder, VAECodec, main  # noqa: E402

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "circle", "square", "at", "the", "top", "left",
         "right", "bottom", "and", "small", "large"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    dino = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
        image_size=224, num_register_tokens=2)).eval()
    dino.save_pretrained(root / "dino")
    reg = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
        image_size=224, num_register_tokens=4)).eval()
    reg.save_pretrained(root / "dinov2reg")
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    t5.save_pretrained(root / "t5")
    build_tokenizer().save_pretrained(root / "t5")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1).eval()
    vae.save_pretrained(root / "vae")
    return {"dino": root / "dino", "dinov2reg": root / "dinov2reg", "t5": root / "t5", "vae": root / "vae",
            "models": {"dino": dino, "dinov2reg": reg, "t5": t5, "vae": vae}}


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


def test_t5_hidden_states_and_mask(model_dirs):
    enc = T5TextEncoder(model_dirs["t5"], device="cpu")
    caps = ["a red circle at the top left", "a blue square"]
    emb, mask = enc(caps)
    assert emb.shape == (2, 512, 16) and mask.shape == (2, 512) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [8, 4]                                     # words + </s>
    assert not emb[~mask].any()
    ids = torch.tensor([[WORDS.index(w) for w in caps[1].split()] + [1]])
    with torch.no_grad():
        ref = model_dirs["models"]["t5"](input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb[1, :4], ref[0])                            # padding does not leak in


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


def test_precompute_cli_contract_shapes(model_dirs, tmp_path, capsys):
    caps = _write_images(tmp_path / "imgs")
    out = tmp_path / "shards"
    code = main(["precompute", str(tmp_path / "imgs"), str(out), "--dino", str(model_dirs["dino"]),
                 "--t5", str(model_dirs["t5"]), "--vae", str(model_dirs["vae"]), "--image-size", "32",
                 "--batch-size", "2", "--shard-size", "3", "--device", "cpu"])
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
