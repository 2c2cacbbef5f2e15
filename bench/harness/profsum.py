"""Summaries of py-spy `record --format raw` files (collapsed stacks): where the time goes."""

from __future__ import annotations

import re
import sys
from collections import Counter

IDLE = re.compile(r"^(select|poll|epoll_wait|_run_once|wait|acquire|_worker|sleep|get) \(")
LINE = re.compile(r":\d+\)$")


def _fn(frame: str) -> str:
    """'func (path/file.py:123)' -> 'func (file.py)'."""
    frame = LINE.sub(")", frame)
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def summarize(path: str, top: int = 15) -> str:
    """Self and inclusive sample counts per function, idle (blocked) samples set apart."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = idle = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not n.isdigit():
                continue
            k = int(n)
            frames = [x for x in stack.split(";") if x and not x.startswith(("thread (", "process "))]
            if not frames:
                continue
            total += k
            leaf = frames[-1]
            if IDLE.match(leaf) or "Thread.run" in leaf and len(frames) < 4:
                idle += k
                continue
            self_c[_fn(leaf)] += k
            for fn in {_fn(x) for x in frames}:
                incl[fn] += k
    busy = total - idle
    out = [f"{path}: {total} samples, {busy} busy ({busy / max(total, 1) * 100:.0f}%), rest blocked/idle",
           "  self (busy samples):"]
    out += [f"    {c / max(busy, 1) * 100:5.1f}%  {fn}" for fn, c in self_c.most_common(top)]
    out.append("  inclusive (busy samples):")
    out += [f"    {c / max(busy, 1) * 100:5.1f}%  {fn}" for fn, c in incl.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(summarize(p))
        print()
