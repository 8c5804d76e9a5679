"""The protocol's vocabulary, named once for the agent and the server: the version, the
limits, the frame type tags, the event kinds, the built-in command kinds and the statuses a
command result can carry."""

from __future__ import annotations

from trimtab.jsonsafe import INT64_MAX as INT64_MAX  # the protocol's integers are int64
from trimtab.jsonsafe import INT64_MIN as INT64_MIN

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 8 * 1024 * 1024
INT32_MAX = 2**31 - 1
MAX_KEY_LENGTH = 256
MAX_NAME_LENGTH = 256
MAX_PROJECT_LENGTH = 128
MAX_HISTOGRAM_BINS = 4096
WS_PATH = "/ws/v1/agent"

# Agent -> server
HELLO = "hello"
BATCH = "batch"
CMD_RESULT = "cmd_result"
HEARTBEAT = "heartbeat"
BYE = "bye"
# Server -> agent
WELCOME = "welcome"
ACK = "ack"
CMD = "cmd"
ERROR = "error"

AGENT_FRAME_TYPES = frozenset({HELLO, BATCH, CMD_RESULT, HEARTBEAT, BYE})
SERVER_FRAME_TYPES = frozenset({WELCOME, ACK, CMD, ERROR})

# Event kinds the agent emits (an event's ``kind``); the server and the dashboard read them.
EVENT_NONFINITE = "nonfinite"  # NaN/Inf provenance (docs/metrics.md)
EVENT_OVERHEAD_GOVERNOR = "overhead_governor"  # the agent sampled less to stay in its budget
EVENT_COMMAND = "command"  # a command's final result in this process, the autopilot's included
EVENT_KINDS = (EVENT_NONFINITE, EVENT_OVERHEAD_GOVERNOR, EVENT_COMMAND)

# The built-in command kinds: the agent implements each, the server validates each.
BUILTIN_COMMANDS = (
    "reduce_lr",
    "set_lr",
    "set_hparams",
    "skip_batches",
    "rollback",
    "checkpoint",
    "pause",
    "resume",
    "stop",
    "set_autopilot",
)
# The statuses of a ``cmd_result``: delivered (queued in the process), then applied or rejected.
DELIVERED, APPLIED, REJECTED = "delivered", "applied", "rejected"
RESULT_STATUSES = (DELIVERED, APPLIED, REJECTED)
