"""Facts about this process on this machine that several rooms report: its peak resident memory."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (VmHWM, ``ru_maxrss``), including whatever it did before."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
