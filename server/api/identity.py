"""``GET /api/v1/whoami``: the token's name and scopes, for the dashboard's login."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel

from trimtab.server.api.deps import ERRORS, Ctx, require
from trimtab.server.tokens import Principal

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["auth"])


class WhoAmI(BaseModel):
    name: str
    scopes: list[str]
    auth: bool  # false: the server runs without auth and everyone has every scope


@router.get("/whoami", response_model=WhoAmI)
async def whoami(ctx: Ctx, principal: Annotated[Principal, require("read")]) -> WhoAmI:
    """Who the bearer token belongs to and what it may do (needs the `read` scope)."""
    return WhoAmI(name=principal.name, scopes=sorted(principal.scopes), auth=ctx.settings.auth)
