"""Pre-flight check: will this training command work here? Run it with the flags you will give scripts/train.py.

    python scripts/preflight.py --config configs/tiny_lm.yaml [--output_dir DIR ...]
        [--accelerate_config accelerate_configs/t4.yaml] [--slurm_signal_lead 120]

One line per check, `OK`, `WARN` (does not block) or `FAIL` (a blocker): library versions against
constraints.txt, the launch config (really distributed? its mixed precision on this hardware?), the output dir
(writable, free space for the checkpoints retention keeps), the data, the model and tokenizer (offline cache),
the GPU, and under Slurm (or with --slurm_signal_lead) the signal lead against the cost of a step and a save.
Nothing is trained and nothing is left on disk.

Flags of this script only:
  --accelerate_config FILE   the launch config to check (default: $ACCELERATE_CONFIG, else accelerate's default
                             config file, else none: one process)
  --slurm_signal_lead SECS   the lead of `--signal=B:USR1@SECS` (default: read from scontrol under Slurm)

Exit codes: 0 ready (warnings allowed), 1 a blocker, 2 bad input (one line on stderr naming the flag).
Every other flag is scripts/train.py's:
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from resumable.config import parse_config
from resumable.errors import UserError, exit_on_user_error


def pop_flag(argv: list[str], name: str) -> str | None:
    """Remove `name VALUE` / `name=VALUE` from argv (train.py's parser does not know it); its value or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"{name} needs a value")
            value = argv.pop(i + 1)
            argv.pop(i)
            break
        if arg.startswith(name + "="):
            value = argv.pop(i).split("=", 1)[1]
            if not value:
                raise UserError(f"{name} needs a value")
            break
    return value


def seconds(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise UserError(f"--slurm_signal_lead {text!r}: expected a number of seconds, e.g. 120")
    return int(text)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        parse_config(["--help"])  # train.py's flags; exits 0
    accelerate_config = pop_flag(argv, "--accelerate_config")
    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise UserError(f"--accelerate_config {accelerate_config}: file not found")  # before any line of the report
    lead = seconds(pop_flag(argv, "--slurm_signal_lead"))
    cfg = parse_config(argv)  # the same flags, defaults and one-line errors as scripts/train.py

    import transformers

    transformers.logging.set_verbosity_error()  # building the model on the meta device must not add noise here
    from resumable.preflight import report, run_preflight

    findings = []
    for finding in run_preflight(cfg, accelerate_config, lead):
        print(finding, flush=True)
        findings.append(finding)
    summary, code = report(findings)
    print(summary, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
