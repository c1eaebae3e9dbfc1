"""When a run stops by itself, or is asked to: the training loop's guard (recipe section `guard`).

- A step whose loss (any rank's, any micro-step's) or gradient norm is not finite is skipped on
  every rank: weights and optimizer state stay as they were. The ranks agree on the step's loss
  (one all-reduce) before its last backward; when it is not finite, that backward is of a NaN
  loss (`skip_unless_finite`), so every gradient is NaN and the update is dropped by DeepSpeed's
  own check: its ZeRO-1/2/3 and bf16 optimizers skip a step whose global gradient norm is not
  finite (`engine.was_step_applied()` is then False). Without ZeRO (fp32) DeepSpeed steps the
  plain optimizer, so the loop drops the gradients itself.
  The data position and the LR schedule advance past a skipped step: the schedule is in tokens,
  and a skipped batch's tokens count as read (the batch is not tried again; a resume agrees).
- `max_bad_steps` skipped steps in a row, or a loss spike, stop the run: `RunStopped`, naming
  the step and the newest finished checkpoint. A spike is a loss above the mean loss of the last
  `spike_window` good steps by more than `spike_margin` nats and more than `spike_sigmas` times
  their step-to-step noise (`step_noise`): the margin is what a diverging large-batch run
  crosses (its noise is hundredths of a nat), the noise term keeps a small batch's (0.68 nats
  measured for 128-token steps of the tiny model) from stopping a healthy run. The running
  window starts again on resume.
- SIGTERM / SIGINT (a preempted job, Ctrl-C) ask every rank to stop after the current step with
  a checkpoint; the ranks agree on the step through the same all-reduce (a signal may reach them
  at different moments). A second Ctrl-C, a second or more after the first, interrupts at once.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.recipe import GuardConfig

log = logging.getLogger("lmpipe.train")


class RunStopped(LmpipeError):
    """The guard stopped a run (non-finite steps in a row, or a loss spike)."""


def skip_unless_finite(loss: Any, agreed_loss: Any) -> Any:
    """`loss` itself while the step's all-reduced loss is finite, else a loss whose gradient is
    NaN everywhere, which makes DeepSpeed skip the update. Decided on the device: no wait for
    the forward to finish before the backward is queued."""
    import torch

    return loss * torch.where(torch.isfinite(agreed_loss), 1.0, math.nan).to(loss.dtype)


@dataclass
class Guard:
    """The stop rules' state over the steps of one call."""

    config: GuardConfig
    bad_in_row: list[int] = field(default_factory=list)  # the skipped steps since the last good one
    recent: deque[float] = field(default_factory=deque)  # losses of the latest good steps

    def check(self, step: int, loss: float, grad_norm: float | None, skipped: bool) -> str | None:
        """Why the run stops after `step`, or None."""
        if not skipped and not (math.isfinite(loss) and math.isfinite(grad_norm or 0.0)):
            # A non-finite step DeepSpeed applied anyway: the weights are lost from here on.
            return (
                f"the loss ({loss:g}) or gradient norm ({grad_norm}) was not finite and the "
                "update was applied (DeepSpeed did not skip it)"
            )
        if skipped:
            self.bad_in_row.append(step)
            if len(self.bad_in_row) >= self.config.max_bad_steps:
                first = self.bad_in_row[0]
                return (
                    f"the loss or gradient norm was not finite in {len(self.bad_in_row)} steps "
                    f"in a row ({first}-{step}; guard.max_bad_steps = {self.config.max_bad_steps})"
                )
            return None
        self.bad_in_row.clear()
        margin, window = self.config.spike_margin, self.config.spike_window
        if margin is not None and len(self.recent) == window:
            mean = sum(self.recent) / window
            std = step_noise(self.recent)
            sigmas = self.config.spike_sigmas
            if loss > mean + max(margin, (sigmas or 0.0) * std):
                noise = f", guard.spike_sigmas = {sigmas:g} x noise {std:.3g}" if sigmas else ""
                return (
                    f"loss spike: {loss:.4g}, {loss - mean:.3g} above the mean of the last "
                    f"{window} steps ({mean:.4g}; guard.spike_margin = {margin:g}{noise})"
                )
        self.recent.append(loss)
        if len(self.recent) > window:
            self.recent.popleft()
        return None


