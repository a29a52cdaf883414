"""The amphora agent's own server and heartbeat code, run on the host (tests only).

Run by .venv-octavia's interpreter:

    python octavia_agent_host.py serve AGENT_CONF   # the agent's Flask app under gunicorn,
                                                    # with the TLS options of octavia-agent
    python octavia_agent_host.py beat AGENT_CONF N  # N heartbeats: the health daemon's
                                                    # build_stats_message + UDPStatusSender

AGENT_CONF is an amphora-agent.conf ([haproxy_amphora] bind_host/bind_port/
base_path, [amphora_agent] agent_server_cert/agent_server_ca/amphora_id,
[health_manager] controller_ip_port_list/heartbeat_key).  Only what needs
the amphora's root (network namespaces, HAProxy under systemd) is out of
reach here; the TLS endpoint and the heartbeat are the agent's real code.
"""

import ssl
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def _conf(path):
    from oslo_config import cfg
    import octavia.common.config  # noqa: F401
    cfg.CONF(args=["--config-file", path], project="octavia", default_config_dirs=[])
    return cfg.CONF


def serve(path):
    CONF = _conf(path)
    import gunicorn.app.base
    from octavia.amphorae.backends.agent.api_server import server

    class Agent(gunicorn.app.base.BaseApplication):      # as octavia.cmd.agent.AmphoraAgent
        def __init__(self, app, options):
            self.options, self.application = options, app
            super().__init__()

        def load_config(self):
            for key, value in self.options.items():
                self.cfg.set(key.lower(), value)

        def load(self):
            return self.application

    proto = CONF.amphora_agent.agent_tls_protocol.replace(".", "_")
    Agent(server.Server(None).app, {          # octavia.cmd.agent.main's TLS options
        "bind": f"{CONF.haproxy_amphora.bind_host}:{CONF.haproxy_amphora.bind_port}",
        "workers": 1,
        "certfile": CONF.amphora_agent.agent_server_cert,
        "ca_certs": CONF.amphora_agent.agent_server_ca,
        "cert_reqs": ssl.CERT_REQUIRED,
        "ssl_version": getattr(ssl, f"PROTOCOL_{proto}"),
        "preload_app": True,
        "loglevel": "warning",
    }).run()


def beat(path, n):
    _conf(path)
    from octavia.amphorae.backends.health_daemon import health_daemon, health_sender
    sender = health_sender.UDPStatusSender()
    for _ in range(n):
        sender.dosend(health_daemon.build_stats_message())
        time.sleep(0.3)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        beat(sys.argv[2], int(sys.argv[3]))
