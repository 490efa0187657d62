"""``python -m bench``: the storage, save-speed (stall) and several-process benchmarks."""

from __future__ import annotations

import sys

from bench import distributed, stall, storage


def main() -> int:
    code = storage.main([])
    print("\n" + "=" * 100 + "\n")
    stall.main([])
    print("\n" + "=" * 100 + "\n")
    distributed.main([])
    return code


if __name__ == "__main__":
    sys.exit(main())