def step_noise(losses: deque[float]) -> float:
    """The losses' step-to-step noise: the (sample) standard deviation of successive differences
    over sqrt(2), which is the standard deviation of independent noise around a level, but blind
    to a steady trend (the first 50 steps of the tiny model fall 7 nats: 2.0 nats of standard
    deviation, 0.63 of step noise). 0 for fewer than three losses: the margin alone decides."""
    values = list(losses)
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    if len(steps) < 2:
        return 0.0
    trend = sum(steps) / len(steps)
    return math.sqrt(sum((d - trend) ** 2 for d in steps) / (2 * (len(steps) - 1)))


class StopSignals:
    """SIGTERM and SIGINT set `received` (the signal's name) instead of ending the process, for
    the block; installed only in the main thread, the one Python runs handlers in. A second
    SIGINT a second or more after the first raises KeyboardInterrupt (a launcher that forwards
    the terminal's Ctrl-C delivers it twice at once; that counts as one).

    Nested in another (a sweep training its points in its own process), the inner one starts
    with a signal the outer one already has, and hands a signal it got back on exit: one that
    came after the training loop's last stop vote (in its final validation or save) still
    stops the sweep, and one that came in a point's set-up stops that point after a step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.received: str | None = None
        self._at = 0.0
        self._told = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        outer = self._outer()
        if outer is not None and outer.received and self.received is None:
            self.received, self._at = outer.received, outer._at
        return self

    def __exit__(self, *exc: object) -> None:
        outer = self._outer()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if outer is not None and self.received and outer.received is None:
            outer.received, outer._at = self.received, self._at

    def _outer(self) -> StopSignals | None:
        """The StopSignals whose handler this one replaced, if any."""
        owner = getattr(self._previous.get(signal.SIGTERM), "__self__", None)
        return owner if isinstance(owner, StopSignals) else None

    def mark(self, votes: Any) -> None:
        """This rank's votes (SIGTERM, SIGINT: 1 if received) into a device tensor of two, to be
        summed over the ranks; by a fill, so the device need not finish its queued work first.
        The first mark after a signal says so (here, not in the handler: a handler that wrote to
        a stream the interrupted code was writing to would fail on the reentrant call)."""
        if self.received and not self._told:
            self._told = True
            log.info("%s received: stopping after this step", self.received)
            if self.announce:
                sys.stderr.write(
                    f"\n{self.received}: stopping after this step, with a checkpoint "
                    "(Ctrl-C again to interrupt at once)\n"
                )
        votes[0].fill_(float(self.received == "SIGTERM"))
        votes[1].fill_(float(self.received == "SIGINT"))

    @staticmethod
    def agreed(votes: list[float]) -> str | None:
        """The signal every rank stops for, from the summed votes (SIGTERM first)."""
        return "SIGTERM" if votes[0] else "SIGINT" if votes[1] else None

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received, self._at = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._at >= 1.0:
            raise KeyboardInterrupt


def plain_step(engine: Any, grad_clip: float) -> float:
    """Without ZeRO, DeepSpeed steps the plain optimizer whatever the gradients hold (and clips
    them without recording their norm): the step's gradient norm, and the step only when it is
    finite, clipped to `grad_clip` (0: not clipped). Otherwise the gradients are dropped and the
    step counted as DeepSpeed's ZeRO optimizers count a skipped one (DeepSpeed's own step would
    fail on a model without them).

    The norm is summed in float64 and the clip applied here (DeepSpeed's is off under ZeRO-0:
    `plan.deepspeed_config`): on the CPU an fp32 norm drifts with a tensor's size (-2.4e-4
    relative for a 50,257 x 32 embedding's gradient, 0.37% at Cerebras-GPT 111M's 38.6M), which
    made ZeRO-0 log and clip by another norm than ZeRO-1/2/3, whose norms are exact."""
    import torch

    params = [p for p in engine.module.parameters() if p.grad is not None]
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in params]
    norm = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
    if math.isfinite(norm):
        if grad_clip > 0:
            # DeepSpeed's rule: scale by max_norm / (norm + 1e-6) where that is below 1.
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, torch.tensor(norm))
        engine.step()
    else:
        engine.zero_grad()
        engine.skipped_steps += 1
        engine.global_steps += 1
    return norm
