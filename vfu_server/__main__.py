"""``vfu-server`` and ``python -m vfu_server``: the priority first, then everything else."""

import sys

from .priority import lower_to, nice_in_argv


def run() -> int:
    # Before the imports: a live-handover successor must not outrun its predecessor for the CPU
    # while it starts (vfu_server/priority.py). cli.main applies what the parser decides.
    nice = nice_in_argv(sys.argv[1:])
    if nice:
        lower_to(nice)
    from .cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
