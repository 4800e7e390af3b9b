"""Errors of the guest image builder.

ImageError
 ├── ImageInputError   an input (Debian package, compiler, source) is missing or unusable
 └── ImageBuildError   a build step ran and failed (its command and output are attached)
"""

from __future__ import annotations

from qmotion.errors import QmotionError


class ImageError(QmotionError):
    """Root of the image builder's errors."""


class ImageInputError(ImageError):
    """An input of the build cannot be had; nothing was built."""


class ImageBuildError(ImageError):
    """A build step failed."""

    def __init__(self, step: str, output: str) -> None:
        super().__init__(f"image build step failed: {step}\n{output.strip()[-2000:]}")
        self.step = step
        self.output = output
