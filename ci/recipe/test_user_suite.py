"""A user's own test suite, as the README's "Use it in your own project"
shows it: nothing of this repository but the installed package."""
import socket
import time


def test_server_accepts_and_no_rst(make_netns, nettrace):
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", ["10.9.0.1/24"], ["10.9.0.2/24"])
    srv = server.popen(["python3", "-c", (
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        "s.bind(('10.9.0.1', 8080)); s.listen(); c, _ = s.accept(); c.sendall(c.recv(5)); c.close()")])
    with client.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        for _ in range(250):  # until the server listens
            try:
                s.connect(("10.9.0.1", 8080))
                break
            except ConnectionRefusedError:
                time.sleep(0.02)
        s.sendall(b"hello")
        assert s.recv(5) == b"hello"
    assert srv.wait(timeout=10) == 0
    nettrace.assert_accepted(pid=srv.pid)


def test_who_deleted_the_address(netns, nettrace):
    netns.add_dummy("dummy0", "192.168.0.1/24")
    r = netns.run(["ip", "addr", "del", "192.168.0.1/24", "dev", "dummy0"])
    ev = nettrace.assert_address_deleted("192.168.0.1/24", dev="dummy0", by_comm="ip")
    assert ev.pid == r.pid
