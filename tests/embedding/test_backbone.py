import numpy as np
import pytest
import torch
from PIL import Image

from clipposter.embedding.backbone import TINY_MODEL, BackboneIdentity, load_backbone, save_tiny_backbone
from clipposter.errors import ClipposterError


def test_tiny_checkpoint_round_trips_through_local_path(tiny_checkpoint, tiny_backbone):
    again = load_backbone(TINY_MODEL, str(tiny_checkpoint), device="cpu")
    img = Image.new("RGB", (120, 180), (200, 30, 30))
    a, b = tiny_backbone.encode_images([img]), again.encode_images([img])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert tiny_backbone.identity == again.identity
    assert tiny_backbone.identity.weights.startswith("sha256:")


def test_model_is_frozen_in_eval_mode(tiny_backbone):
    assert not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_outputs_are_unit_norm_with_derived_width(tiny_backbone):
    imgs = [Image.new("RGB", (64, 96), c) for c in [(0, 0, 0), (255, 255, 0), (10, 200, 90)]]
    emb = tiny_backbone.encode_images(imgs, batch_size=2)
    txt = tiny_backbone.encode_texts(["a horror movie poster", "a comedy"])
    assert emb.shape == (3, 64) and txt.shape == (2, 64)
    assert tiny_backbone.embed_dim == 64  # read from the model config, not assumed
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert tiny_backbone.image_forward_passes >= 2


def test_different_weights_have_different_identity(tmp_path, tiny_backbone):
    other = save_tiny_backbone(tmp_path / "other.safetensors", seed=1)
    bb = load_backbone(TINY_MODEL, str(other), device="cpu")
    assert bb.identity.key != tiny_backbone.identity.key
    with pytest.raises(ClipposterError, match="separate cache directory"):
        tiny_backbone.identity.check_same(bb.identity, "the cache X")


def test_identity_round_trips_through_dict(tiny_backbone):
    ident = tiny_backbone.identity
    assert BackboneIdentity.from_dict(ident.to_dict()) == ident


def test_random_weights_are_seeded():
    a = load_backbone(TINY_MODEL, None, device="cpu")
    b = load_backbone(TINY_MODEL, None, device="cpu")
    img = [Image.new("RGB", (64, 64), (1, 2, 3))]
    np.testing.assert_array_equal(a.encode_images(img), b.encode_images(img))
    assert a.identity.weights == "random-seed0"


def test_unknown_tag_is_one_clear_error():
    with pytest.raises(ClipposterError, match="neither a file nor a tag"):
        load_backbone("ViT-B-32", "no-such-tag", device="cpu")


def test_unknown_architecture_is_clear_error():
    with pytest.raises(ClipposterError, match="unknown backbone"):
        load_backbone("ViT-Nope-99", None, device="cpu")


def test_corrupt_checkpoint_is_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ClipposterError, match="cannot load checkpoint"):
        load_backbone(TINY_MODEL, str(bad), device="cpu")


def test_unfetchable_weights_say_how_to_pass_a_local_file(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(ClipposterError) as err:
        load_backbone("ViT-B-32", "openai", device="cpu")
    msg = str(err.value)
    assert "pass its path as `pretrained`" in msg and "\n" not in msg


def test_unavailable_cuda_is_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ClipposterError, match="CUDA is not available"):
        load_backbone(TINY_MODEL, None, device="cuda")
