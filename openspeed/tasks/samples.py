"""Reading a step's samples so that a bad one is skipped and counted, never fatal."""

from __future__ import annotations

from typing import Any

from openspeed.errors import BadSampleError


def usable_samples(dataset, indices: list[int], skips: dict[int, str] | None = None) -> list[Any]:
    """``dataset[i]`` for each index whose sample loads; a :class:`BadSampleError` leaves the sample
    out and, with ``skips``, records ``index -> reason`` there."""
    samples = []
    for index in indices:
        try:
            samples.append(dataset[index])
        except BadSampleError as exc:
            if skips is not None:
                skips[index] = exc.reason
    return samples
