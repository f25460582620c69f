"""A faithful Yeastar S-Series PBX, for demos, tests and benchmarks (``callvault simulate``).

It speaks the API of ``yeastar-s-series-api.md`` over HTTPS on 127.0.0.1 (also under the
documents' typo path ``/api/v1.10/``): login and sliding tokens, lockout, one-time randoms
bound to token and IP, recording and CDR downloads (the CSV in the column order peers read
by position), call-progress, NewCdr and BootUp reports in all three formats (each written
in one go), digits-only recording names, and switchable faults. It shares only data types
with the client (``callvault.pbx._types``), never its logic.

    from callvault.simulator import Simulator, SimulatorConfig

    with Simulator(SimulatorConfig(password="secret")) as sim:
        cdr = sim.place_call(callfrom="1001", callto="1003", talk_seconds=3)
        ...  # sim.url, sim.cert_sha256, cdr.recording

:class:`PSeriesSimulator` is its P-Series (OpenAPI) sibling: ``yeastar-p-series-api.md``
over HTTPS and WSS, configured by :class:`PSeriesConfig` (see ``_pseries.py``).
"""

from callvault.simulator._clock import Clock
from callvault.simulator._config import SimulatorConfig
from callvault.simulator._faults import Faults, apply_fault, fault_names, parse_faults
from callvault.simulator._pseries import PSeriesSimulator
from callvault.simulator._pseries_types import PSeriesCall, PSeriesConfig, PSeriesFaults, Webhook
from callvault.simulator._simulator import Simulator
from callvault.simulator._state import ApiFailure, PbxState

__all__ = [
    "ApiFailure",
    "Clock",
    "Faults",
    "PSeriesCall",
    "PSeriesConfig",
    "PSeriesFaults",
    "PSeriesSimulator",
    "PbxState",
    "Simulator",
    "SimulatorConfig",
    "Webhook",
    "apply_fault",
    "fault_names",
    "parse_faults",
]
