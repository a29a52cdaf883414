"""A real Keystone and a real Glance on 127.0.0.1, for tests and benchmarks.

Both come from PyPI in ``.venv-openstack`` (made by scripts/setup.d/openstack.sh
with MODE=test) and run under uWSGI with SQLite, Glance's file store and the
staging store for the glance-direct import, all in one temp directory.
Glance authenticates through keystonemiddleware (``[paste_deploy] flavor =
keystone``).  Keystone is bootstrapped with an ``admin`` user, a ``service``
project (admin has the admin role on it, as the Octavia service user would),
a ``glance`` service user and the image endpoint in the catalog.

Usable without pytest (benchmarks import it)::

    with OpenStackServices(tmpdir) as svc:
        svc.clouds_yaml(...)

Both serve HTTPS (uWSGI ``--https-socket``) with a throwaway CA (``svc.ca``;
``OpenStackServices(dir, tls=False)`` for plain HTTP); clouds.yaml entries and
OS_* variables made here carry it as ``cacert``/``OS_CACERT``.

Each uWSGI server runs in its own process group with 1 process and 2 threads
(the machine is small and shared); stop kills the group.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import threading

import pytest
import requests
import yaml

from helpers import ROOT

VENV = ROOT / ".venv-openstack"
REGION = "RegionOne"


def venv_ready() -> str | None:
    """None when the OpenStack venv is usable, else why not."""
    for tool in ("uwsgi", "keystone-manage", "glance-manage"):
        if not (VENV / "bin" / tool).exists():
            return (f"{VENV}/bin/{tool} missing: run `MODE=test bash scripts/setup.d/openstack.sh` "
                    "(or scripts/setup.sh --test)")
    return None


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca, cert, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labforge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port_free(port: int, timeout: float = 30) -> None:
    """Until ``port`` can be bound again: after a SIGKILL the killed group's
    workers may hold the listening socket a moment longer than the master."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.1)


