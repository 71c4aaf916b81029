"""`python -m services.fusion`: the fusion worker, configured from CLISONIX_* environment variables."""

from __future__ import annotations

import asyncio

from services.common.runtime import configure_service_logging
from services.fusion.service import FusionService
from services.fusion.settings import FusionSettings


async def main() -> None:
    settings = FusionSettings()
    configure_service_logging(settings)
    service = FusionService(settings)
    service.runtime.lifecycle.install_signal_handlers()
    await service.start()
    await service.runtime.lifecycle.run_until_stopped()


if __name__ == "__main__":
    asyncio.run(main())
