"""A collective that failed because another rank died first: told in one line, not a traceback per rank.

Why: when one rank of a job fails (an error, out of memory, a kill), every other rank's next collective
fails too: gloo with "Connection closed by peer" / "Connection reset by peer", NCCL with a
DistBackendError once its watchdog aborts the communicator. Each survivor then printed some thirty lines
of traceback ending in a message that only says to look at another worker's log, and with many ranks
those tracebacks bury the one error that matters (the failed rank's own, or torchrun's summary naming
the rank that was killed). A survivor's error is a consequence, so it says so in one line; so is a
collective that timed out because a peer stopped answering.
"""
from __future__ import annotations

import os

# gloo's words for a peer that went away (its transport's read and write errors); NCCL's come as DistBackendError
_GLOO_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
# and for a peer that stopped answering (stalled, hung in I/O, stopped): the group's timeout passed
_GLOO_TIMEOUT = ("Timed out waiting", "Application timeout caused pair closure")


def lost_peer(err: BaseException) -> str | None:
    """The one-line account of `err` when it is a collective broken by another rank's failure, else None."""
    message = str(err).strip()
    backend = type(err).__name__ == "DistBackendError"  # torch.distributed's, without importing torch here
    gloo = isinstance(err, RuntimeError) and any(words in message for words in _GLOO_PEER_LOST + _GLOO_TIMEOUT)
    if not (backend or gloo):
        return None
    first = message.splitlines()[0] if message else type(err).__name__
    if first.startswith("[") and "] " in first:  # "[.../gloo/transport/tcp/pair.cc:553] Connection closed ..."
        first = first.split("] ", 1)[1]
    first = first.split(". This is typically caused", 1)[0]  # gloo's advice, which the sentence below gives
    rank = os.environ.get("RANK")
    who = f"rank {rank}" if rank is not None else "this process"
    if any(words in message for words in _GLOO_TIMEOUT):
        return (f"{who} timed out in a collective ({first}): another rank stopped answering (stalled, stuck in I/O, "
                "or stopped) or issued other collectives; a stack dump of the ranks (py-spy dump) shows where each waits; "
                "a training whose rank is only slow (a long index build or save) needs a longer parallel.timeout_minutes")
    return (f"{who} lost a peer in a collective ({first}): another rank failed or was killed first, and its "
            "own error (or torchrun's summary of the failed ranks) names the cause")
