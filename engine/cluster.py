"""The one place fescale connects to Ray: join a cluster, or start a local one sized for the job.

`fescale run/distill/serve`, the benchmarks and `fescale train` all come through `connect`; each
says how many logical CPUs its actors reserve, and a local cluster gets at least that many plus
one, so nothing waits for CPUs a model replica or a training worker holds (their torch/OpenMP
threads, not the logical count, decide how the physical cores are used).
"""

from __future__ import annotations

import logging
import math
import os

import ray

log = logging.getLogger("fescale")
# A new local cluster turns Ray's token auth on and says so as a WARNING on every run, which users
# read as a failure. Auth stays on (RAY_AUTH_MODE=token explicitly is not the same: then Ray does not
# make the token a new cluster needs); only that one notice is dropped.
logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
    lambda record: not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")
)


def connect(address: str | None, reserved_cpus: float, *, metrics_port: int | None = None, dashboard: bool = False) -> None:
    """Join `address` (e.g. `auto`, or RAY_ADDRESS as `ray job submit` sets it), else start a fresh
    local cluster (even when a `ray start` cluster runs on this machine: `--address auto` joins it).

    `reserved_cpus`: what the job's actors reserve. `metrics_port` fixes where Prometheus scrapes
    Ray's metrics on a local cluster. `dashboard` starts the dashboard with a local cluster: off by
    default (processes and CPU a 2-core machine would take from the model), on for Ray Train, whose
    placement-group cleaner asks the state API (a dashboard service) about its controller every
    second, warns on every failure, and without it could never clean up after a dead controller."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
        return
    num_cpus = max(os.cpu_count() or 1, math.ceil(reserved_cpus + 1))
    ray.init(
        address="local",
        num_cpus=num_cpus,
        logging_level=logging.WARNING,
        include_dashboard=dashboard,
        _metrics_export_port=metrics_port,
    )
    log.info("started a local Ray cluster with %d logical CPUs (%g reserved by the job's actors)", num_cpus, reserved_cpus)
