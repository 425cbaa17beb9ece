"""The runtime's preprocessing is the model library's own: on real photos of several aspect
ratios (scikit-image, scikit-learn), the tensors edgetok.runtime makes from the export's
recorded data config equal what timm's create_transform, the Hugging Face image processors
(transformers 5.x) and torchvision's weights transforms make, to 1e-5 after normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetok.errors import InputShapeError
from edgetok.patch.data_config import data_config
from edgetok.runtime.preprocess import Preprocessor, PreprocessSpec

TOL = 1e-5


def _photos() -> dict:
    skimage = pytest.importorskip("skimage.data", reason="the data extra is not installed (pip install 'edgetok[data]')")
    sklearn = pytest.importorskip("sklearn.datasets", reason="the data extra is not installed")
    photos = {"astronaut 512x512": skimage.astronaut(), "chelsea 300x451": skimage.chelsea(),
              "coffee 400x600": skimage.coffee(), "rocket 427x640": skimage.rocket(),
              "flower 427x640": sklearn.load_sample_image("flower.jpg")}
    photos["chelsea portrait 451x300"] = np.ascontiguousarray(np.transpose(skimage.chelsea(), (1, 0, 2)))
    return photos


PHOTOS = _photos()


def runtime(model, name, size) -> Preprocessor:
    spec = data_config(model, name, size)
    assert spec is not None
    return Preprocessor(PreprocessSpec.model_validate(spec), ["batch", 3, *size])


@pytest.mark.parametrize("timm_name", ["vit_small_patch16_224", "deit_small_patch16_224", "vit_base_patch16_clip_224"])
def test_timm_create_transform(timm_name):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(timm_name, pretrained=False, depth=1)
    reference = create_transform(**resolve_data_config({}, model=model))
    pre = runtime(model, timm_name, [224, 224])
    for what, photo in PHOTOS.items():
        want = reference(Image.fromarray(photo)).numpy()
        got = pre(photo)[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= TOL, (timm_name, what)


HF = {  # model class, config class, config overrides: the processor is the model type's own
    "ViTModel": ("ViTConfig", {}),
    "CLIPVisionModel": ("CLIPVisionConfig", {}),
    "SiglipVisionModel": ("SiglipVisionConfig", {}),
    "Dinov2Model": ("Dinov2Config", {}),
}


@pytest.mark.parametrize("cls", sorted(HF))
def test_hf_image_processor(cls):
    import transformers
    from transformers import AutoImageProcessor  # noqa: F401  (transformers' own choice of processor class)
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    cfg_cls, extra = HF[cls]
    cfg = getattr(transformers, cfg_cls)(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=224,
                                         patch_size=16, **extra)
    model = getattr(transformers, cls)(cfg)
    names = IMAGE_PROCESSOR_MAPPING_NAMES[cfg.model_type.removesuffix("_vision_model")]
    processor = getattr(transformers, names["torchvision"] if isinstance(names, dict) else names)()
    pre = runtime(model, None, [224, 224])
    for what, photo in PHOTOS.items():
        want = processor(images=photo, return_tensors="pt").pixel_values[0].numpy()
        got = pre(photo)[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= TOL, (cls, what, np.abs(got - want).max())


def test_torchvision_weights_transforms():
    import torchvision
    from PIL import Image
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    reference = torchvision.models.get_model_weights("vit_b_16").DEFAULT.transforms()
    pre = runtime(model, "tv:vit_b_16", [224, 224])
    for what, photo in PHOTOS.items():
        want = reference(Image.fromarray(photo)).numpy()
        got = pre(photo)[0]
        assert np.abs(got - want).max() <= TOL, what


def test_a_list_of_sizes_pil_images_and_integer_images():
    import timm
    from PIL import Image

    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1)
    pre = runtime(model, None, [224, 224])
    photos = list(PHOTOS.values())[:3]
    batch = pre(photos)  # three sizes in one call
    assert batch.shape == (3, 3, 224, 224)
    for i, p in enumerate(photos):
        assert np.abs(batch[i] - pre(Image.fromarray(p))[0]).max() == 0
        assert np.abs(batch[i] - pre(p.astype(np.int64))[0]).max() == 0  # 8-bit values in an int64 array
        assert np.abs(batch[i] - pre(torch.from_numpy(p).permute(2, 0, 1))[0]).max() == 0  # CHW tensor
    # floats in [0, 1] take the float path: the same resize and crop in torch, not PIL's kernel: the two
    # bicubic kernels differ at sharp edges (measured here: max 0.093, i.e. 12/255 before normalising)
    diff = np.abs(pre(photos[0] / 255.0)[0] - batch[0])
    assert diff.max() < 0.15 and diff.mean() < 0.01


def test_bad_images_are_one_line_errors():
    import timm

    pre = runtime(timm.create_model("vit_small_patch16_224", pretrained=False, depth=1), None, [224, 224])
    photo = list(PHOTOS.values())[0]
    for bad, words in [(photo.astype(np.float32), "scaled to [0, 1]"), (photo.astype(np.int64) * 4, "8-bit"),
                       (photo[None, None], "2, 3 or 4 dims"), ([], "no images")]:
        with pytest.raises(InputShapeError) as e:
            pre(bad)
        assert words in str(e.value)
        assert "\n" not in str(e.value)
