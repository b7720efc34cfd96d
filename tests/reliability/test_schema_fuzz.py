"""Schemathesis against the app's own OpenAPI: every operation, with valid and invalid data, under all its default
checks (no server error; documented status codes, content types, headers and bodies; invalid data refused, valid
data accepted; undocumented methods answered 405 with Allow), sent in-process to a live app serving a model.

Bounded for CI: a fixed seed, deterministic generation and HALO_FUZZ_EXAMPLES (default 100) examples per operation
in the fuzzing phase; raise it for a long run. The cases run per operation are printed at the end."""
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.case import Case
from starlette.types import ASGIApp, Receive, Scope, Send

from app.main import create_app
from tests.api.conftest import make_settings

EXAMPLES = int(os.environ.get("HALO_FUZZ_EXAMPLES", "100"))
# A schema cannot say which strings and bytes are images, nor which top_k and heatmap_layer the served model has:
# /predict answers such schema-valid requests with its documented 400, 413, 415 and 422 (5xx stay not_a_server_error's).
PREDICT_ACCEPTS = ["2xx", "400", "413", "415", "422", "5xx"]
# Nor which model names the server serves, nor which inputs fit the model's shapes: v2's 404 and the same as /predict.
V2_ACCEPTS = {"^/v2/models/.*/infer$": PREDICT_ACCEPTS + ["404"], "^/v2/models/.*(}|/ready)$": ["2xx", "404", "5xx"]}
CONFIG = SchemathesisConfig.from_dict({
    "seed": 20240601,
    "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True, "database": "none"},
    "operations": [{"include-path": "/predict",
                    "checks": {"positive_data_acceptance": {"expected-statuses": PREDICT_ACCEPTS}}}] + [
        {"include-path-regex": path, "checks": {"positive_data_acceptance": {"expected-statuses": statuses}}}
        for path, statuses in V2_ACCEPTS.items()]})

# Schemathesis makes one test per operation when the module is collected, so the spec is read here; it does not
# depend on the settings, and the live app is checked to serve the same one.
schema = schemathesis.openapi.from_dict(create_app().openapi(), config=CONFIG)


class WithoutLifespan:
    """The app as schemathesis's in-process transport sees it. That transport runs the lifespan of the app it is
    given, which would start a second service next to the TestClient's; declining the lifespan scope is how an
    ASGI app says it has none, and servers then just send it requests."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("the lifespan runs in the TestClient")
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def live_app(random_compact_checkpoint: Path) -> Iterator[WithoutLifespan]:
    """An app like tests/api's, its model loaded before the first case (or every /predict would be a 503)."""
    app = create_app(make_settings(random_compact_checkpoint, max_body_bytes=2_000_000, max_pixels=1_000_000))
    with TestClient(app) as client:
        assert app.state.service.wait_until_loaded(120), app.state.service.load_error
        assert client.get("/openapi.json").json() == schema.raw_schema
        yield WithoutLifespan(app)


@pytest.fixture(scope="module")
def case_counts(request: pytest.FixtureRequest) -> Iterator[Counter]:
    """Cases run per (operation, phase, mode), written to the terminal once the fuzzing is over: the figures the
    docs quote."""
    counts: Counter = Counter()
    started = time.perf_counter()
    yield counts
    elapsed = time.perf_counter() - started
    per_operation: Dict[str, Counter] = defaultdict(Counter)
    for (label, phase, mode), count in counts.items():
        per_operation[label][f"{phase} {mode}"] += count
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        reporter.line("")  # off the progress line
        reporter.write_sep("-", f"schema fuzz: {sum(counts.values())} cases in {elapsed:.0f} s "
                                f"({EXAMPLES} fuzzing examples per operation)")
        for label, kinds in sorted(per_operation.items()):
            detail = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
            reporter.write_line(f"{label}: {sum(kinds.values())} ({detail})")


@schema.parametrize()
def test_every_operation_conforms_to_its_schema(case: Case, live_app: WithoutLifespan, case_counts: Counter) -> None:
    case_counts[case.operation.label, case.meta.phase.name.value, case.meta.generation.mode.value] += 1
    case.call_and_validate(app=live_app)