class UwsgiServer:
    """One uWSGI server for a WSGI module, in its own process group."""

    def __init__(self, name: str, module: str, port: int, workdir: Path, env: dict[str, str],
                 tls: tuple[Path, Path, Path] | None = None):
        self.name, self.module, self.port, self.workdir, self.env = name, module, port, workdir, env
        self.tls = tls
        self.log = workdir / f"{name}-uwsgi.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, probe: str, timeout: float = 180) -> None:
        if self.tls:
            socket_args = ["--https-socket", f"127.0.0.1:{self.port},{self.tls[1]},{self.tls[2]}"]
        else:
            socket_args = ["--http-socket", f"127.0.0.1:{self.port}"]
        wait_port_free(self.port)      # a restart right after kill()
        argv = [
            str(VENV / "bin" / "uwsgi"),
            *socket_args,
            "--module", self.module,
            "--virtualenv", str(VENV),
            "--master", "--processes", "1", "--threads", "2", "--enable-threads",
            "--die-on-term", "--lazy-apps", "--need-app",
            "--buffer-size", "65535",
            "--socket-timeout", "300",
            "--add-header", "Connection: close",
            "--hook-master-start", "unix_signal:15 gracefully_kill_them_all",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=self.workdir, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} under uWSGI exited ({self.proc.returncode}); "
                                   f"log: {self.log}:\n{self.tail()}")
            try:
                r = requests.get(self.url + probe, timeout=5,
                                 verify=str(self.tls[0]) if self.tls else True)
                if r.status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"{self.name} did not answer on {self.url} within {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group (master and workers) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class OpenStackServices:
    """Keystone + Glance in ``workdir``; a context manager."""

    def __init__(self, workdir: Path, tls: bool = True):
        """``tls``: both services on HTTPS with a throwaway CA (``self.ca``)."""
        self.dir = Path(workdir)
        self.tls = make_tls(self.dir / "tls") if tls else None
        self.ca = self.tls[0] if self.tls else None
        self.scheme = "https" if tls else "http"
        self.admin_password = secrets.token_urlsafe(18)
        self.glance_password = secrets.token_urlsafe(18)
        self.keystone: UwsgiServer | None = None
        self.glance: UwsgiServer | None = None
        self.store = self.dir / "glance" / "images"
        self.staging = self.dir / "glance" / "staging"
        self.glance_policy: dict[str, str] = {}

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> "OpenStackServices":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        why = venv_ready()
        if why:
            raise RuntimeError(why)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._start_keystone()
        self.glance_port = free_port()
        self._register_glance()
        self._configure_glance()
        self.start_glance()

    def stop(self) -> None:
        for srv in (self.glance, self.keystone):
            if srv is not None:
                srv.kill()

    @property
    def auth_url(self) -> str:
        return f"{self.keystone.url}/v3"

    @property
    def glance_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.glance_port}"

    def _manage(self, tool: str, conf: Path, *args: str, env: dict | None = None) -> None:
        proc = subprocess.run([str(VENV / "bin" / tool), "--config-file", str(conf), *args],
                              capture_output=True, text=True, env={**os.environ, **(env or {})},
                              cwd=self.dir, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    # -- keystone -------------------------------------------------------------
    def _start_keystone(self) -> None:
        kdir = self.dir / "keystone"
        kdir.mkdir(exist_ok=True)
        port = free_port()
        conf = kdir / "keystone.conf"
        conf.write_text(textwrap.dedent(f"""\
            [DEFAULT]
            log_file = {kdir / 'keystone.log'}
            [database]
            connection = sqlite:///{kdir / 'keystone.db'}
            [token]
            provider = fernet
            [fernet_tokens]
            key_repository = {kdir / 'fernet-keys'}
            [fernet_receipts]
            key_repository = {kdir / 'fernet-keys'}
            [credential]
            key_repository = {kdir / 'credential-keys'}
            """))
        user = os.environ.get("USER") or "root"
        import grp
        import pwd
        uname = pwd.getpwuid(os.getuid()).pw_name
        gname = grp.getgrgid(os.getgid()).gr_name
        del user
        self._manage("keystone-manage", conf, "db_sync")
        self._manage("keystone-manage", conf, "fernet_setup", "--keystone-user", uname,
                     "--keystone-group", gname)
        self._manage("keystone-manage", conf, "credential_setup", "--keystone-user", uname,
                     "--keystone-group", gname)
        url = f"{self.scheme}://127.0.0.1:{port}/v3"
        # the password goes through the environment, not argv
        self._manage("keystone-manage", conf, "bootstrap",
                     "--bootstrap-username", "admin", "--bootstrap-project-name", "admin",
                     "--bootstrap-role-name", "admin", "--bootstrap-service-name", "keystone",
                     "--bootstrap-region-id", REGION, "--bootstrap-admin-url", url,
                     "--bootstrap-public-url", url, "--bootstrap-internal-url", url,
                     env={"OS_BOOTSTRAP_PASSWORD": self.admin_password})
        self.keystone = UwsgiServer("keystone", "keystone.wsgi.api:application", port, kdir,
                                    {"OS_KEYSTONE_CONFIG_FILES": str(conf)}, self.tls)
        self.keystone.start("/v3")

    def admin_connection(self, project: str = "admin"):
        import openstack
        return openstack.connect(
            load_yaml_config=False, load_envvars=False, auth_url=self.auth_url, username="admin", password=self.admin_password,
            project_name=project, user_domain_name="Default", project_domain_name="Default",
            region_name=REGION, identity_api_version="3",
            **({"cacert": str(self.ca)} if self.ca else {}))

    def _register_glance(self) -> None:
        conn = self.admin_connection()
        ident = conn.identity
        service_project = ident.create_project(name="service", domain_id="default",
                                               description="service project (owns the amphora image)")
        demo = ident.create_project(name="demo", domain_id="default")
        admin_role = ident.find_role("admin")
        member_role = ident.find_role("member")
        admin = ident.find_user("admin", domain_id="default")
        glance_user = ident.create_user(name="glance", password=self.glance_password,
                                        domain_id="default", default_project_id=service_project.id)
        ident.assign_project_role_to_user(service_project, glance_user, admin_role)
        ident.assign_project_role_to_user(service_project, admin, admin_role)
        ident.assign_project_role_to_user(demo, admin, member_role)
        svc = ident.create_service(name="glance", type="image", description="Image service")
        for iface in ("public", "internal", "admin"):
            ident.create_endpoint(service_id=svc.id, interface=iface, url=self.glance_url,
                                  region_id=REGION)
        conn.close()

    # -- glance ---------------------------------------------------------------
    def _configure_glance(self) -> None:
        gdir = self.dir / "glance"
        etc = gdir / "etc"
        for d in (etc, self.store, self.staging, gdir / "tasks"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy(VENV / "etc" / "glance" / "glance-api-paste.ini", etc / "glance-api-paste.ini")
        self.glance_conf = etc / "glance-api.conf"
        self.glance_conf.write_text(textwrap.dedent(f"""\
            [DEFAULT]
            log_file = {gdir / 'glance-api.log'}
            enabled_backends = fs:file
            enabled_import_methods = [glance-direct]
            worker_self_reference_url = {self.glance_url}
            public_endpoint = {self.glance_url}
            [glance_store]
            default_backend = fs
            [fs]
            filesystem_store_datadir = {self.store}
            [os_glance_staging_store]
            filesystem_store_datadir = {self.staging}
            [os_glance_tasks_store]
            filesystem_store_datadir = {gdir / 'tasks'}
            [database]
            connection = sqlite:///{gdir / 'glance.db'}
            [paste_deploy]
            flavor = keystone
            config_file = {etc / 'glance-api-paste.ini'}
            [keystone_authtoken]
            www_authenticate_uri = {self.auth_url}
            auth_url = {self.keystone.url}
            auth_type = password
            username = glance
            password = {self.glance_password}
            project_name = service
            user_domain_name = Default
            project_domain_name = Default
            region_name = {REGION}
            {f"cafile = {self.ca}" if self.ca else ""}
            [oslo_policy]
            enforce_new_defaults = true
            policy_file = {etc / 'policy.yaml'}
            [wsgi]
            task_pool_threads = 2
            """))
        os.chmod(self.glance_conf, 0o600)
        self._write_glance_policy()
        self._manage("glance-manage", self.glance_conf, "db_sync")

    def _write_glance_policy(self) -> None:
        # oslo.policy overrides on top of Glance's in-code defaults ({}: none)
        (self.glance_conf.parent / "policy.yaml").write_text(yaml.safe_dump(self.glance_policy))

    def set_glance_policy(self, rules: dict[str, str] | None = None) -> None:
        """Give Glance these oslo.policy overrides (None: Glance's defaults) and
        restart it, so they apply from its next request on, e.g.
        ``{"upload_image": "!"}``: a cloud that refuses direct uploads."""
        self.glance_policy = dict(rules or {})
        self._write_glance_policy()
        if self.glance is not None and self.glance.running:
            self.glance.kill()
        self.start_glance()

    def start_glance(self) -> None:
        self.glance = UwsgiServer("glance", "glance.wsgi.api:application", self.glance_port,
                                  self.dir / "glance",
                                  {"OS_GLANCE_CONFIG_DIR": str(self.glance_conf.parent)}, self.tls)
        self.glance.start("/versions")

    def kill_glance(self) -> None:
        """SIGKILL Glance's uWSGI process group (master and worker)."""
        self.glance.kill(signal.SIGKILL)

    # -- client configuration ---------------------------------------------------
    def cloud_config(self, *, project: str = "service", password: str | None = None) -> dict:
        return {
            "auth": {
                "auth_url": self.auth_url, "username": "admin",
                "password": password if password is not None else self.admin_password,
                "project_name": project, "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            "region_name": REGION, "identity_api_version": 3, "interface": "public",
            **({"cacert": str(self.ca)} if self.ca else {}),
        }

    def write_clouds_yaml(self, path: Path, clouds: dict[str, dict]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"clouds": clouds}))
        os.chmod(path, 0o600)
        return path

    def os_env(self, *, project: str = "service", password: str | None = None) -> dict[str, str]:
        """OS_* variables as an openrc file would set them."""
        return {
            "OS_AUTH_URL": self.auth_url, "OS_USERNAME": "admin",
            "OS_PASSWORD": password if password is not None else self.admin_password,
            "OS_PROJECT_NAME": project, "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default", "OS_REGION_NAME": REGION,
            "OS_IDENTITY_API_VERSION": "3", "OS_INTERFACE": "public",
            **({"OS_CACERT": str(self.ca)} if self.ca else {}),
        }

    def application_credential(self, name: str = "labforge-test") -> tuple[str, str]:
        """(id, secret) of a new application credential of admin on the service project."""
        conn = self.admin_connection(project="service")
        user_id = conn.current_user_id
        cred = conn.identity.create_application_credential(user=user_id, name=name)
        conn.close()
        return cred.id, cred.secret


# --------------------------------------------------------------------------
# pytest fixtures: import them into a test module
#   from tests.openstack_services import openstack_services, services, ...
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def openstack_services(tmp_path_factory):
    """Keystone + Glance for the whole session; stopped (process groups killed) at the end."""
    why = venv_ready()
    if why:
        pytest.fail(why)
    svc = OpenStackServices(tmp_path_factory.mktemp("openstack"))
    t0 = time.monotonic()
    with svc:
        print(f"\nKeystone + Glance started in {time.monotonic() - t0:.1f}s")
        yield svc


@pytest.fixture
def services(openstack_services):
    """The services, with Glance running again after a test that killed it."""
    if not openstack_services.glance.running:
        openstack_services.start_glance()
    yield openstack_services
    if not openstack_services.glance.running:
        openstack_services.start_glance()


@pytest.fixture
def on_upload(services):
    """``arm(action, threshold)``: a watcher thread runs ``action()`` as soon as
    a new file in Glance's file store or staging dir has grown past
    ``threshold`` bytes (an upload is under way).  The returned dict says
    whether it fired."""
    stop = threading.Event()

    def arm(action, threshold: int = 16 << 20) -> dict:
        state = {"fired": False}
        old = {f for d in (services.store, services.staging) for f in d.glob("*")}

        def watch():
            while not stop.is_set():
                for d in (services.store, services.staging):
                    for f in d.glob("*"):
                        if f in old:
                            continue
                        try:
                            if f.stat().st_size >= threshold:
                                action()
                                state["fired"] = True
                                return
                        except FileNotFoundError:
                            pass
                time.sleep(0.02)
        threading.Thread(target=watch, daemon=True).start()
        return state
    yield arm
    stop.set()


@pytest.fixture
def kill_glance_mid_upload(services, on_upload):
    """Arm a SIGKILL of Glance's uWSGI process group once an upload is under way."""
    return lambda threshold=16 << 20: on_upload(services.kill_glance, threshold)


