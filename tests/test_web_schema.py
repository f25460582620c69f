"""schemathesis against the live API's OpenAPI document, as an admin with a Bearer token:
whatever it sends, the server answers without a server error (5xx).

Every operation is driven by its own hypothesis strategy (schemathesis's pytest plugin
does not load under this pytest), both valid and invalid inputs, a few examples each.
"""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.web import ADMIN, live_web

EXAMPLES_PER_OPERATION = 12


def test_api_answers_without_server_errors(tmp_path: Path) -> None:
    with live_web(tmp_path) as live:
        schema = schemathesis.openapi.from_url(f"{live.base}/api/openapi.json")
        index = live.archive.index
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {f"{op.method.upper()} {op.path}" for op in operations}
        assert {"GET /api/recordings", "GET /api/recordings/{recording_id}/audio"} <= labels
        assert {"GET /api/export", "POST /api/users", "DELETE /api/tokens/{token_id}"} <= labels
        seen: list[str] = []
        server_errors: list[str] = []
        for operation in operations:
            strategy = st.one_of(
                operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
                operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
            )

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def call(case: schemathesis.Case) -> None:
                # A fresh token per call: a generated DELETE /api/tokens/{id} may revoke one.
                _token, secret = index.tokens.create(ADMIN[0], label="schemathesis")
                response = case.call(headers={"Authorization": f"Bearer {secret}"})
                seen.append(f"{case.method} {case.path} {response.status_code}")
                if response.status_code >= 500:
                    server_errors.append(
                        f"{case.method} {case.formatted_path} {case.query} -> "
                        f"{response.status_code}: {response.text[:200]}"
                    )

            call()
        assert server_errors == []
        assert len(seen) >= len(operations) * 3
        # The generated requests reached the endpoints, not just the auth wall.
        assert any(s.endswith(" 200") and "/api/recordings" in s for s in seen)
