"""A node worker: keeps the model, data and method objects of a run loaded on a SuperNode across rounds.

A Flower SuperNode starts a new ClientApp process for every message, so a ClientApp that builds its model
rebuilds it every round (importing torch and transformers alone takes seconds). ``fedlora node`` starts this
worker next to the SuperNode and tells it (``--node-config fedlora-worker=<socket>``) where the worker listens; the
ClientApp then only forwards the message's bytes and the client's memory (from the Flower ``Context``) over a
local Unix socket, and the worker runs them through its cached :class:`fedlora.flower.node.NodeSession`. Per-client
state still lives in the Context: the worker keeps none between messages.

Frames on the socket: a 4-byte count, then per frame an 8-byte length and the bytes. A request is
``[header JSON, plan, memory]``; a reply ``[header JSON, reply, memory]``; the header of a failed request says why.
The socket file is created with mode 0600 inside a directory only this user can enter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("fedlora")

MAX_FRAME = 8 << 30


def send_frames(sock: socket.socket, frames: Sequence[bytes]) -> None:
    sock.sendall(struct.pack("<I", len(frames)))
    for f in frames:
        sock.sendall(struct.pack("<Q", len(f)))
        sock.sendall(f)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed mid-frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frames(sock: socket.socket, max_frames: int = 8) -> list[bytes]:
    (count,) = struct.unpack("<I", _recv_exact(sock, 4))
    if count > max_frames:
        raise ValueError(f"{count} frames, at most {max_frames} expected")
    frames = []
    for _ in range(count):
        (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
        if n > MAX_FRAME:
            raise ValueError(f"a frame of {n} bytes")
        frames.append(_recv_exact(sock, n))
    return frames


def handle_request(header: Mapping[str, Any], plan: bytes, memory_blob: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """Run one forwarded message through the node session of its run (the same code as in-process)."""
    from fedlora.flower.app import config_from_flower
    from fedlora.flower.node import ClientMemory, session_for
    from fedlora.flower.wire import pack, pack_error, pack_reply

    cfg, _ = config_from_flower(header["run_config"])
    session = session_for(cfg)
    kind, cid = header["kind"], int(header["client_id"])
    if kind == "hello":
        return {"ok": True}, pack(session.hello(cid), {}), memory_blob
    memory = ClientMemory.from_bytes(memory_blob)
    if kind == "train":
        reply, memory = session.train(plan, memory, cid)
        blob = pack_error(reply) if isinstance(reply, BaseException) else pack_reply(reply)
    elif kind == "evaluate":
        result, memory = session.evaluate(plan, memory, cid)
        blob = pack(result, {})
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    return {"ok": True}, blob, memory.to_bytes()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            header_blob, plan, memory = recv_frames(self.request)
            header = json.loads(header_blob)
            out, reply, new_memory = handle_request(header, plan, memory)
        except Exception as e:  # the ClientApp turns this into an error reply
            log.exception("node worker: request failed")
            out, reply, new_memory = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}, b"", b""
        try:
            send_frames(self.request, [json.dumps(out).encode(), reply, new_memory])
        except OSError:
            log.warning("node worker: the ClientApp went away before its reply was sent")


class NodeWorker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def start_worker(path: str | os.PathLike[str]) -> NodeWorker:
    """Listen on the Unix socket ``path`` (its directory is created private); serve in a background thread."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(p.parent, 0o700)
    if p.exists():
        p.unlink()
    old = os.umask(0o177)
    try:
        server = NodeWorker(str(p), _Handler)
    finally:
        os.umask(old)
    threading.Thread(target=server.serve_forever, name="fedlora-node-worker", daemon=True).start()
    return server


def forward(path: str, header: Mapping[str, Any], plan: bytes, memory: bytes, timeout: float) -> tuple[bytes, bytes]:
    """Send one message to the node worker at ``path``; its reply blob and the client's new memory."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise ConnectionError(
                f"no fedlora node worker at {path} ({e}); start the SuperNode with `fedlora node`, or drop "
                "fedlora-worker from its --node-config"
            ) from None
        send_frames(sock, [json.dumps(dict(header)).encode(), plan, memory])
        out_blob, reply, new_memory = recv_frames(sock)
    out = json.loads(out_blob)
    if not out.get("ok"):
        raise RuntimeError(f"node worker: {out.get('error')}")
    return reply, new_memory
