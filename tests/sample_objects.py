"""Small deterministic test objects shared by test modules (not a test module itself: no test functions)."""
import numpy as np


def piecewise_smooth_image(size=32, width=None):
    """A piecewise-smooth test object (two nested rectangles on a smooth background), max 1."""
    width = size if width is None else width
    rows, cols = np.mgrid[0:size, 0:width] / np.array([size, width])[:, None, None]
    image = 0.2 * np.exp(-((rows - 0.5) ** 2 + (cols - 0.5) ** 2) / 0.1)
    image[size // 4:3 * size // 4, width // 5:4 * width // 5] += 0.6
    image[3 * size // 8:5 * size // 8, 2 * width // 5:3 * width // 5] += 0.3
    return (image / image.max()).astype(np.float32)
