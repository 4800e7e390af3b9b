"""``qmotion image``: the image library (import, upload, list) and the built test guest image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from qmotion.api.server import ImageImport, ImageOut
from qmotion.api.sizes import format_size
from qmotion.cli.common import cells, console, err_console, errors_exit, fail, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(
    help="Disk images VMs are made from (import, list), and the built test guest (build)."
)
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")


@app.command("build")
def build(
    which: str = typer.Argument(
        "guest", help="guest: the built test guest; debian: a Debian 12 cloud image (qcow2)."
    ),
    force: bool = typer.Option(False, help="Rebuild even if the inputs did not change."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build an image, or reuse the cached one if its inputs are unchanged."""
    if which == "debian":
        from qmotion.image.debian import ensure_debian

        with errors_exit():
            path = ensure_debian(force=force)
        if json_out:
            print_json({"image": str(path), "format": "qcow2"})
        else:
            console.print(Text(f"Debian 12 image: {path}"))
            console.print(Text(f"  import it: qmotion image import {path} --name debian12"))
        return
    if which != "guest":
        fail(f"unknown image {which!r}: guest or debian", 2)
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


def _table(images: list[ImageOut]) -> Table:
    table = Table("name", "datastore", "path", "format", "virtual size", "allocated", "from")
    for i in images:
        table.add_row(
            *cells(
                i.name,
                i.datastore,
                i.path,
                i.format,
                format_size(i.virtual_size),
                format_size(i.allocated_bytes),
                i.source,
            )
        )
    return table


@app.command("import")
def import_(
    file: str = typer.Argument(..., help="qcow2 or raw image, a path on a host with DS"),
    name: str = typer.Option(..., "--name", help="The image's name in the library."),
    datastore: str = typer.Option(
        None, "--datastore", help="Where it goes; default: the first shared datastore."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    lab: str = LabOpt,
) -> None:
    """Check a disk image (qemu-img: format, size, backing file, corruption) and copy it into
    the library on a datastore."""
    try:
        req = ImageImport(file=file, name=name, datastore=datastore)
    except ValueError as exc:
        fail(str(exc), 2)
    with errors_exit(), server_client(lab) as client:
        image = client.import_image(req)
    if json_out:
        print_json(image.model_dump(mode="json"))
    else:
        console.print(_table([image]))


@app.command("upload")
def upload(
    file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, readable=True, help="qcow2 or raw image on this machine"
    ),
    name: str = typer.Option(..., "--name", help="The image's name in the library."),
    datastore: str = typer.Option(
        None, "--datastore", help="Where it goes; default: the first shared datastore."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Upload an image from this machine: streamed through the manager to a host that has the
    datastore, checked there (qcow2 or raw, no backing file) and added to the library."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    size = file.stat().st_size
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=json_out,
    )
    with errors_exit(), server_client() as client, bar:
        task = bar.add_task(f"uploading {file.name}", total=size)
        out = client.upload_image(
            file, name, datastore, progress=lambda sent: bar.update(task, completed=sent)
        )
    if json_out:
        print_json(out.model_dump(mode="json"))
    else:
        console.print(
            Text(
                f"image {out.name}: {out.format}, {format_size(out.virtual_size)} on "
                f"{out.datastore} (host {out.host})"
            )
        )


@app.command("list")
def list_(
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    lab: str = LabOpt,
) -> None:
    """The images in the library."""
    with errors_exit(), server_client(lab) as client:
        images = client.images()
    if json_out:
        print_json([i.model_dump(mode="json") for i in images])
    else:
        console.print(_table(images))
