"""List, verify, inspect, prune and export the checkpoints of a run.

    python scripts/checkpoints.py list outputs/tiny_lm
    python scripts/checkpoints.py verify outputs/tiny_lm            # exit 1 if any checkpoint is corrupted
    python scripts/checkpoints.py inspect outputs/tiny_lm/checkpoints/step-00000100
    python scripts/checkpoints.py prune outputs/tiny_lm --keep 2     # dry run; add --yes to delete
    python scripts/checkpoints.py export outputs/tiny_lm/checkpoints/step-00000100 --to exported/

Exit codes: 0 fine; 1 a checkpoint it reads is corrupted, unloadable or of a newer format (`list`, `verify`,
`inspect`, `export`; `prune` leaves such checkpoints alone and exits 0); 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from resumable.checkpoint import list_checkpoints, newer_format, read_manifest, verify_checkpoint
from resumable.checkpoint_tools import UNUSABLE_EXIT_CODE, refuse_newer_format
from resumable.disk import folder_bytes
from resumable.errors import UserError, exit_on_user_error
from resumable.export import COMPLETE
from resumable.inspection import human
from resumable.remote import is_remote
from resumable.retention import RetentionPolicy, describe, pools, remove_checkpoint
from resumable.run_dir import (
    MIRRORS,
    REMOTE_INVALID,
    leftovers,
    listed_bytes,
    manifest_or_none,
    open_checkpoint,
    open_store,
    run_state,
)

# --- helpers


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def policy_from(args: argparse.Namespace, keep_last: int | None, checkpoints: Path) -> RetentionPolicy:
    """The retention the run recorded in its newest manifest (every pool), overridden by the flags given."""
    recorded: dict = {}
    for folder in reversed(list_checkpoints(checkpoints)):
        try:
            recorded = read_manifest(folder).get("retention") or {}
            break
        except (OSError, ValueError):
            continue
    metric = args.metric or recorded.get("metric", "eval/loss")
    better = args.greater_is_better
    if better is None:  # what the run used, else the same inference as --greater_is_better in training
        better = recorded.get("greater_is_better") if metric == recorded.get("metric") else None
        better = not metric.endswith(("loss", "perplexity")) if better is None else better
    keep_last = recorded.get("keep_last") if keep_last is None else keep_last
    epoch_every = recorded.get("keep_epoch_every", 0) if args.keep_epoch_every is None else args.keep_epoch_every
    keep_best = recorded.get("keep_best", 1) if args.keep_best is None else args.keep_best
    return RetentionPolicy(keep_last, epoch_every, keep_best, metric, better)


def check_all(checkpoints: Path, deep: bool) -> dict[str, str | None]:
    """Name -> None if valid, else the reason (remote checkpoints that failed to pull included)."""
    reasons = {f.name: verify_checkpoint(f, deep=deep) for f in list_checkpoints(checkpoints)}
    if checkpoints in MIRRORS:
        reasons.update(REMOTE_INVALID)
    return dict(sorted(reasons.items()))


def wanted_by(checkpoints: Path, reasons: dict[str, str | None], policy: RetentionPolicy) -> dict[str, set[str]]:
    valid = [describe(checkpoints / name, policy.metric) for name, r in reasons.items() if r is None]
    return pools(valid, policy)


# --- commands


def cmd_list(args: argparse.Namespace) -> int:
    checkpoints, run = open_store(args.output_dir)
    reasons = check_all(checkpoints, deep=args.deep)
    policy = policy_from(args, args.keep_last, checkpoints)
    wanted = wanted_by(checkpoints, reasons, policy)
    rows = []
    for name, reason in reasons.items():
        folder = checkpoints / name
        m, step, epoch, value = manifest_or_none(folder), name.removeprefix("step-").lstrip("0") or "0", "?", "-"
        if m is not None:  # an invalid checkpoint's manifest may still say what it was
            step, epoch = str(m.get("step", step)), f"{m.get('epoch', '?')}{'*' if m.get('epochs_done') else ''}"
        if reason is None:
            metric = describe(folder, policy.metric).metric
            value = "-" if metric is None else f"{metric:.6g}"
        kept = ", ".join(sorted(wanted.get(name, ()))) or ("(never pruned)" if reason else "(prunable)")
        rows.append([name, step, epoch, value, human(folder_bytes(folder)), reason or "yes", kept])
    print_table(["name", "step", "epoch", policy.metric, "size", "valid", "kept by"], rows)
    if not rows:
        print(f"(no checkpoints in {checkpoints})")
    print("epoch: 0-based epoch in progress; * saved at an epoch end")
    if not args.deep:
        print("valid: sizes only; `verify` recomputes the sha256 of every file")
    for name in leftovers(checkpoints):
        print(f"leftover of an interrupted save or delete: {name}")
    print(run_state(run))
    return UNUSABLE_EXIT_CODE if any(reasons.values()) else 0


def cmd_verify(args: argparse.Namespace) -> int:
    checkpoints, _ = open_store(args.output_dir)
    t0, checked, bad = time.perf_counter(), 0, 0
    folders = list_checkpoints(checkpoints)
    for folder in folders:
        reason = verify_checkpoint(folder, deep=not args.quick)
        checked += listed_bytes(folder)
        if reason is None:
            print(f"{folder.name}  ok")
        else:
            bad += 1
            print(f"{folder.name}  {'UNREADABLE' if newer_format(folder) else 'CORRUPT'}: {reason}")
    if checkpoints in MIRRORS:  # remote ones that did not verify were never downloaded
        for name, reason in sorted(REMOTE_INVALID.items()):
            bad += 1
            print(f"{name}  CORRUPT: {reason}")
    seconds = time.perf_counter() - t0
    if not folders:
        print(f"no checkpoints in {checkpoints}")
    what = "checked sizes of" if args.quick else "read"
    rate = f" ({checked / 1e6 / seconds:.1f} MB/s)" if checked and not args.quick else ""
    print(f"{len(folders)} checkpoint(s), {bad} invalid; {what} {human(checked)} in {seconds:.2f} s{rate}")
    for name in leftovers(checkpoints):
        print(f"leftover of an interrupted save or delete (ignored): {name}")
    return UNUSABLE_EXIT_CODE if bad else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from resumable.inspection import summary_for, summary_order

    folder = open_checkpoint(args.path)
    refuse_newer_format(folder)  # its files may not mean what this version's summaries assume
    reason = verify_checkpoint(folder, deep=True)
    print(f"checkpoint {folder}: {'valid' if reason is None else 'INVALID: ' + reason}")
    failed = reason is not None
    files = sorted((p.name for p in folder.iterdir() if p.is_file()), key=summary_order)
    for name, summarise in ((n, summary_for(n)) for n in files):
        if summarise is None:
            continue
        print(f"\n{name} ({human((folder / name).stat().st_size)})")
        try:
            lines = summarise(folder / name)
        except (UserError, ValueError, OSError) as err:  # show the rest: inspecting a damaged checkpoint is the point
            lines, failed = [f"ERROR: {err}"], True
        print("\n".join(f"  {line}" for line in lines))
    others = [n for n in files if summary_for(n) is None]
    if others:
        print(f"\nother files (not opened): {', '.join(others)}")
    shards = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent != folder)  # DeepSpeed's per-rank files
    if shards:
        print("\nshards (not opened):")
        print("\n".join(f"  {p.relative_to(folder).as_posix()} ({human(p.stat().st_size)})" for p in shards))
    return UNUSABLE_EXIT_CODE if failed else 0


def cmd_prune(args: argparse.Namespace) -> int:
    checkpoints, run = open_store(args.output_dir)
    if args.keep_best is not None and args.keep_best < 1:
        raise UserError(f"--keep_best must be >= 1 (prune never deletes the best checkpoint), got {args.keep_best}")
    reasons = check_all(checkpoints, deep=not args.quick)
    wanted = wanted_by(checkpoints, reasons, policy_from(args, args.keep, checkpoints))
    doomed = [name for name, by in wanted.items() if not by]
    for name, reason in reasons.items():
        if reason is not None:
            print(f"leave   {name}  invalid, never pruned ({reason})")
        elif wanted[name]:
            print(f"keep    {name}  {', '.join(sorted(wanted[name]))}")
        else:
            print(f"{'delete' if args.yes else 'would delete'}  {name}  no pool wants it")
    for name in leftovers(checkpoints):
        print(f"leave   {name}  leftover of an interrupted save or delete (training removes it)")
    freed = sum(folder_bytes(checkpoints / name) for name in doomed)
    if not args.yes:
        print(f"dry run: {len(doomed)} checkpoint(s), {human(freed)} would be deleted; pass --yes to delete")
        return 0
    for name in doomed:
        remove_checkpoint(checkpoints / name)
    if checkpoints in MIRRORS:  # manifest first on the remote too
        MIRRORS[checkpoints].delete_remote(doomed)
    print(f"deleted {len(doomed)} checkpoint(s), freed {human(freed)}")
    if run is not None and not (run / COMPLETE).exists():
        print("note: the run is not complete; if it is still training, its own pruning uses its own flags")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from resumable.checkpoint_tools import export_checkpoint

    folder = open_checkpoint(args.path)
    if is_remote(args.to):
        raise UserError(f"--to {args.to}: remote targets are not supported yet")
    target = Path(args.to).expanduser()
    kind = export_checkpoint(folder, target, args.tokenizer, args.cache_dir, args.force, args.weights)
    print(f"exported {folder} ({kind} weights) to {target}")
    return 0


# --- command line


def at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UserError(f"{self.prog}: {message}")


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", help="Metric ranking the best pool (default: the one the run tracked, else eval/loss).")
    p.add_argument(
        "--greater_is_better",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Whether a larger metric is better (default: inferred from its name, as in training).",
    )
    recorded = "(default: what the run recorded)"
    p.add_argument("--keep_best", type=at_least(0), default=None, help=f"Best pool size {recorded}.")
    p.add_argument(
        "--keep_epoch_every",
        type=at_least(0),
        default=None,
        help=f"Epoch pool: every k-th epoch end; 0 off {recorded}.",
    )


def build_parser() -> Parser:
    parser = Parser(prog="checkpoints.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_help = "a run's --output_dir (or its checkpoints/ folder)"

    p = sub.add_parser("list", help="Table of checkpoints: step, epoch, metric, size, validity, pools.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help=run_help)
    p.add_argument(
        "--keep_last", type=at_least(1), default=None, help="Rolling pool size to show (default: the run's)."
    )
    add_policy_flags(p)
    p.add_argument("--deep", action="store_true", help="Recompute sha256 of every file (default: sizes only).")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", help="Recompute every checkpoint's checksums; exit 1 on any corruption.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help=run_help)
    p.add_argument("--quick", action="store_true", help="Compare file sizes only (misses bit flips).")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="Manifest, tensors, optimizer and scheduler state of one checkpoint.")
    p.add_argument("path", metavar="PATH", help="a checkpoint folder (checkpoints/step-*)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="Delete checkpoints no retention pool wants (dry run unless --yes).")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help=run_help)
    p.add_argument("--keep", type=at_least(1), required=True, help="Rolling pool: keep the newest N valid checkpoints.")
    add_policy_flags(p)
    p.add_argument("--quick", action="store_true", help="Judge validity by file sizes only (default: sha256).")
    p.add_argument("--yes", action="store_true", help="Really delete (default: print what would be deleted).")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="Write a checkpoint as a save_pretrained model + tokenizer.")
    p.add_argument("path", metavar="PATH", help="a checkpoint folder (checkpoints/step-*)")
    p.add_argument("--to", required=True, metavar="DIR", help="Target folder (written atomically).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --to folder.")
    p.add_argument("--tokenizer", metavar="DIR", help="Tokenizer folder, if the run's cannot be found.")
    p.add_argument("--cache_dir", metavar="DIR", help="The training's --cache_dir (to find its trained tokenizer).")
    p.add_argument("--weights", choices=("ema", "swa", "raw"), help="The weight average (--ema_decay or "
                   "--swa_start_epoch runs) or the trained weights; default: the average if the checkpoint has one, "
                   "as in final/")  # fmt: skip
    p.set_defaults(func=cmd_export)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def run_cli() -> int:
    """main(), ended quietly when the reader of stdout goes away (`inspect ... | head -1`), as Unix tools are."""
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows up here for output still buffered
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point stdout at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(run_cli())
