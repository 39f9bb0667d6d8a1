"""The task layer: the one place where data become a normalised ``InverseProblem``, its target and its output mapping.

``invdiff reconstruct``, ``invdiff compare``, the recipes and the benchmarks all pose their problems here, so a
solver sees the same input from every entry point, and the seed rule, the normalisation and the output mapping
are written once.

    >>> from invdiff import tasks
    >>> with invdiff.read_scan("scan.h5") as scan:
    ...     mask, _ = tasks.scan_mask(scan, acceleration=4)
    ...     image = tasks.scan_slice(scan, 0, mask)                  # TaskImage
    >>> solution = tasks.solve(image, "reddiff", prior, invdiff.settings.effective("reddiff", "mri"))
    >>> solution.image                                               # (H_r, W_r) float32, the scan's units
"""
from invdiff.tasks.base import (SEED_STRIDE, Solution, Task, TaskImage, image_generator, magnitude_image,
                                prior_at_spacing, problem_fingerprint, real_image, resolve_device, solve)
from invdiff.tasks.images import block_average, ct_task, image_stack, inpainting_task, superres_task
from invdiff.tasks.scan import (MASK_KINDS, NORMALISATION_PERCENTILE, calibration_width, default_center_fraction,
                                estimate_noise_sigma, parse_slices, pixel_spacing_mm, scan_images, scan_mask,
                                scan_slice, scan_tasks)

__all__ = ["SEED_STRIDE", "Solution", "Task", "TaskImage", "image_generator", "magnitude_image", "prior_at_spacing",
           "problem_fingerprint", "real_image", "resolve_device", "solve", "block_average", "ct_task", "image_stack",
           "inpainting_task", "superres_task", "MASK_KINDS", "NORMALISATION_PERCENTILE", "calibration_width",
           "default_center_fraction", "estimate_noise_sigma", "parse_slices", "pixel_spacing_mm", "scan_images",
           "scan_mask", "scan_slice", "scan_tasks"]
