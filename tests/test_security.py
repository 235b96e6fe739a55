"""Safe by default: only ids reach files, traversal is 404, uploads are bounded, the API key guards every
data route, no CORS unless configured, loopback unless told otherwise."""

from __future__ import annotations

import base64
import http.client
import io
import os
import re
import select
import socket
import subprocess
import sys

import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.web import ServerSettings, create_app
from web_fixtures import IndexedPhotos, LiveServer, app_settings, build_indexed_photos, free_port, wait_until_healthy

KEY = "s3cret-key-for-tests"
PUBLIC_PATHS = {"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> IndexedPhotos:
    return build_indexed_photos(tmp_path_factory.mktemp("security"), tiny_bundle)


@pytest.fixture(scope="module")
def live(indexed):
    with LiveServer(create_app(app_settings(indexed))) as server:
        yield server


def raw_get(server: LiveServer, path: str) -> tuple[int, bytes]:
    """Send `path` byte for byte (no client-side normalisation of '..' or percent-escapes)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -- paths -----------------------------------------------------------------------------------------------
TRAVERSALS = [
    "/api/images/../../../../etc/passwd",
    "/api/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd/file",
    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/file",
    "/api/images/1%2F..%2F..%2Fetc%2Fpasswd/file",
    "/api/images/%2Fetc%2Fpasswd/file",
    "/api/images//etc/passwd/file",
    "/api/images/1/file/../../../../etc/passwd",
    "/api/images/..%5C..%5Cwindows%5Cwin.ini/file",
    "/api/images/1%00/file",
    "/api/images/%252e%252e%252fetc%252fpasswd/thumbnail",
    "/static/../../../../etc/passwd",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/%2e%2e/app.py",
    "/static//etc/passwd",
    "/static/..%5capp.py",
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_attempts_are_404(live, path):
    status, body = raw_get(live, path)
    assert status == 404, (path, status, body[:200])
    assert b"root:" not in body and b"def create_app" not in body


def test_static_serves_only_its_own_assets(live):
    assert raw_get(live, "/static/app.js")[0] == 200
    assert raw_get(live, "/static/__init__.py")[0] == 404


@pytest.mark.parametrize("field, value", [("image_b64", "/etc/passwd"), ("image_b64", "../../etc/hostname"),
                                          ("image", "/etc/passwd"), ("path", "/etc/passwd")])
def test_no_body_field_names_a_server_file(live, indexed, field, value):
    body = {"k": 3, "text": None, field: value}
    response = requests.post(f"{live.url}/api/search", json=body, timeout=10)
    # never a file read: not base64 (400), or a field /api/search does not take (422, named)
    assert response.status_code == (400 if field == "image_b64" else 422), response.text
    assert field == "image_b64" or field in response.json()["detail"]
    knn = requests.post(f"{live.url}/knn-service", data='{"image": "%s", "indice_name": "%s"}' % (value, indexed.name),
                        timeout=10)
    assert knn.status_code == 400


# -- uploads ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_limit_app(indexed):
    settings = app_settings(indexed, max_upload_bytes=50_000)
    with TestClient(create_app(settings)) as client:
        yield client


def test_upload_over_the_limit_is_413(small_limit_app):
    big = os.urandom(60_000)
    response = small_limit_app.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413 and "50,000 byte upload limit" in response.json()["detail"]
    as_json = small_limit_app.post("/api/search", json={"image_b64": base64.b64encode(big).decode()})
    assert as_json.status_code == 413
    classify = small_limit_app.post("/api/classify", data={"labels": "a"}, files={"file": ("b.jpg", big, "image/jpeg")})
    assert classify.status_code == 413


def test_default_upload_limit_is_20_mb():
    assert ServerSettings().max_upload_bytes == 20 * 1024 * 1024


def test_a_body_far_over_the_limit_is_refused_before_it_is_read(small_limit_app):
    too_much = ServerSettings(max_upload_bytes=50_000).max_body_bytes + 1  # room for base64 and form fields
    response = small_limit_app.post("/api/search/image", content=b"x" * too_much,
                                    headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert response.status_code == 413 and "request body is larger" in response.json()["detail"]
    assert "--max-upload-mb" in response.json()["hint"]


def test_a_chunked_body_over_the_limit_is_413(indexed):
    settings = app_settings(indexed, max_upload_bytes=50_000)
    with LiveServer(create_app(settings)) as server, socket.create_connection(("127.0.0.1", server.port), 10) as sock:
        sock.sendall(b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 65_536
        reply = b""
        # Up to 2.6 MB without a Content-Length: only counting what arrives can stop it. Stop sending as soon as
        # the server answers, so that it never closes on unread data (which would reset the connection).
        for _ in range(40):
            if select.select([sock], [], [], 0.02)[0]:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            sock.sendall(b"0\r\n\r\n")
        while True:  # the server closes the connection after its answer
            data = sock.recv(65_536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request body is larger" in reply


def _png_of(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = _png_of(15_000, 15_000)  # 225 MP of zeros: compresses to a few dozen KB
    assert len(data) < 100_000
    return data


def test_decompression_bombs_are_413(indexed, bomb):
    with TestClient(create_app(app_settings(indexed))) as client:
        upload = client.post("/api/search/image", files={"file": ("bomb.png", bomb, "image/png")})
        assert upload.status_code == 413 and "decompression bomb" in upload.json()["detail"]
        as_json = client.post("/api/search", json={"image_b64": base64.b64encode(bomb).decode()})
        assert as_json.status_code == 413
        classify = client.post("/api/classify", data={"labels": "a,b"}, files={"file": ("bomb.png", bomb, "image/png")})
        assert classify.status_code == 413
        knn = client.post("/knn-service", content='{"image": "%s"}' % base64.b64encode(bomb).decode())
        assert knn.status_code == 413


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG's signature, IHDR (8-bit grey) and IEND: enough for Image.open to read the size, no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_bomb_past_pillows_own_limit_gets_the_same_message(indexed):
    # 1.6 gigapixels: more than twice Pillow's default limit, where Pillow raised its own text before ours was read.
    with TestClient(create_app(app_settings(indexed))) as client:
        response = client.post("/api/search/image", files={"file": ("x.png", _png_header_only(40_000, 40_000), "image/png")})
    assert response.status_code == 413
    assert "image of 40000x40000 pixels is larger than the" in response.json()["detail"], response.json()
    assert "DOS" not in response.json()["detail"]


def test_pixel_limit_is_configurable(indexed):
    settings = app_settings(indexed, max_image_pixels=100 * 100)
    with TestClient(create_app(settings)) as client:
        response = client.post("/api/search/image", files={"file": ("x.png", _png_of(200, 200), "image/png")})
        assert response.status_code == 413 and "pixel limit" in response.json()["detail"]


# -- API key -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(indexed):
    settings = app_settings(indexed, api_key=KEY)
    with TestClient(create_app(settings)) as client:
        yield client


def _example_request(path: str, method: str, indexed: IndexedPhotos) -> dict:
    image_id = next(iter(indexed.ids_by_path.values()))
    url = path.replace("{image_id}", str(image_id))
    photo = indexed.photos[0].read_bytes()
    if method in ("get", "head"):
        params = {"/api/search": {"q": "cat"}, "/api/duplicates": {"threshold": 0.95}}.get(url)
        return {"method": method.upper(), "url": url, "params": params}
    if url == "/api/search":
        return {"method": "POST", "url": url, "json": {"text": "cat"}}
    if url in ("/api/search/image", "/api/classify"):
        fields = {"labels": "a,b"} if url == "/api/classify" else {}  # a field a route does not take is a 400
        return {"method": "POST", "url": url, "files": {"file": ("p.png", photo, "image/png")}, "data": fields}
    return {"method": "POST", "url": url, "content": '{"text": "cat", "ids": [1], "indice_name": "photos"}'}


def _every_operation(client: TestClient) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return [(path, method) for path, methods in paths.items() for method in methods if path not in PUBLIC_PATHS]


def test_every_data_route_requires_the_key(keyed, indexed):
    operations = _every_operation(keyed)
    assert len(operations) == 12  # 9 REST operations + 3 clip-back ones (HEAD of the image routes: below)
    for path, method in operations:
        request = _example_request(path, method, indexed)
        missing = keyed.request(**request)
        assert missing.status_code == 401, (path, method, missing.text)
        assert method == "head" or missing.json()["detail"] == "missing or wrong API key"  # HEAD: no body
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = keyed.request(**request, headers={"X-API-Key": KEY + "x"})
        assert wrong.status_code == 401
        wrong_bearer = keyed.request(**request, headers={"Authorization": f"Bearer {KEY[:-1]}"})
        assert wrong_bearer.status_code == 401
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            allowed = keyed.request(**request, headers=headers)
            assert allowed.status_code == 200, (path, method, headers, allowed.text)
    for route in ("thumbnail", "file"):  # HEAD, which the document does not list as operations of its own
        request = _example_request(f"/api/images/{{image_id}}/{route}", "head", indexed)
        assert keyed.request(**request).status_code == 401
        assert keyed.request(**request, headers={"X-API-Key": KEY}).status_code == 200


def test_key_check_comes_before_anything_else(keyed):
    # no information about ids, collections or validation leaks without the key
    assert keyed.get("/api/images/99999").status_code == 401
    assert keyed.get("/api/search", params={"collection": "nope"}).status_code == 401
    assert keyed.post("/knn-service", content=b"{not json").status_code == 401
    assert keyed.post("/api/search/image", content=b"x" * 100).status_code == 401


def test_page_and_health_load_without_the_key_and_hold_no_data(keyed):
    page = keyed.get("/")
    assert page.status_code == 200 and "clipsearch" in page.text
    assert keyed.get("/static/app.js").status_code == 200
    assert keyed.get("/healthz").json() == {"status": "ok"}
    for path in ("/healthz", "/"):  # uptime monitors send HEAD: 200 without a body, no key needed
        head = keyed.head(path)
        assert head.status_code == 200 and head.content == b"", path
    assert keyed.head("/api/stats").status_code in (401, 405)  # never data


def test_serve_command_takes_the_key_from_the_environment_and_binds_loopback(indexed):
    port = free_port()
    env = {**os.environ, "CLIPSEARCH_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--collection", indexed.name,
         "--index-dir", str(indexed.index_dir), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process)
        assert requests.get(f"{url}/api/stats", timeout=5).status_code == 401
        stats = requests.get(f"{url}/api/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        assert stats.status_code == 200 and stats.json()["images"] == len(indexed.photos)
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening:  # ss is in iproute2; when present, check the bound address
            local_addresses = [line.split()[3] for line in listening.splitlines()]
            assert local_addresses == [f"127.0.0.1:{port}"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    assert f"on http://127.0.0.1:{port}/" in stderr and "API key required" in stderr


def test_serve_on_a_port_in_use_says_so_before_loading_anything(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "clipsearch", "serve", "--collection", "nothing",
                                 "--index-dir", str(tmp_path), "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: port {port} on 127.0.0.1 is in use" in result.stderr and "--port N" in result.stderr
    assert "serving collection" not in result.stderr and "no collection named" not in result.stderr


def test_serve_command_reports_a_missing_collection_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clipsearch", "serve", "--collection", "nothing",
                             "--index-dir", str(tmp_path), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no collection named 'nothing'" in result.stderr and "Traceback" not in result.stderr


# -- CORS and headers ---------------------------------------------------------------------------------------
def test_no_cors_headers_unless_configured(indexed):
    with TestClient(create_app(app_settings(indexed))) as client:
        simple = client.get("/api/stats", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
        preflight = client.options("/api/search", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
        assert simple.headers["x-content-type-options"] == "nosniff"
    settings = app_settings(indexed, cors_origins=("https://photos.example",))
    with TestClient(create_app(settings)) as client:
        allowed = client.get("/api/stats", headers={"Origin": "https://photos.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://photos.example"
        # What a page on that origin must read of a response: Retry-After of a 503, ETag, a file's name.
        exposed = {h.strip().lower() for h in allowed.headers["access-control-expose-headers"].split(",")}
        assert {"retry-after", "etag", "content-disposition"} <= exposed
        other = client.get("/api/stats", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # A refusal made before routing (the body-size limit) is readable by that page too: it can say why.
        big = client.post("/api/search/image", content=b"x" * (settings.max_body_bytes + 1),
                          headers={"Origin": "https://photos.example", "Content-Type": "image/jpeg"})
        assert big.status_code == 413 and big.headers["access-control-allow-origin"] == "https://photos.example"
        assert "hint" in big.json()


def test_page_forbids_external_resources(indexed):
    with TestClient(create_app(app_settings(indexed))) as client:
        page = client.get("/")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        for asset in ("/static/index.html", "/static/app.js", "/static/style.css"):
            text = client.get(asset).text
            assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), asset
            assert "http://" not in text and "https://" not in text, asset


# -- Host header (DNS rebinding) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_hosts(indexed):
    """An app with the production Host check: no 'testserver', one extra allowed name."""
    settings = ServerSettings(collection=indexed.name, index_dir=indexed.index_dir, allowed_hosts=("photos.lan",))
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:8000",
                                  "LOCALHOST:80", "photos.lan", "Photos.LAN:8443"])
def test_loopback_and_allowed_host_names_are_answered(strict_hosts, host):
    response = strict_hosts.get("/api/stats", headers={"Host": host})
    assert response.status_code == 200, (host, response.text)


@pytest.mark.parametrize("host", ["testserver", "evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "localhost@evil.example", "evil.example#localhost",
                                  "localhost:80:90", "localhost:port", "[::1", "::1", "photos.lan.evil", "",
                                  "10.0.0.1", "0.0.0.0"])
def test_other_host_names_get_400_before_anything_runs(strict_hosts, host):
    for method, path in (("GET", "/api/stats"), ("GET", "/healthz"), ("GET", "/"), ("POST", "/knn-service")):
        response = strict_hosts.request(method, path, headers={"Host": host}, content=b'{"text": "cat"}')
        assert response.status_code == 400, (host, path, response.status_code)
        assert response.headers["content-type"] == "application/json"
        assert "does not answer to Host" in response.json()["detail"] and "--allowed-host" in response.json()["hint"]


def test_absolute_urls_use_the_checked_host_only(strict_hosts, indexed):
    body = '{"text": "photo", "num_images": 2, "indice_name": "%s"}' % indexed.name
    answer = strict_hosts.post("/knn-service", content=body, headers={"Host": "localhost:8123"}).json()
    assert answer and all(item["url"].startswith("http://localhost:8123/api/images/") for item in answer)
    refused = strict_hosts.post("/knn-service", content=body, headers={"Host": "evil.example"})
    assert refused.status_code == 400 and "evil.example/api" not in refused.text


def test_a_rebinding_request_to_a_live_server_is_refused(live):
    with socket.create_connection(("127.0.0.1", live.port), 10) as sock:
        sock.sendall(b"GET /api/stats HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65_536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b'"images"' not in reply
    with socket.create_connection(("127.0.0.1", live.port), 10) as sock:  # HTTP/1.0 without any Host
        sock.sendall(b"GET /api/stats HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65_536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b'"the request has no Host header"' in reply  # not "does not answer to Host 'missing'"


def test_malformed_allowed_hosts_are_refused_at_startup():
    with pytest.raises(ValueError):
        ServerSettings(allowed_hosts=("evil.example/path",))


# -- serving beyond loopback ----------------------------------------------------------------------------------
def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CLIPSEARCH_API_KEY"}
    return subprocess.run([sys.executable, "-m", "clipsearch", "serve", "--port", str(free_port()), *args],
                          env={**environment, **(env or {})}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "photos.lan"])
def test_serve_refuses_a_non_loopback_host_without_an_api_key(tmp_path, host):
    result = _serve("--host", host, "--index-dir", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "refusing to listen on" in result.stderr and "--api-key" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, env", [(["--insecure"], None), (["--api-key", KEY], None),
                                        ([], {"CLIPSEARCH_API_KEY": KEY})])
def test_serve_on_a_non_loopback_host_with_a_key_or_insecure_gets_past_the_check(tmp_path, extra, env):
    # A missing collection stops it right after the check (exit 1), so nothing ever listens on 0.0.0.0 here.
    result = _serve("--host", "0.0.0.0", "--collection", "nothing", "--index-dir", str(tmp_path), *extra, env=env)
    assert result.returncode == 1 and "no collection named 'nothing'" in result.stderr, result.stderr
    assert "refusing" not in result.stderr


@pytest.mark.parametrize("key", ["sécret-key", "ключ", "abc123 ", "two words"])
def test_an_api_key_no_client_could_send_is_refused_at_start(tmp_path, key):
    # Starlette reads header bytes as latin-1, curl and browsers send UTF-8, and HTTP trims spaces: such a key
    # started the server and then matched no request.
    result = _serve("--collection", "nothing", "--index-dir", str(tmp_path), env={"CLIPSEARCH_API_KEY": key})
    assert result.returncode == 2 and "printable ASCII without spaces" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_serve_on_loopback_needs_no_key(tmp_path, host):
    result = _serve("--host", host, "--collection", "nothing", "--index-dir", str(tmp_path))
    assert result.returncode == 1 and "refusing" not in result.stderr, result.stderr


def test_a_stalled_body_is_answered_408_but_a_wait_after_the_body_is_not_bounded():
    import asyncio

    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from clipsearch.web.security import BodySizeLimit

    async def listens_after_the_body(scope, receive, send):
        body = await Request(scope, receive).body()
        try:  # as a streaming response listens for the client going away: longer than the stall limit
            await asyncio.wait_for(receive(), 0.5)
        except asyncio.TimeoutError:
            pass
        await JSONResponse({"bytes": len(body)})(scope, receive, send)

    def run(first_chunks: list[bytes], last: bool) -> list[dict]:
        messages = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in first_chunks]
        if last:
            messages.append({"type": "http.request", "body": b"!", "more_body": False})
        sent: list[dict] = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)  # a client that never sends the rest
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        app = BodySizeLimit(listens_after_the_body, max_bytes=1000, stall_seconds=0.2)
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"100")]}
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
        return sent

    stalled = run([b"12345"], last=False)
    assert stalled[0]["status"] == 408 and b"stalled for more than 0.2 s" in stalled[1]["body"]
    whole = run([b"12345", b"678"], last=True)
    assert whole[0]["status"] == 200 and whole[1]["body"] == b"{\"bytes\":9}"
