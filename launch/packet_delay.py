"""Holds every packet of a netfilter queue for a fixed time, then lets it go: a one-way delay without netem.

    python -m launch.packet_delay --delay 5ms [--queue 0]      (root, inside the namespace whose traffic it delays)

The kernels our machines run offer neither the netem nor the fq queueing discipline, so `tc` alone cannot add a delay.
Netfilter's NFQUEUE can: an iptables rule hands each outgoing packet to this process over netlink, and the packet
moves on when we give a verdict. The delay is the same for every packet, so packets fall due in the order they came
and one batch verdict ("accept every id up to k") releases all that are due; a bandwidth limit (tbf on the device)
still applies after the verdict. Packets are not copied to user space, only their ids.
"""

from __future__ import annotations

import argparse
import collections
import errno
import selectors
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
_NFNL_SUBSYS_QUEUE = 3
_MSG_PACKET, _MSG_VERDICT_BATCH, _MSG_CONFIG = 0, 3, 2
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR = 2
_CFG_CMD, _CFG_PARAMS, _CFG_QUEUE_MAXLEN, _CFG_MASK, _CFG_FLAGS = 1, 2, 3, 4, 5
_CMD_BIND = 1
_COPY_META = 1
# Hand over GSO packets (64 KiB on loopback) whole instead of segmenting them first.
_FLAG_GSO = 4
_ATTR_PACKET_HDR, _ATTR_VERDICT_HDR = 1, 2
_NF_ACCEPT = 1
_NETLINK_NO_ENOBUFS = 5
_SO_RCVBUFFORCE = 33
# Room for every packet a fast link has in flight during the delay; beyond it the kernel drops.
_QUEUE_MAXLEN = 1 << 16


def delay_seconds(delay: str) -> float:
    """'500us' / '5ms' / '0.1s' -> seconds; a clear error for anything else."""
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        number = delay[: -len(unit)]
        if delay.endswith(unit) and number.replace(".", "", 1).isdigit():
            return float(number) * scale
    raise ValueError(f"--latency {delay!r} is not a delay like 500us, 5ms or 0.1s")


def _attribute(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def _message(msg_type: int, queue: int, attributes: bytes, flags: int = 0, sequence: int = 0) -> bytes:
    """A netlink message of the queue subsystem: nlmsghdr, nfgenmsg (queue number big-endian), attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attributes
    header = struct.pack(
        "=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | msg_type, _NLM_F_REQUEST | flags, sequence, 0
    )
    return header + body


def config_messages(queue: int) -> list[bytes]:
    """Bind the queue, ask for packet metadata only, a long queue, and GSO packets whole."""
    return [
        _message(_MSG_CONFIG, queue, _attribute(_CFG_CMD, struct.pack("=BxH", _CMD_BIND, 0)), _NLM_F_ACK, 1),
        _message(
            _MSG_CONFIG,
            queue,
            _attribute(_CFG_PARAMS, struct.pack(">IB", 0, _COPY_META))
            + _attribute(_CFG_QUEUE_MAXLEN, struct.pack(">I", _QUEUE_MAXLEN))
            + _attribute(_CFG_MASK, struct.pack(">I", _FLAG_GSO))
            + _attribute(_CFG_FLAGS, struct.pack(">I", _FLAG_GSO)),
            _NLM_F_ACK,
            2,
        ),
    ]


def accept_up_to(queue: int, packet_id: int) -> bytes:
    """The batch verdict that accepts every queued packet whose id is at most `packet_id`."""
    return _message(_MSG_VERDICT_BATCH, queue, _attribute(_ATTR_VERDICT_HDR, struct.pack(">II", _NF_ACCEPT, packet_id)))


def packet_ids(datagram: bytes) -> list[int]:
    """The packet ids in one netlink datagram (ACKs are checked and skipped)."""
    ids, offset = [], 0
    while offset + 16 <= len(datagram):
        length, msg_type = struct.unpack_from("=IH", datagram, offset)
        if msg_type == _NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", datagram, offset + 16)
            if error:
                raise OSError(-error, f"netfilter queue refused a request: {errno.errorcode.get(-error, error)}")
        elif msg_type == (_NFNL_SUBSYS_QUEUE << 8) | _MSG_PACKET:
            position = offset + 20
            while position + 4 <= offset + length:
                attribute_length, kind = struct.unpack_from("=HH", datagram, position)
                if kind & 0x3FFF == _ATTR_PACKET_HDR:
                    ids.append(struct.unpack_from(">I", datagram, position + 4)[0])
                    break
                position += (attribute_length + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def open_queue(queue: int) -> socket.socket:
    """A netlink socket bound to NFQUEUE `queue` (root, in the namespace of the traffic)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
    sock.setsockopt(270, _NETLINK_NO_ENOBUFS, 1)  # SOL_NETLINK
    sock.bind((0, 0))
    for message in config_messages(queue):
        sock.send(message)
        packet_ids(sock.recv(65536))
    sock.setblocking(False)
    return sock


def run(sock: socket.socket, queue: int, delay: float) -> None:
    """Forever: read packet ids as they come, accept each `delay` seconds after it came."""
    pending: collections.deque[tuple[float, int]] = collections.deque()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        if selector.select(timeout):
            while True:
                try:
                    datagram = sock.recv(65536)
                except BlockingIOError:
                    break
                due = time.monotonic() + delay
                pending.extend((due, packet_id) for packet_id in packet_ids(datagram))
        now, last_due = time.monotonic(), None
        while pending and pending[0][0] <= now:
            last_due = pending.popleft()[1]
        if last_due is not None:
            sock.send(accept_up_to(queue, last_due))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.packet_delay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", required=True, help="one-way delay per packet, e.g. 5ms")
    parser.add_argument("--queue", type=int, default=0, help="the NFQUEUE number the iptables rule sends to")
    args = parser.parse_args(argv)
    try:
        delay = delay_seconds(args.delay)
    except ValueError as error:
        parser.error(str(error))
    sock = open_queue(args.queue)
    print("ready", flush=True)
    try:
        run(sock, args.queue, delay)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
