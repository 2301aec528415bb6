"""`worldsim ingest`: convert published Minecraft recordings into a Minari dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class SourceFormat(str, Enum):
    """Published formats `worldsim.data.ingest` reads (kept equal to its SOURCE_FORMATS by a test;
    duplicated here so that `worldsim --help` does not import numpy and Minari)."""

    minerl_v04 = "minerl-v0.4"
    vpt = "vpt"
    teco = "teco"


def ingest(
    source: SourceFormat = typer.Option(
        ..., "--source", "-s", help="Format of the recordings: minerl-v0.4, vpt or teco."
    ),
    input_dir: Path = typer.Option(
        ..., "--input-dir", "-i", help="Folder searched recursively for episodes."
    ),
    dataset_id: str | None = typer.Option(
        None, "--dataset-id", "-d", show_default=False,
        help="Minari id to create or resume, e.g. worldsim/vpt-64-v0.  [required]",
    ),
    dataset_alias: str | None = typer.Option(
        None, "--dataset", hidden=True, help="Same as --dataset-id (the spelling `worldsim train` uses)."
    ),
    root: Path | None = typer.Option(
        None, help="Datasets folder (default: MINARI_DATASETS_PATH or ~/.minari/datasets)."
    ),
    size: int = typer.Option(64, min=8, help="Frames are resized to SIZE x SIZE RGB."),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Report and skip corrupt episodes instead of stopping."
    ),
    vpt_cursor: bool = typer.Option(
        True, help="VPT: draw the mouse cursor into frames with a GUI open, as VPT's loader does."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Convert MineRL v0.4, OpenAI VPT or TECO Minecraft recordings into a Minari dataset.

    Frames are resized to SIZE x SIZE; actions go to worldsim's shared Minecraft encoding.

    Running the same command again resumes: episodes already in the dataset (same source path or
    same file content) are skipped.
    """
    from worldsim.commands.common import merge_alias

    dataset_id = merge_alias(dataset_id, dataset_alias, None, "--dataset-id", "--dataset")
    if dataset_id is None:  # required, spelt either way
        raise typer.BadParameter("missing: the Minari id to create or resume", param_hint="'--dataset-id' / '-d'")
    from worldsim.data.ingest import ingest as run_ingest
    from worldsim.data.minecraft.video import RecordingError

    try:
        summary = run_ingest(
            source.value, input_dir, dataset_id, root=root, size=size,
            skip_bad=skip_bad, vpt_cursor=vpt_cursor, progress=progress,
        )  # fmt: skip
    except (RecordingError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None

    by_content = len(summary.duplicates)
    moved = f" ({by_content} of them by content, under another path)" if by_content else ""
    counts = (
        f"{summary.added} episodes added, {summary.already_present} already present{moved}, "
        f"{len(summary.bad)} bad skipped"
    )
    if summary.total_episodes:
        typer.echo(f"{dataset_id}: {counts}; it now holds {summary.total_episodes} episodes, "
                   f"{summary.total_steps} steps ({summary.dataset_path})")
    else:
        typer.echo(f"{dataset_id}: {counts}; no dataset written")
    for source_path, error in summary.bad:
        typer.echo(f"  bad: {source_path}: {error}", err=True)
