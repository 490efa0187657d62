"""``python -m bench``: the storage benchmark, then the save-speed (stall) benchmark."""

from __future__ import annotations

import sys

from bench import stall, storage


def main() -> int:
    code = storage.main([])
    print("\n" + "=" * 100 + "\n")
    stall.main([])
    return code


if __name__ == "__main__":
    sys.exit(main())
