"""RST regression: a real HTTP server (busybox httpd) and a real client (curl).

A complete download closes cleanly: no reset at all. A client that gives up
on a response it has not read yet (here curl hitting its --max-time on a slow
download) makes its own kernel reset the connection: an active RST, sent by
that client process. The server's logs would say "connection reset by peer".
"""
from __future__ import annotations

import pytest

from readiness import wait_for_listener

SERVER, CLIENT, PORT = "10.0.0.1", "10.0.0.2", 8080


@pytest.fixture
def web(make_netns, busybox, tmp_path):
    """(server ns, client ns) joined by a veth; busybox httpd serving tmp_path/www."""
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=[f"{SERVER}/24"], peer_addresses=[f"{CLIENT}/24"])
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("<h1>hello</h1>\n")
    (www / "big.iso").write_bytes(b"x" * (4 << 20))
    server.popen([busybox, "httpd", "-f", "-p", f"{SERVER}:{PORT}", "-h", str(www)])
    wait_for_listener(server, PORT)
    return server, client


def test_complete_download_has_no_reset(web, curl, nettrace):
    server, client = web
    r = client.run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{SERVER}:{PORT}/big.iso"],
                   check=True)
    assert r.stdout == "200"
    nettrace.assert_no_rst()


def test_client_abandoning_a_download_resets_it(web, curl, nettrace):
    server, client = web
    # curl reads slowly and gives up after half a second, most of the body
    # still unread in its socket: closing that socket resets the connection.
    r = client.run([curl, "-sS", "-o", "/dev/null", "--limit-rate", "10k", "--max-time", "0.5",
                    f"http://{SERVER}:{PORT}/big.iso"])
    assert r.returncode == 28, r.stderr  # "Operation timed out"
    rst = nettrace.assert_rst(direction="sent", origin="active", saddr=CLIENT, dport=PORT)
    assert rst.pid == r.pid and rst.comm == "curl"
    nettrace.assert_no_rst(direction="sent", netns=server.inode)  # the server did nothing wrong
