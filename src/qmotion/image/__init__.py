"""The guest image: kernel and initramfs that tests, the lab and the demo boot.

Imports only the ground floor (paths, locks, errors, and ``qmotion.probe`` for the guest's
service ports).
"""

from qmotion.image.build import GuestImage, cached_image, ensure_image
from qmotion.image.errors import ImageBuildError, ImageError, ImageInputError

__all__ = [
    "GuestImage",
    "ImageBuildError",
    "ImageError",
    "ImageInputError",
    "cached_image",
    "ensure_image",
]
