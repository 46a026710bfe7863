"""
Summarize a py-spy profile in collapsed-stack form (C{py-spy record
--format raw}): the functions with the most samples of their own (self)
and the most samples anywhere on the stack (total).

Usage: C{python profile_report.py profile.txt [TOP]}
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_ROOT_MARKERS = ("site-packages/", "lib/python3", "/work/main/")


def frame_key(frame: str) -> str:
    """
    Return C{function (short/path.py)} for a collapsed-stack frame, without
    the line number so that samples of one function add up.
    """
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in _ROOT_MARKERS:
        index = path.find(marker)
        if index >= 0:
            path = path[index + len(marker):]
            break
    if path.startswith("python3.") and "/" in path:
        path = path.split("/", 1)[1]
    return f"{match.group('name')} ({path})"


def summarize_collapsed(text: str, top: int = 20, expected_samples: int = 0) -> dict:
    """
    Return the sample count and the C{top} functions by self and by total
    share of the reactor thread's samples in a collapsed-stack profile.

    Stacks that do not pass through the reactor's main loop (thread-pool
    threads) are counted apart, as C{other_thread_samples}.

    @param expected_samples: sampling rate times duration; when given, the
        share of it the reactor thread was busy is returned as
        C{busy_percent} (py-spy records only active threads by default).
    @return: C{{"samples": n, "top_self": [...], "top_total": [...], ...}};
        each row has C{function}, C{self_percent} and C{total_percent}.
    """
    own: Counter = Counter()
    total: Counter = Counter()
    samples = 0
    other = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_key(frame) for frame in stack.split(";") if frame]
        frames = [frame for frame in frames if "(" in frame]
        if not frames:
            continue
        if not any(frame.startswith("ReactorBase.mainLoop ") for frame in frames):
            other += count
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count

    def row(function: str) -> dict:
        return {
            "function": function,
            "self_percent": 100 * own[function] / samples if samples else 0.0,
            "total_percent": 100 * total[function] / samples if samples else 0.0,
        }

    interesting_total = [
        name for name, _ in total.most_common()
        if "reductrai/" in name or "twisted/web" in name or "treq/" in name or "OpenSSL" in name or "lmdb" in name
    ]
    return {
        "samples": samples,
        "other_thread_samples": other,
        "busy_percent": round(100 * samples / expected_samples, 1) if expected_samples else None,
        "top_self": [row(name) for name, _ in own.most_common(top)],
        "top_total": [row(name) for name in interesting_total[:top]],
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as source:
        summary = summarize_collapsed(source.read(), int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    print(f"{summary['samples']} reactor-thread samples, {summary['other_thread_samples']} in other threads")
    print("self%  total%  function")
    for item in summary["top_self"]:
        print(f"{item['self_percent']:5.1f}  {item['total_percent']:6.1f}  {item['function']}")
    print("\ntotal%  function (reductrai, twisted.web, treq, OpenSSL, lmdb)")
    for item in summary["top_total"]:
        print(f"{item['total_percent']:6.1f}  {item['function']}")
