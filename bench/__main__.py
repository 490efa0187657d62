"""``python -m bench``: the storage, save-speed (stall), async-overlap, remote-cache,
several-process and command-line start-up benchmarks."""

from __future__ import annotations

import sys

from bench import cli, distributed, overlap, remote, stall, storage


def main() -> int:
    code = storage.main([])
    print("\n" + "=" * 100 + "\n")
    stall.main([])
    print("\n" + "=" * 100 + "\n")
    overlap.main([])
    print("\n" + "=" * 100 + "\n")
    remote.main([])
    print("\n" + "=" * 100 + "\n")
    distributed.main([])
    print("\n" + "=" * 100 + "\n")
    cli.main([])
    return code


if __name__ == "__main__":
    sys.exit(main())
