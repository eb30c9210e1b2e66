"""`python -m tribunal` and the `tribunal` command: the batch scripts' entry point.

Commands that write a store catch stop signals before anything slow is imported, so a preemption in the
first second exits with the resumable code (75) like any later one.
"""

import sys

RESUMABLE_COMMANDS = ("generate", "run", "capture")


def main():
    if len(sys.argv) > 1 and sys.argv[1] in RESUMABLE_COMMANDS:
        from .traces.stop import catch_early

        catch_early()
    from .cli import main as cli

    cli(prog_name="tribunal")


if __name__ == "__main__":
    main()
