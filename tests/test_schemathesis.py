"""Property-based conformance of the whole API against its own OpenAPI document (schemathesis through ASGI):
no 5xx for any generated request, and every response's status, content type and body as documented (errors
included: one `ErrorBody` schema for every error status). Bounded: a fixed seed, few examples per operation."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

from clipsearch.web import ServerSettings, create_app  # noqa: E402
from web_fixtures import TEST_HOSTS, build_indexed_photos  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_bundle):
    indexed = build_indexed_photos(tmp_path_factory.mktemp("schemathesis"), tiny_bundle, count=3)
    app = create_app(ServerSettings(allowed_hosts=TEST_HOSTS, collection=indexed.name, index_dir=indexed.index_dir))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case):
    case.call_and_validate(checks=CHECKS)
