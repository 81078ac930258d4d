"""Entry point: ``python -m benchmarks NAME [NAME ...]`` or ``python -m benchmarks all``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    """``NAME [NAME ...] [-- options passed to each benchmark's argument parser]``."""
    argv = sys.argv[1:] if argv is None else argv
    names, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    if not names or names in (["-h"], ["--help"]):
        print(
            "usage: python -m benchmarks NAME [NAME ...] | all [-- benchmark options]\navailable: "
            + ", ".join(available())
        )
        return 0 if names else 2
    if names == ["all"]:
        names = available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== benchmark {name}")
        sys.argv = [f"benchmarks.{name}", *extra]  # each benchmark's argparse sees only its own options
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
