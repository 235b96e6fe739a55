"""Property-based conformance of the whole API against its own OpenAPI document (schemathesis through ASGI):
no 5xx for any generated request, and every response's status, content type and body as documented (errors
included: one `ErrorBody` schema for every error status). Bounded: a fixed seed, few examples per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from clipsearch.web import ServerSettings, create_app
from web_fixtures import TEST_HOSTS, build_indexed_photos

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_bundle):
    indexed = build_indexed_photos(tmp_path_factory.mktemp("schemathesis"), tiny_bundle, count=3)
    app = create_app(ServerSettings(allowed_hosts=TEST_HOSTS, collection=indexed.name, index_dir=indexed.index_dir))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_conforms_to_its_openapi_document(api_schema):
    """Each operation: its documented examples, then generated requests (schemathesis's strategies driven by
    hypothesis directly, not through its pytest plugin, which follows pytest's internals)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    failures = []
    for operation in operations:
        for strategy in [*operation.get_strategies_from_examples(), operation.as_strategy()]:

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def conforms(case) -> None:
                case.call_and_validate(checks=CHECKS)

            try:
                conforms()
            except Exception as exc:  # collect every operation's first failure, then report them all
                failures.append(f"{operation.label}: {exc}")
                break
    assert not failures, "\n\n".join(failures)
