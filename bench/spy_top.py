"""Rank the functions in py-spy's collapsed stacks (``bench/load.py --spy FILE``).

    python bench/spy_top.py FILE [--top 40] [--under NAME]

Prints each function's share of the samples: inclusive (it or anything it called was
running) and self (it was the innermost frame). ``--under NAME`` keeps only the stacks
that pass through a function whose name contains NAME (e.g. ``FrameTicker._tick``), so a
subtree can be read on its own; shares stay relative to every sample taken.
"""

from __future__ import annotations

import argparse
import collections
import re

_FRAME = re.compile(r"(?P<name>.*) \((?P<file>.*):\d+\)$")


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m["file"].split("site-packages/")[-1]
    for root in ("/media/", "/gateway/", "/bench/"):
        if root in file:
            file = root[1:] + file.split(root, 1)[1]
    return f"{m['name']} ({file})"


def rank(path: str, under: str | None = None) -> tuple[int, collections.Counter, collections.Counter]:
    inclusive: collections.Counter = collections.Counter()
    innermost: collections.Counter = collections.Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            names = [frame_name(f) for f in stack.split(";")]
            if under and not any(under in name for name in names):
                continue
            for name in set(names):
                inclusive[name] += n
            innermost[names[-1]] += n
    return total, inclusive, innermost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--under")
    args = parser.parse_args()
    total, inclusive, innermost = rank(args.file, args.under)
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", innermost)):
        print(f"--- {title}")
        for name, n in counter.most_common(args.top):
            print(f"{100 * n / max(total, 1):5.1f} %  {name}")


if __name__ == "__main__":
    main()
