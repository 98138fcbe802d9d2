"""Validate the grid and pipeline options (--dp, --pp, --micro-batches, --partition,
--schedule, --virtual-stages).

Pure checks, before any communicator or message: every rank gives the same
answer, so a bad combination stops all of them with one message.
"""

from __future__ import annotations

from .grid import GridError, grid_shape
from .partition import PartitionError, check_stages, parse_partition
from .pipeline_orders import ScheduleConfigError, check_schedule
from .tags import MAX_MICRO_BATCHES


class PipelineConfigError(ValueError):
    """A --pp / --dp / --micro-batches / --partition combination that cannot run."""


def check_pipeline_config(world, dp, pp, n_layers, batch_size, micro_batches, partition=None,
                          schedule="1f1b", virtual_stages=1, tp=1):
    """Validate the grid and pipeline options before any message (same answer on every rank).

    world ranks must be dp x pp x tp; every stage (pp x virtual stages of them)
    needs a layer; a ``--partition`` must list one positive count per stage,
    summing to the layers; the schedule must take the shape
    (``pipeline_orders.check_schedule``); a full global batch
    must give every replica at least one row per micro-batch. (A last partial
    batch too small for that runs with some empty micro-batches: the schedule
    stays the same and an empty micro-batch contributes nothing.)
    Returns (dp, pp). Raises PipelineConfigError.
    """
    v = virtual_stages
    if micro_batches < 1:
        raise PipelineConfigError(
            f"--micro-batches must be a positive integer (got {micro_batches})")
    try:
        dp, pp = grid_shape(world, dp, pp, tp)
        if v < 1:
            raise PipelineConfigError(f"--virtual-stages must be a positive integer (got {v})")
        if v > 1 and pp == 1:
            raise PipelineConfigError(f"--virtual-stages {v} splits each pipeline rank's "
                                      f"layers into chunks: use it with --pp 2 or more")
        check_stages(n_layers, pp * v, v)
        if partition and partition != "profile":
            parse_partition(partition, n_layers, pp * v)
        if pp > 1:
            check_schedule(schedule, pp, micro_batches, v)
    except (GridError, PartitionError, ScheduleConfigError) as e:
        raise PipelineConfigError(str(e)) from None
    if micro_batches < 1:
        raise PipelineConfigError(
            f"--micro-batches must be a positive integer (got {micro_batches})")
    if micro_batches * v > MAX_MICRO_BATCHES:
        per = "" if v == 1 else f" x --virtual-stages {v}"
        raise PipelineConfigError(f"--micro-batches {micro_batches}{per} is more than the "
                                  f"{MAX_MICRO_BATCHES} the message tags can number")
    if pp == 1 and micro_batches > 1:
        raise PipelineConfigError("--micro-batches splits the batch between pipeline stages: "
                                  "use it with --pp 2 or more")
    smallest = batch_size // dp
    if smallest < micro_batches:
        raise PipelineConfigError(
            f"--batch-size {batch_size} over {dp} data-parallel replica(s) gives a replica "
            f"{smallest} row(s) per step, fewer than --micro-batches {micro_batches}: every "
            f"micro-batch needs at least one row; use --batch-size >= {dp * micro_batches} "
            f"or fewer micro-batches")
    return dp, pp
