"""The ``fastconv`` console script: imports the package inside a Ctrl-C guard.

Importing fastconv loads NumPy and Numba (about a second); a Ctrl-C in that window would print
a traceback from the console script, so the import happens here, where it can be caught.
"""

import sys


def main() -> int:
    try:
        from fastconv.cli import main as cli_main
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
