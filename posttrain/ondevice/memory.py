"""The training process's peak resident memory, and the budget a small device sets for it (``memory``)."""

from __future__ import annotations

import resource
import sys

from posttrain.config import MemoryConfig
from posttrain.errors import PosttrainError


class MemoryBudgetExceeded(PosttrainError):
    pass


def peak_rss_mb() -> float:
    """The highest resident set size this process has had so far, in MiB (everything it loaded counts).

    On Linux it is VmHWM, which exec resets; ``ru_maxrss`` is kept across fork and exec, so a small child of
    a large parent would report the parent's peak. Elsewhere ``ru_maxrss`` is all there is.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def memory_report(cfg: MemoryConfig) -> dict:
    """What run.json records: the peak always, the budget and the verdict when one is set."""
    peak = round(peak_rss_mb(), 1)
    if cfg.budget_mb is None:
        return {"peak_rss_mb": peak}
    return {"peak_rss_mb": peak, "memory_budget_mb": cfg.budget_mb, "within_memory_budget": peak <= cfg.budget_mb}


class MemoryBudget:
    """A loop step hook: stops the run (or warns once) when the peak RSS passes ``memory.budget_mb``.

    It logs no metric: the peak is reported once, in run.json (``memory_report``).
    """

    def __init__(self, cfg: MemoryConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.warned = False

    def __call__(self, step: int) -> dict:
        peak = peak_rss_mb()
        if peak > self.cfg.budget_mb:
            what = (f"peak resident memory {peak:.0f} MiB is over memory.budget_mb={self.cfg.budget_mb:g} at step "
                    f"{step}")
            if self.cfg.over_budget == "fail":
                raise MemoryBudgetExceeded(
                    f"{what}; the run stopped. Lower training.batch_size or data.max_seq_len, turn on "
                    f"training.gradient_checkpointing, or raise the budget (memory.over_budget=warn only reports it)"
                )
            if not self.warned:
                self.log(f"warning: {what} (memory.over_budget=warn: going on)")
                self.warned = True
        return {}
