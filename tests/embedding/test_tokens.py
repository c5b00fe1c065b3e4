"""The backbone's token sequences: shape, the pooled row, an independent reference through open_clip."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from clipposter.embedding.backbone import Backbone, token_bytes_per_poster, token_shape
from clipposter.embedding.identity import BackboneIdentity
from clipposter.errors import ClipposterError

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(80, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_tokens_are_the_pooled_embedding_then_one_projected_token_per_patch(tiny_backbone):
    ims = images(5)
    passes = tiny_backbone.image_forward_passes
    pooled, tokens = tiny_backbone.encode_images(ims, batch_size=3, tokens=True)
    assert tiny_backbone.image_forward_passes == passes + 2
    # clipposter-tiny: 64 px images in 8 px patches → 8 × 8 patches + the class token, 64 wide.
    assert tokens.shape == (5, 65, 64) and tiny_backbone.token_shape == (65, 64)
    assert pooled.dtype == tokens.dtype == np.float32
    np.testing.assert_array_equal(pooled, tiny_backbone.encode_images(ims))
    np.testing.assert_array_equal(tokens[:, 0], pooled)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)
    # Independent reference: open_clip's own token output, through the tower's projection.
    visual = copy.deepcopy(tiny_backbone.model.visual)
    visual.output_tokens = True
    pixels = torch.stack([tiny_backbone.preprocess(im) for im in ims])
    with torch.no_grad():
        _, patches = visual(pixels)
        ref = torch.nn.functional.normalize(patches @ visual.proj, dim=-1).numpy()
    np.testing.assert_allclose(tokens[:, 1:], ref, atol=1e-5)
    # Patch tokens differ from one another: they are not the pooled token repeated.
    assert np.abs(tokens[:, 1:] - tokens[:, :1]).max() > 0.1


def test_no_images_give_empty_arrays_of_the_right_shape(tiny_backbone):
    pooled, tokens = tiny_backbone.encode_images([], tokens=True)
    assert pooled.shape == (0, 64) and tokens.shape == (0, 65, 64)


def test_bytes_per_poster_from_a_backbone_or_an_identity(tiny_backbone):
    assert token_bytes_per_poster(tiny_backbone) == 65 * 64 * 2
    assert token_bytes_per_poster(tiny_backbone.identity) == 65 * 64 * 2
    assert token_bytes_per_poster(tiny_backbone, itemsize=4) == 65 * 64 * 4
    b32 = BackboneIdentity(model="ViT-B-32", weights="openai", image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3,
                           interpolation="bicubic", resize_mode="shortest", embed_dim=512)
    assert token_shape(b32) == (50, 512)
    assert token_bytes_per_poster(b32) == 51_200
    resnet = BackboneIdentity(model="RN50", weights="openai", image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3,
                              interpolation="bicubic", resize_mode="shortest", embed_dim=1024)
    with pytest.raises(ClipposterError, match="token sequence length is not known"):
        token_shape(resnet)


def test_a_tower_without_tokens_is_refused_in_one_line(tiny_backbone):
    class NoTokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 64)

    other = Backbone(NoTokens(), tiny_backbone.preprocess, None, tiny_backbone.identity, torch.device("cpu"))
    with pytest.raises(ClipposterError, match="no ViT token sequence") as err:
        other.encode_images(images(1), tokens=True)
    assert "\n" not in str(err.value)
