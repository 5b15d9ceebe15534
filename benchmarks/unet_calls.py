"""One request timed UNet call by UNet call: the time of a call, of a step, and the fixed costs.

A diffusers pipeline calls its UNet once per entry of its scheduler's timesteps (a batch of
two with classifier-free guidance). Most schedulers have one entry per step; PNDM, SD 1.5's
own scheduler, repeats its first one (with ``skip_prk_steps``: steps + 1 calls for more than
one step), and second-order schedulers such as Heun make about two calls per step. So a
request is measured in the calls its scheduler makes:

* a call takes the median gap between the starts of consecutive UNet calls (one UNet forward
  and the scheduler's update after it);
* the fixed costs are the rest: the request's total minus every gap and minus one more call
  for the last one (text encoding and set-up before the first call, the VAE decode and the
  image after the last);
* a request of N steps takes fixed + calls(N) x the call, where calls(N) is the length of the
  scheduler's timesteps for N steps, and a step of it calls(N) / N x the call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def stamped_calls(module) -> Iterator[list[float]]:
    """Within the block, the start time of each call of ``module`` (a UNet) in the list."""
    stamps: list[float] = []
    cls = type(module)

    def __call__(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return cls.__call__(self, *args, **kwargs)

    module.__class__ = type(f"Stamped{cls.__name__}", (cls,), {"__call__": __call__})
    try:
        yield stamps
    finally:
        module.__class__ = cls


def unet_calls(scheduler, steps: int) -> int:
    """How many UNet calls a pipeline makes in ``steps`` steps of ``scheduler``'s kind (asked
    of a fresh scheduler of its class and config: the one given keeps its state)."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(steps)
    return len(fresh.timesteps)


def timed_request(run: Callable[[], object], stamps: list[float]) -> dict:
    """Run one request and split its time into UNet calls and fixed costs."""
    stamps.clear()
    started = time.perf_counter()
    run()
    total = time.perf_counter() - started
    if len(stamps) < 3:
        raise RuntimeError(
            f"saw {len(stamps)} UNet calls; a median of the gaps between them needs at least 3"
        )
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    call = statistics.median(gaps)
    return {
        "total": total,
        "unet_calls": len(stamps),
        "unet_call_median": call,
        "unet_call_times": gaps,
        "fixed": total - sum(gaps) - call,
    }


def per_request(timing: dict, scheduler, steps: int, target_steps: int) -> dict:
    """``timing`` of a request of ``steps`` steps made with ``scheduler``, with what a request
    of ``target_steps`` steps takes: its UNet calls, its time per step, its total."""
    expected = unet_calls(scheduler, steps)
    if timing["unet_calls"] != expected:
        raise RuntimeError(
            f"{type(scheduler).__name__} makes {expected} UNet calls in {steps} steps, "
            f"but {timing['unet_calls']} were made"
        )
    target_calls = unet_calls(scheduler, target_steps)
    call = timing["unet_call_median"]
    return {
        **timing,
        "scheduler": type(scheduler).__name__,
        "steps": steps,
        "target_steps": target_steps,
        "target_unet_calls": target_calls,
        "step": target_calls / target_steps * call,
        "estimate": timing["fixed"] + target_calls * call,
    }
