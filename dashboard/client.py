"""The dashboard's only way to data: a small client of the REST API (``/api/v1``).

Callbacks run in the dashboard's worker threads; each builds a client from the session's
token and calls the API over HTTP, whether the API is this process or a remote server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from trimtab.jsonsafe import float_from_json

TIMEOUT_S = 10.0


class ApiError(Exception):
    """The API answered with an error body (or could not be reached: code ``unreachable``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Series:
    """One key's points as the API returned them, non-finite values as floats."""

    key: str
    steps: list[int]
    values: list[float]
    total_points: int = 0
    downsampled: bool = False
    bucket_steps: int = 1
    nonfinite: dict[str, int] = field(default_factory=dict)

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None


@dataclass
class Histogram:
    step: int
    edges: list[float]
    counts: list[int]
    nan: int
    pinf: int
    ninf: int


class ApiClient:
    """Blocking calls to one trimtab server with one token (``None``: auth is off)."""

    def __init__(self, base_url: str, token: str | None, http: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = http or _shared_client()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None) -> Any:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._http.request(
                method, f"{self.base_url}/api/v1{path}", params=query, json=body, headers=headers, timeout=TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"the trimtab API at {self.base_url} did not answer: {exc}") from exc
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                raise ApiError(resp.status_code, str(err["code"]), str(err["message"]))
            except (ValueError, KeyError, TypeError):
                raise ApiError(resp.status_code, "http_error", resp.text[:200]) from None
        return None if resp.status_code == 204 else resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params)

    # ------------------------------------------------------------------ endpoints

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/whoami")
        return result

    def runs(self, project: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/runs", project=project, limit=limit)
        return result

    def run(self, run_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/runs/{run_id}")
        return result

    def keys(self, run_id: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get(f"/runs/{run_id}/keys", rank=0)
        return result

    def scalars(
        self,
        run_id: int,
        key: str,
        *,
        start_step: int | None = None,
        end_step: int | None = None,
        since_step: int | None = None,
        max_points: int = 2000,
    ) -> Series:
        body = self.get(
            f"/runs/{run_id}/scalars",
            key=key,
            start_step=start_step,
            end_step=end_step,
            since_step=since_step,
            max_points=max_points,
        )
        return Series(
            key=key,
            steps=list(body["steps"]),
            values=[float_from_json(v) for v in body["values"]],
            total_points=int(body.get("total_points", len(body["steps"]))),
            downsampled=bool(body.get("downsampled", False)),
            bucket_steps=int(body.get("bucket_steps", 1)),
            nonfinite=dict(body.get("nonfinite", {})),
        )

    def histograms(self, run_id: int, key: str, limit: int = 200, since_step: int | None = None) -> list[Histogram]:
        body = self.get(f"/runs/{run_id}/histograms", key=key, limit=limit, since_step=since_step)
        return [
            Histogram(
                step=h["step"],
                edges=[float(x) for x in h["edges"]],
                counts=list(h["counts"]),
                nan=h["nan"],
                pinf=h["pinf"],
                ninf=h["ninf"],
            )
            for h in body["histograms"]
        ]

    def events(self, run_id: int, kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get(f"/runs/{run_id}/events", kind=kind, limit=limit)
        return result

    def alerts(self, run_id: int | None = None, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        path = f"/runs/{run_id}/alerts" if run_id is not None else "/alerts"
        result: list[dict[str, Any]] = self.get(path, status=status, limit=limit)
        return result

    def commands(self, run_id: int, limit: int = 100) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get(f"/runs/{run_id}/commands", order="newest", limit=limit)
        return result

    def send_command(self, run_id: int, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/runs/{run_id}/commands", body={"kind": kind, "args": args})
        return result


_client: httpx.Client | None = None


def _shared_client() -> httpx.Client:
    """One pooled HTTP client per process: keep-alive connections to the API across callbacks."""
    global _client
    if _client is None:
        _client = httpx.Client(limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))
    return _client
