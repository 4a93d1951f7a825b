"""Human output: tables on a terminal, plain wide lines otherwise (rich decides the styling)."""

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from publisher.publish import Report, Status

# Not a terminal: no wrapping at 80 columns, so lines stay whole for grep and logs.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, highlight=False)

_STYLE = {Status.CHANGED: "green", Status.UNCHANGED: "dim", Status.FAILED: "bold red"}


def fail(message: str) -> None:
    """The one line a user sees for an error they can act on; `message` is never read as
    markup (it names files and TOML tables: `[hosts.alpha]`)."""
    errors.print(Text.assemble(("herald: ", "bold red"), message), soft_wrap=True)


def warn(message: str) -> None:
    """One warning line on stderr; `message` is never read as markup (it may quote a host)."""
    errors.print(Text.assemble(("herald: ", "yellow"), message), soft_wrap=True)


def print_report(report: Report, *, every_host: bool = False) -> None:
    """The publish summary: a row per host that changed or failed (`every_host`: every host),
    then the counts. A fleet of a thousand hosts that did not change prints one line."""
    shown = report.hosts if every_host else [r for r in report.hosts if r.status is not Status.UNCHANGED]
    if shown:
        grid = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("host", "result", "generation", "files", "note"):
            grid.add_column(column)
        for result in shown:
            changed = result.status is Status.CHANGED
            label = "would change" if report.dry_run and changed else str(result.status)
            grid.add_row(  # Text: a check's output or a path may hold brackets, never markup
                result.host,
                Text(label, style=_STYLE[result.status]),
                str(result.generation or "-"),
                f"+{len(result.added)} ~{len(result.modified)} -{len(result.removed)}" if changed else "",
                Text(result.message.splitlines()[0] if result.message else ""),
            )
        console.print(grid)
    for result in report.of(Status.FAILED):
        for line in result.message.splitlines()[1:]:
            console.print(f"  {result.host}: {line}", markup=False, soft_wrap=True)
    if report.dry_run:
        for result in report.of(Status.CHANGED):
            for mark, paths in (("+", result.added), ("~", result.modified), ("-", result.removed)):
                for path in paths:
                    console.print(Text(f"  {result.host}: {mark} {path}"), soft_wrap=True)
    counts = ", ".join(f"{len(report.of(status))} {status}" for status in Status)
    console.print(f"{'dry run: ' if report.dry_run else ''}{counts} in {report.seconds:.2f}s", style="bold")


def report_json(report: Report) -> bytes:
    """`herald publish --json`: every host's result, for scripts."""
    hosts = [
        {
            "host": result.host,
            "result": result.status.value,
            "generation": result.generation or None,
            "version": result.version or None,
            "added": list(result.added),
            "modified": list(result.modified),
            "removed": list(result.removed),
            "message": result.message,
        }
        for result in report.hosts
    ]
    summary = {status.value: len(report.of(status)) for status in Status}
    document = {
        "dry_run": report.dry_run,
        "seconds": round(report.seconds, 3),
        "counts": summary,
        "hosts": hosts,
    }
    return msgspec.json.encode(document)


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress callback drawing a bar on a terminal; None (no output) otherwise."""
    if not errors.is_terminal:
        yield None
        return
    from rich.progress import (  # noqa: PLC0415 - only on a terminal: the git hook's publish has none
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar:
        yield update
