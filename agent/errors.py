"""One error type for trimtab, and the one table that maps its codes to HTTP and websocket.

The agent package owns this table (it has no dependencies) so the server and the agent
agree on every code without the agent importing the server.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Stable, documented error codes. Values are what travels on the wire."""

    BAD_FRAME = "bad_frame"
    UNKNOWN_FRAME = "unknown_frame"
    UNSUPPORTED_VERSION = "unsupported_version"
    FRAME_TOO_LARGE = "frame_too_large"
    HELLO_EXPECTED = "hello_expected"
    INVALID_BATCH = "invalid_batch"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RUN_NOT_FOUND = "run_not_found"
    RUN_CONFLICT = "run_conflict"
    KEY_NOT_FOUND = "key_not_found"
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    STORE_UNAVAILABLE = "store_unavailable"
    SCHEMA_OUT_OF_DATE = "schema_out_of_date"
    INTERNAL = "internal"
    INVALID_RULE = "invalid_rule"
    RULE_NOT_FOUND = "rule_not_found"
    RULE_EXISTS = "rule_exists"
    ALERT_NOT_FOUND = "alert_not_found"
    INVALID_COMMAND = "invalid_command"
    COMMAND_NOT_FOUND = "command_not_found"
    COMMAND_CONFLICT = "command_conflict"
    RUN_FINISHED = "run_finished"
    INVALID_POLICY = "invalid_policy"
    POLICY_NOT_FOUND = "policy_not_found"


# code -> (HTTP status, websocket close code). 4xxx close codes are application-defined
# (RFC 6455 section 7.4.2); the last three digits echo the HTTP status where one fits.
ERROR_TABLE: dict[ErrorCode, tuple[int, int]] = {
    ErrorCode.BAD_FRAME: (400, 1007),
    ErrorCode.UNKNOWN_FRAME: (400, 1003),
    ErrorCode.UNSUPPORTED_VERSION: (400, 4426),
    ErrorCode.FRAME_TOO_LARGE: (413, 1009),
    ErrorCode.HELLO_EXPECTED: (400, 4400),
    ErrorCode.INVALID_BATCH: (422, 4422),
    ErrorCode.UNAUTHORIZED: (401, 4401),
    ErrorCode.FORBIDDEN: (403, 4403),
    ErrorCode.RUN_NOT_FOUND: (404, 4404),
    ErrorCode.RUN_CONFLICT: (409, 4409),
    ErrorCode.KEY_NOT_FOUND: (404, 4404),
    ErrorCode.INVALID_REQUEST: (422, 4422),
    ErrorCode.NOT_FOUND: (404, 4404),
    ErrorCode.STORE_UNAVAILABLE: (503, 1013),
    ErrorCode.SCHEMA_OUT_OF_DATE: (503, 1013),
    ErrorCode.INTERNAL: (500, 1011),
    ErrorCode.INVALID_RULE: (422, 4422),
    ErrorCode.RULE_NOT_FOUND: (404, 4404),
    ErrorCode.RULE_EXISTS: (409, 4409),
    ErrorCode.ALERT_NOT_FOUND: (404, 4404),
    ErrorCode.INVALID_COMMAND: (422, 4422),
    ErrorCode.COMMAND_NOT_FOUND: (404, 4404),
    ErrorCode.COMMAND_CONFLICT: (409, 4409),
    ErrorCode.RUN_FINISHED: (409, 4409),
    ErrorCode.INVALID_POLICY: (422, 4422),
    ErrorCode.POLICY_NOT_FOUND: (404, 4404),
}


class TrimtabError(Exception):
    """An error with a stable code and a message meant for the person who caused it."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return ERROR_TABLE[self.code][0]

    @property
    def close_code(self) -> int:
        return ERROR_TABLE[self.code][1]
