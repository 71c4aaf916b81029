"""`python -m services.inference`: the KServe v2 gRPC server and the Kafka worker, configured from CLISONIX_*
environment variables.
"""

from __future__ import annotations

import asyncio

from services.common.runtime import configure_service_logging
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings


async def main() -> None:
    settings = InferenceSettings()
    configure_service_logging(settings)
    service = InferenceService(settings)
    service.runtime.lifecycle.install_signal_handlers()
    await service.start()
    await service.runtime.lifecycle.run_until_stopped()


if __name__ == "__main__":
    asyncio.run(main())
