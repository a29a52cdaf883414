"""Helpers for the image tests: a local HTTP image mirror, a published
Debian cloud image directory, and checks of built images."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import threading
from pathlib import Path

from helpers import make_qcow2


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``server.root``; honours ``Range: bytes=N-``; can
    drop the connection once, after ``server.drop_after`` bytes of a file."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        self.server.requests.append((self.path, self.headers.get("Range")))
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and self.server.ranges:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        hold = self.server.hold
        if hold is not None and path.suffix in (".qcow2", ".img") and len(body) > 1:
            self.server.hold = None                      # only once
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.server.held.set()                       # a client is mid-transfer now
            hold.wait(120)
            body = body[len(body) // 2:]
        drop = self.server.drop_after
        if drop is not None and path.suffix in (".qcow2", ".img") and len(body) > drop:
            self.server.drop_after = None               # only once
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


class Mirror(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.root = root
        self.drop_after: int | None = None
        # set to an Event: the next image transfer stops halfway until it is set
        self.hold: threading.Event | None = None
        self.held = threading.Event()
        self.ranges = True
        self.requests: list = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def publish_debian(root: Path, version: str = "12", data_mib: int = 3,
                   wrong_sum: bool = False, size: str = "1G") -> tuple[Path, str]:
    """Lay out a Debian cloud image directory like cloud.debian.org's
    (an image of ``size`` virtual bytes)."""
    name = f"debian-{version}-genericcloud-amd64.qcow2"
    img = make_qcow2(root / name, size, data_mib)
    digest = hashlib.sha512(img.read_bytes()).hexdigest()
    listed = ("0" * 128) if wrong_sum else digest
    (root / "SHA512SUMS").write_text(f"{'1' * 128}  debian-{version}-generic-amd64.qcow2\n"
                                     f"{listed}  {name}\n")
    return img, digest


def assert_compressed_and_clean(image: Path) -> dict:
    """`qemu-img check` finds no errors and the qcow2 stores compressed clusters
    (what a user checks before shipping an image: it is intact and small)."""
    import json
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report.get("check-errors", 0) == 0 and report.get("corruptions", 0) == 0, report
    assert report.get("compressed-clusters", 0) > 0, report
    return report


def installed_packages(image: Path, tmp_path: Path) -> set[str]:
    """Package names dpkg lists as installed in the image's root filesystem
    (the largest partition of a raw copy, read with debugfs)."""
    import json
    raw = tmp_path / "pkgs.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    try:
        table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], check=True, capture_output=True,
                                          text=True).stdout)["partitiontable"]
        part = max(table["partitions"], key=lambda p: p["size"])
        offset = part["start"] * table.get("sectorsize", 512)
        status = subprocess.run(["debugfs", "-R", "cat /var/lib/dpkg/status", f"{raw}?offset={offset}"],
                                check=True, capture_output=True, text=True).stdout
    finally:
        raw.unlink()
    names, pkg = set(), None
    for line in status.splitlines():
        if line.startswith("Package: "):
            pkg = line.split()[1]
        elif line.startswith("Status: ") and line.endswith(" installed"):
            names.add(pkg)
    return names
