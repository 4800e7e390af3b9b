"""``qmotion image``: build the test guest image."""

from __future__ import annotations

import typer
from rich.text import Text

from qmotion.cli.common import console, errors_exit, print_json

app = typer.Typer(help="The test guest image (Debian cloud kernel + busybox initramfs).")


@app.command("build")
def build(
    force: bool = typer.Option(False, help="Rebuild even if the inputs did not change."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build the guest image, or reuse the cached one if its inputs are unchanged."""
    from qmotion.image import ensure_image

    with errors_exit():
        image = ensure_image(force=force)
    result = {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "kernel_release": image.kernel_release,
        "key": image.key,
    }
    if json_out:
        print_json(result)
    else:
        console.print(Text(f"guest image {image.key}: kernel {image.kernel_release}"))
        console.print(Text(f"  kernel {image.kernel}\n  initrd {image.initrd}"))
