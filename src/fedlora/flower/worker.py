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

import hashlib
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
    from fedlora.flower.wire import pack, pack_error, pack_reply, peek_meta

    cfg, _ = config_from_flower(header["run_config"])
    kind, cid = header["kind"], int(header["client_id"])
    pinned = header.get("fedlora-model")
    asked = Path(cfg.model).expanduser()
    if pinned and pinned not in (cfg.model, str(asked.resolve()) if asked.exists() else cfg.model):
        raise ValueError(f"this node serves model {pinned!r} only; the run asks for {cfg.model!r}")
    own = header.get("fedlora-data")
    if own:
        labels = peek_meta(plan).get("extra", {}).get("labels")
        if not isinstance(labels, list) or len(labels) < 2:
            raise ValueError("the server sent no label names; a node with its own data file needs them")
        session = session_for(cfg, data_file=str(own), client_id=cid, labels=tuple(str(x) for x in labels))
    else:
        session = session_for(cfg)
    if kind == "hello":
        return {"ok": True}, pack(session.hello(cid), {}), memory_blob
    store = MemoryStore(str(header["fedlora-state-dir"])) if header.get("fedlora-state-dir") else None
    run_key = str(peek_meta(plan).get("extra", {}).get("run_key") or "")
    if store is not None and run_key and not memory_blob:  # a new Flower run (the ServerApp restarted): same run
        memory_blob = store.load(run_key, cid)
    memory = ClientMemory.from_bytes(memory_blob)
    if kind == "train":
        reply, memory = session.train(plan, memory, cid)
        blob = pack_error(reply) if isinstance(reply, BaseException) else pack_reply(reply)
    elif kind == "evaluate":
        result, memory = session.evaluate(plan, memory, cid)
        blob = pack(result, {})
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    memory_blob = memory.to_bytes()
    if store is not None and run_key:
        store.save(run_key, cid, memory_blob)
    return {"ok": True}, blob, memory_blob


class MemoryStore:
    """A node's copy of its clients' memories on disk, by fedlora run (the run directory's name, which a resumed
    run keeps) and client: a restarted ServerApp starts a new Flower run whose Contexts are empty, and the node
    picks up where it was. Each file is written whole (temporary file, fsync, rename), in a 0700 directory."""

    def __init__(self, directory: str) -> None:
        self.root = Path(directory).expanduser()

    def _path(self, run_key: str, client_id: int) -> Path:
        digest = hashlib.sha256(run_key.encode()).hexdigest()[:32]  # any key, never a path from the server
        return self.root / digest / f"client-{int(client_id)}.bin"

    def load(self, run_key: str, client_id: int) -> bytes:
        path = self._path(run_key, client_id)
        return path.read_bytes() if path.is_file() else b""

    def save(self, run_key: str, client_id: int, blob: bytes) -> None:
        path = self._path(run_key, client_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


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
