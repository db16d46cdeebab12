"""UDP echo check for the data-plane test: `serve ADDR PORT` echoes every
datagram back; `check ADDR PORT` sends datagrams of many sizes (random
content) and exits 0 only if each comes back intact."""
import os
import socket
import sys

mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if mode == "serve":
    s.bind((addr, port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)
else:
    s.settimeout(2.0)
    for size in [1, 100, 1372, 1400, 1472, 4000, 9000, 30000, 60000]:
        for attempt in range(3):
            data = os.urandom(size)
            s.sendto(data, (addr, port))
            try:
                back, _ = s.recvfrom(65535)
            except socket.timeout:
                continue
            if back != data:
                sys.exit(f"{size}-byte datagram came back changed")
            break
        else:
            sys.exit(f"no echo for a {size}-byte datagram")
    print("ok")
