"""`worldsim pack`: Minari episodes -> a compact training pack for the GPU job (docs/gpu.md)."""

from __future__ import annotations

from pathlib import Path

import typer


def pack(
    dataset: list[str] = typer.Argument(..., help="Minari dataset ids or folders (same action space and frame size)."),
    out: Path = typer.Option(..., "--out", "-o", help="Pack folder to create, e.g. runs/pack-mm9."),
    max_mib: float = typer.Option(38.0, help="Cap on the pack's size (the default fits a lent machine's call beside the repository): later episodes are cut or dropped to fit (said so). 0: no cap."),
    crf: int = typer.Option(12, min=0, max=51, help="x264 constant rate factor: lower is larger and closer to the raw frames."),
    pix_fmt: str = typer.Option("yuv444p", help="yuv444p (full-resolution colour) or yuv420p."),
    episodes: int | None = typer.Option(None, min=1, help="Pack only the first N episodes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing pack at --out."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Export episodes as H.264 videos + .npy arrays + a manifest with sha256s, readable with numpy
    and OpenCV alone (no gymnasium / minari), to carry to a GPU machine."""
    from worldsim.data.episode_store import DatasetError
    from worldsim.data.pack import PackError, write_pack

    try:
        summary = write_pack(
            list(dataset), out, crf=crf, pix_fmt=pix_fmt, max_mib=max_mib or None, max_episodes=episodes,
            overwrite=overwrite, progress=progress, log=lambda s: typer.echo(s, err=True),
        )  # fmt: skip
    except (PackError, DatasetError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(
        f"{summary.path}: {summary.episodes} episodes, {summary.steps} steps, "
        f"{summary.bytes / 2**20:.2f} MiB ({summary.bytes / max(1, summary.steps) / 1024:.3f} KiB/frame), "
        f"mean PSNR of the packed frames {summary.mean_psnr_db:.2f} dB, {summary.seconds:.1f} s"
    )
    if summary.dropped_steps:
        typer.echo(f"  left out to fit {max_mib} MiB: {summary.dropped_episodes} whole episodes, "
                   f"{summary.dropped_steps} steps in all")
