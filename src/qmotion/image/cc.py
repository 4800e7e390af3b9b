"""Compiles qmotion's small static C helpers with the machine's gcc, cached by source hash."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from qmotion.image.errors import ImageBuildError, ImageInputError
from qmotion.locks import file_lock
from qmotion.paths import cache_dir


def compile_static(name: str, source: bytes) -> Path:
    """Path of the static binary built from ``source``; built once per distinct source."""
    digest = hashlib.sha256(source).hexdigest()[:16]
    bin_dir = cache_dir() / "bin"
    out = bin_dir / f"{name}-{digest}"
    if out.is_file():
        return out
    with file_lock(bin_dir / f".{name}.lock"):
        if out.is_file():
            return out
        with tempfile.TemporaryDirectory(prefix=f"cc-{name}-") as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_bytes(source)
            built = Path(tmp) / name
            try:
                proc = subprocess.run(
                    [
                        "gcc",
                        "-static",
                        "-O2",
                        "-Wall",
                        "-Wextra",
                        "-pthread",
                        "-o",
                        str(built),
                        str(src),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise ImageInputError("gcc is not installed (run `make setup`)") from exc
            if proc.returncode != 0:
                raise ImageBuildError(f"compile {name}", proc.stderr)
            tmp_out = out.with_suffix(".tmp")
            # Copy, not rename: the temp dir may be on another filesystem than the cache.
            tmp_out.write_bytes(built.read_bytes())
            tmp_out.chmod(0o755)
            os.replace(tmp_out, out)
    return out
