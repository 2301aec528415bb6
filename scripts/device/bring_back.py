"""Turn what the GPU job brought back into a bundle, and install it only if it predicts better.

    python scripts/device/bring_back.py BACK [--heldout worldsim/mm9-heldout-v1] [--bundle DIR]
        [--clips-dataset worldsim/mm9-train-v1] [--work runs/bring-back] [--dry-run]

BACK is the folder the job's $OUT came back to (the `run` tool's files_at): results.json,
latest.json and checkpoints/step_N/ (checkpoint.json + ema.safetensors). Steps:

1. load the checkpoint (`load_world_model`) and print the job's summary from results.json;
2. build a candidate bundle from it with scripts/bundle_model.py into <work>/candidate, with the
   codec of the current bundle (its sha256 must be the one the job trained with) and as many
   context clips, of as many frames, as the current bundle ships;
3. evaluate the candidate and the current bundle with `worldsim eval prediction --json` on the
   same held-out windows (same seed) and print both tables;
4. replace the bundle (scripts/bundle_model.py --out <bundle>, with the held-out numbers and the
   job's figures recorded as metrics) only if BOTH the 1-step PSNR (teacher-forced, mean over the
   horizon) and the open-loop PSNR (mean over the horizon, 16 steps by default) are higher than
   the current bundle's (the open-loop sharpness is printed beside them). --dry-run never replaces.

Evaluation runs on the CPU with --threads torch threads (default 1) unless --device says otherwise.
Exit code 0 whether or not the bundle was replaced (the last line says which); 1 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("back", type=Path, help="the folder the GPU job's $OUT came back to")
    p.add_argument("--bundle", type=Path, default=None, help="bundle to compare with and replace (default: the installed one)")
    p.add_argument("--heldout", default="worldsim/mm9-heldout-v1", help="held-out Minari dataset for `worldsim eval prediction`")
    p.add_argument("--clips-dataset", default="worldsim/mm9-train-v1", help="dataset the new bundle's context clips come from")
    p.add_argument("--work", type=Path, default=Path("runs/bring-back"), help="folder for the candidate bundle and the evaluations")
    p.add_argument("--episodes", type=int, default=None, help="evaluate the first N held-out episodes (default: all)")
    p.add_argument("--starts-per-episode", type=int, default=8)
    p.add_argument("--context", type=int, default=9)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--sampler-steps", type=int, default=None, help="denoiser calls per frame (default: the dream's sampler, as users get it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device of the evaluation (cpu, cuda, auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation (OMP_NUM_THREADS)")
    p.add_argument("--dry-run", action="store_true", help="evaluate and report, never replace the bundle")
    return p.parse_args(argv)


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run(cmd: list[str], threads: int) -> str:
    """Run a command from the repository root; its stdout, or SystemExit with its stderr."""
    done = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited with {done.returncode}")
    return done.stdout


def build_bundle(checkpoint: Path, out: Path, *, codec: Path, clips_dataset: str, manifest: dict, threads: int,
                 metrics: Path | None = None) -> None:
    clips = manifest.get("clips") or {}
    cmd = [sys.executable, str(ROOT / "scripts" / "bundle_model.py"), "--checkpoint", str(checkpoint),
           "--dataset", clips_dataset, "--codec", str(codec), "--out", str(out),
           "--clips", str(clips.get("count", 4)), "--clip-frames", str(clips.get("frames", 9)),
           "--dtype", manifest.get("stored_dtype", "float16")]
    if manifest.get("maze_size") is not None:
        cmd += ["--maze-size", str(manifest["maze_size"])]
    if metrics is not None:
        cmd += ["--metrics", str(metrics)]
    print(run(cmd, threads).rstrip())


def evaluate(model: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "worldsim.cli", "eval", "prediction", "--checkpoint", str(model),
           "--dataset", args.heldout, "--context", str(args.context), "--horizon", str(args.horizon),
           "--starts-per-episode", str(args.starts_per_episode),
           "--seed", str(args.seed), "--device", args.device, "--json"]
    if args.sampler_steps is not None:
        cmd += ["--sampler-steps", str(args.sampler_steps)]
    if args.episodes is not None:
        cmd += ["--episodes", str(args.episodes)]
    return json.loads(run(cmd, args.threads))


def decide(new: dict, old: dict) -> tuple[bool, list[str]]:
    """Replace only if the 1-step (teacher-forced) and the open-loop mean PSNR both improve."""
    better, lines = True, []
    for key, label in (("teacher_forced", "1-step (teacher-forced) mean PSNR"), ("open_loop", "open-loop mean PSNR")):
        a, b = new["psnr"][key]["mean"], old["psnr"][key]["mean"]
        better = better and a > b
        lines.append(f"  {label}: {a:.2f} dB new vs {b:.2f} dB current ({a - b:+.2f})")
    # PSNR rewards blur: the open-loop sharpness is shown beside it (it does not decide; long dreams
    # are judged by `worldsim eval realism`, README).
    if "sharpness" in new and "sharpness" in old:
        a, b = new["sharpness"]["open_loop"]["mean"], old["sharpness"]["open_loop"]["mean"]
        lines.append(f"  open-loop sharpness (share of real frames'): {a:.2f} new vs {b:.2f} current ({a - b:+.2f})")
    return better, lines


def job_summary(back: Path) -> dict:
    file = back / "results.json"
    if not file.is_file():
        print(f"(no {file}: the job's figures are not recorded)")
        return {}
    r = json.loads(file.read_text())
    tr = r.get("train") or {}
    summary = {
        "status": r.get("status"), "device": (r.get("device") or {}).get("name"), "torch": (r.get("device") or {}).get("torch"),
        "steps": tr.get("steps"), "batch_size": tr.get("batch_size"), "window": tr.get("window"),
        "train_seconds": tr.get("seconds"), "final_loss": tr.get("final_loss"),
        "val_loss": (tr.get("val_curve") or [[None, None, None]])[-1][2],
        "val_loss_start": (tr.get("val_curve") or [[None, None, None]])[0][2],
        "tokens_per_s": tr.get("steady_tokens_per_s"), "mfu": tr.get("mfu"), "setup": tr.get("setup"),
        "rollout_frames_per_s": {str(row["batch"]): row.get("frames_per_s") for row in (r.get("bench") or {}).get("rows", [])},
    }  # fmt: skip
    print("GPU job:", json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from worldsim import bundled
    from worldsim.evaluation.prediction import format_table
    from worldsim.train.checkpoint import load_world_model

    back = args.back.resolve()
    bundle = (args.bundle or bundled.bundle_location()).resolve()
    work = (args.work if args.work.is_absolute() else ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        model, sidecar = load_world_model(back)
        current = bundled.read_manifest(bundle)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"checkpoint {back}: step {sidecar['step']}, {model.num_parameters()} parameters, "
          f"prev_frames {model.cfg.prev_frames}")
    summary = job_summary(back)

    candidate = work / "candidate"
    build_bundle(back, candidate, codec=bundle, clips_dataset=args.clips_dataset, manifest=current, threads=args.threads)
    print(f"evaluating the candidate and the current bundle on {args.heldout} ...", flush=True)
    new = evaluate(candidate, args)
    old = evaluate(bundle, args)
    (work / "eval-candidate.json").write_text(json.dumps(new, indent=2))
    (work / "eval-current.json").write_text(json.dumps(old, indent=2))
    print("\nCANDIDATE (from the GPU job)\n" + format_table(new))
    print("\nCURRENT BUNDLE\n" + format_table(old))
    better, lines = decide(new, old)
    print("\n" + "\n".join(lines))
    if not better:
        print(f"KEPT the current bundle {bundle}: the candidate is not better on both.")
        return 0
    if args.dry_run:
        print(f"the candidate is better on both; --dry-run: {bundle} left as it is.")
        return 0
    pick = lambda r, key="psnr": {k: {"mean": v["mean"], "at": v["at"]} for k, v in r.get(key, {}).items()}  # noqa: E731
    metrics = {"heldout_prediction": {"dataset": args.heldout, "windows": new["windows"], "config": new["config"],
                                      "psnr": pick(new), "sharpness": pick(new, "sharpness")},
               "previous_bundle_heldout_psnr": pick(old), "gpu_job": summary}
    metrics_file = work / "metrics.json"
    metrics_file.write_text(json.dumps(metrics, indent=2))
    build_bundle(back, bundle, codec=bundle, clips_dataset=args.clips_dataset, manifest=current, threads=args.threads,
                 metrics=metrics_file)
    bundled.load_bundle(bundle)  # every file checked against its sha256
    print(f"REPLACED the bundle {bundle} with the GPU-trained model (step {sidecar['step']}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
