"""The ranks of a torch.distributed job: agreeing on one run uid through the job's store, and
the command lockstep every rank follows."""

from __future__ import annotations

import logging
import sys
import uuid
from typing import TYPE_CHECKING

from trimtab.options import Options

if TYPE_CHECKING:
    from trimtab.lockstep import Lockstep

logger = logging.getLogger("trimtab")

_dist_inits = 0


def run_uid(opts: Options) -> str:
    """The given uid; else, in a torch.distributed job, the one rank 0 publishes in the job's
    store (ranks wait up to ``rank_sync_timeout``); else a fresh one."""
    if opts.run_uid:
        return str(opts.run_uid)[:64]
    fresh = uuid.uuid4().hex
    if opts.world_size <= 1 or "torch" not in sys.modules:
        return fresh
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            logger.warning(
                "trimtab: world_size is %d but torch.distributed is not initialised: each rank gets its own run. "
                "Call trimtab.init after init_process_group, or give every rank the same run_uid.",
                opts.world_size,
            )
            return fresh
        from datetime import timedelta

        store = dist.distributed_c10d._get_default_store()
        # Every rank calls init the same number of times: the count keeps a later run of the
        # same job from joining an earlier one's uid.
        global _dist_inits
        _dist_inits += 1
        key = f"trimtab/run_uid/{_dist_inits}"
        if opts.rank == 0:
            store.set(key, fresh)
            return fresh
        store.wait([key], timedelta(seconds=opts.rank_sync_timeout))
        return bytes(store.get(key)).decode()
    except Exception as exc:
        logger.warning("trimtab: could not agree on a run id with rank 0 (%s); this rank gets its own run", exc)
        return fresh


def lockstep_for(opts: Options, uid: str) -> Lockstep | None:
    """Same-step commands on every rank of a torch.distributed job (see lockstep.py)."""
    if opts.world_size <= 1 or "torch" not in sys.modules:
        return None
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        from trimtab.lockstep import Lockstep

        return Lockstep(dist.distributed_c10d._get_default_store(), f"trimtab/cmds/{uid}", opts.rank)
    except Exception as exc:
        logger.warning("trimtab: no process-group store (%s): each rank applies commands when it gets them", exc)
        return None
