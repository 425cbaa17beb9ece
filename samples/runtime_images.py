"""The Python runtime on photos: edgetok.runtime.load(EXPORT_DIR) picks the best
backend (TensorRT engine > ORT CUDA > ORT CPU) and applies the export's
preprocessing (resize, normalise) to uint8 HWC photos.

    python samples/runtime_images.py out/sample/tome

Photos: scikit-image's and scikit-learn's sample images when installed,
otherwise synthetic ones.
"""
import sys

import numpy as np

import edgetok.runtime as rt


def photos() -> dict:
    found = {}
    try:
        from skimage import data

        found.update({n: getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")})
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        found.update(dict(zip(("china", "flower"), load_sample_images().images)))
    except ImportError:
        pass
    if not found:
        rng = np.random.default_rng(0)
        found = {f"synthetic{i}": rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for i in range(3)}
    return {k: v for k, v in found.items() if v.ndim == 3 and v.shape[-1] == 3}


if __name__ == "__main__":
    sess = rt.load(sys.argv[1] if len(sys.argv) > 1 else "out/sample/tome")
    print(sess)
    for name, img in photos().items():
        logits = sess(img)  # one photo, any size: resized to the model's input
        print(f"{name:12s} {img.shape} -> class {int(logits.argmax())} (logit {float(logits.max()):.3f})")
