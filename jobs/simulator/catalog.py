"""The simulator's GPU catalog: the serverless pools an endpoint can run on, with their list prices.

Shapes follow RunPod's ``GET /v2/catalog/gpus``: ``id`` is a GPU type id, ``pool`` the serverless pool id an
endpoint names in ``gpu.pools``, ``memory`` GB, and ``price.serverless`` USD per GPU-hour (flex, list
price). The prices are approximate list prices for illustration; billing uses them, so tests compute
expected amounts from this table rather than from RunPod's current price list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Gpu:
    id: str
    name: str
    pool: str
    memory: int
    secure: float  #: Pod price, secure cloud, USD per GPU-hour.
    community: float | None  #: Pod price, community cloud (None: not offered there).
    serverless: float  #: Serverless flex price, USD per GPU-hour.

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "pool": self.pool,
            "manufacturer": "NVIDIA",
            "memory": self.memory,
            "secure": True,
            "community": self.community is not None,
            "price": {"secure": self.secure, "community": self.community, "serverless": self.serverless},
            "maxCount": {"secure": 8, "community": 8 if self.community is not None else 0},
        }


#: One GPU type per pool: the one an endpoint on that pool is shown (and billed) as.
GPUS: tuple[Gpu, ...] = (
    Gpu("NVIDIA RTX A4000", "RTX A4000", "AMPERE_16", 16, 0.25, 0.17, 0.58),
    Gpu("NVIDIA RTX A5000", "RTX A5000", "AMPERE_24", 24, 0.27, 0.16, 0.68),
    Gpu("NVIDIA GeForce RTX 4090", "RTX 4090", "ADA_24", 24, 0.69, 0.34, 1.10),
    Gpu("NVIDIA RTX A6000", "RTX A6000", "AMPERE_48", 48, 0.49, 0.33, 1.22),
    Gpu("NVIDIA L40S", "L40S", "ADA_48_PRO", 48, 0.86, 0.79, 1.90),
    Gpu("NVIDIA A100 80GB PCIe", "A100 PCIe", "AMPERE_80", 80, 1.64, 1.19, 2.72),
    Gpu("NVIDIA H100 80GB HBM3", "H100 SXM", "ADA_80_PRO", 80, 2.69, None, 4.18),
    Gpu("NVIDIA H200", "H200 SXM", "HOPPER_141", 141, 3.59, None, 5.58),
)

POOLS: dict[str, Gpu] = {gpu.pool: gpu for gpu in GPUS}


def price_per_gpu_second(pool: str) -> float:
    """USD per GPU-second of serverless execution on ``pool``."""
    return POOLS[pool].serverless / 3600
