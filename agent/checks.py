"""Health checks (HTTP and TCP) and the rise/fall state machine around them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.config import CheckConfig, ServiceConfig

if TYPE_CHECKING:  # aiohttp (0.4 s of CPU) loads after a restarted agent has kept its lease alive
    import aiohttp


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One probe's outcome."""

    ok: bool
    detail: str
    seconds: float


class HealthCheck:
    """Probes one service; the session is shared across probes of an agent."""

    def __init__(self, service: ServiceConfig, session: aiohttp.ClientSession) -> None:
        self.service = service
        self.cfg: CheckConfig = service.check
        self.session = session
        addr = service.first_address
        host = f"[{addr}]" if ":" in addr else addr
        self.url = self.cfg.url or f"http://{host}:{service.port}/healthz"
        self.tcp_host = self.cfg.host or addr
        self.tcp_port = self.cfg.port or service.port

    async def probe(self) -> CheckResult:
        """Run one check within its timeout; never raises."""
        import aiohttp  # loaded by the session's creator already: a dictionary lookup

        start = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                ok, detail = await (self._http() if self.cfg.type == "http" else self._tcp())
        except TimeoutError:
            ok, detail = False, f"timed out after {self.cfg.timeout}s"
        except (OSError, aiohttp.ClientError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return CheckResult(ok, detail, time.monotonic() - start)

    async def _http(self) -> tuple[bool, str]:
        async with self.session.get(self.url, allow_redirects=False) as resp:
            body = await resp.text(errors="replace") if self.cfg.body_match else ""
            if resp.status != self.cfg.expect_status:
                return False, f"HTTP {resp.status}, expected {self.cfg.expect_status}"
            if self.cfg.body_match and self.cfg.body_match not in body:
                return False, f"body lacks {self.cfg.body_match!r}"
            return True, f"HTTP {resp.status}"

    async def _tcp(self) -> tuple[bool, str]:
        _, writer = await asyncio.open_connection(self.tcp_host, self.tcp_port)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True, "connected"


class RiseFall:
    """Turns a stream of probe results into a healthy/unhealthy verdict (rise/fall hysteresis)."""

    def __init__(self, rise: int, fall: int, healthy: bool = False) -> None:
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self._streak = 0  # consecutive results that disagree with the verdict

    def observe(self, ok: bool) -> bool:
        """Feed one result; returns True when the verdict flipped."""
        if ok == self.healthy:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak >= (self.rise if ok else self.fall):
            self.healthy = ok
            self._streak = 0
            return True
        return False
