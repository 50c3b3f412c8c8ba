"""``semidiff convert``: argument parsing and printing only (the work is in
:mod:`semidiff_nnunet.dataset_conversion.api`)."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typer.core import TyperCommand

from semidiff_nnunet.errors import SemidiffError

console = Console(stderr=True)
out = Console()


def _parse_options(items: list[str] | None) -> dict[str, str]:
    opts = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SemidiffError(f"--option {item!r} must look like KEY=VALUE.")
        opts[key.strip().replace("-", "_")] = value.strip()
    return opts


def converter_table() -> Table:
    """The installed converters: name, default id, what each converts and the SOURCE layout it expects, and
    where to download it."""
    from semidiff_nnunet.dataset_conversion.api import list_converters

    table = Table(title="Dataset converters (semidiff convert NAME SOURCE)", show_lines=True)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("id", justify="right")
    table.add_column("what / expected SOURCE layout")
    table.add_column("download")
    for c in list_converters():
        what = c["summary"] + "\n[dim]" + c["source_layout"] + "[/dim]"
        opts = [k for k in c["options"] if k != "num_processes"]
        if opts:
            what += "\n[dim]options (-o KEY=VALUE): " + ", ".join(opts) + "[/dim]"
        table.add_row(c["name"], "" if c["default_id"] is None else str(c["default_id"]), what, c["download_hint"])
    return table


def print_converter_list() -> None:
    out.print(converter_table())
    console.print("[dim]No download is attempted; fetch the data yourself, then run semidiff convert NAME SOURCE.[/dim]")


class ConvertCommand(TyperCommand):
    """``semidiff convert --help`` ends with the converters installed (looked up only when the help is asked
    for, so that other commands do not load them)."""

    def format_help(self, ctx, formatter) -> None:
        super().format_help(ctx, formatter)  # typer prints its rich help itself; click writes plain help here
        text = io.StringIO()
        Console(file=text, width=out.width, highlight=False).print(converter_table())
        formatter.write("\n" + text.getvalue())  # click prints this after the help, in either case


def convert_command(
    name: Annotated[str | None, typer.Argument(help="Converter name (the table below lists them).")] = None,
    source: Annotated[Path | None, typer.Argument(help="Folder of the original download.")] = None,
    dataset_id: Annotated[int | None, typer.Option("--id", help="nnU-Net dataset id (default: the converter's).")] = None,
    dataset_name: Annotated[str | None, typer.Option("--name", help="Dataset name (default: the converter's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing target dataset.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Run nnU-Net's integrity check before moving into place.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List converters, their source layouts and download hints.")] = False,
    option: Annotated[list[str] | None, typer.Option("-o", "--option", help="Converter option KEY=VALUE (repeatable).")] = None,
    processes: Annotated[int | None, typer.Option("-p", "--processes", help="Worker processes.")] = None,
) -> None:
    """Convert a public dataset from its original download layout into nnU-Net raw format.

    Example: semidiff convert ph2 ~/Downloads/PH2Dataset --id 512
    """
    if list_:
        print_converter_list()
        return
    if not name or source is None:
        raise SemidiffError("Give a converter NAME and the SOURCE folder (semidiff convert --list shows the names).")
    from semidiff_nnunet.dataset_conversion import api

    logger = logging.getLogger("semidiff_nnunet.convert")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    folder = api.convert_dataset(name, source, dataset_id=dataset_id, dataset_name=dataset_name, overwrite=overwrite,
                                 verify=verify, num_processes=processes, **_parse_options(option))
    info = api.summary(folder)
    console.print(f"[green]Converted[/green] {name} ({info.get('source_form', '')}) into {folder}")
    parts = [f"{info['numTraining']} training cases"]
    if info.get("numTest"):
        parts.append(f"{info['numTest']} test cases ({info.get('numTestLabels', 0)} with labels)")
    if info.get("numUnlabeled"):
        parts.append(f"{info['numUnlabeled']} unlabeled images")
    if info.get("splits_final"):
        parts.append("splits_final.json (paper train/val split)")
    console.print("  " + ", ".join(parts))
    console.print("  labels: " + ", ".join(f"{k}={v}" for k, v in info["labels"].items()))
    for note in info.get("notes", []):
        console.print(f"  [yellow]note:[/yellow] {note}")
    if verify:
        console.print("  nnU-Net's integrity check passed.")
