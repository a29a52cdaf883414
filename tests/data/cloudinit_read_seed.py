"""Run by the system python that has Debian's cloud-init: read an extracted
seed the way the NoCloud datasource does and render its network-config with
cloud-init's own renderers.  Prints one JSON document.

usage: python3 cloudinit_read_seed.py SEED_DIR WORK_DIR
"""
import json
import os
import sys

from cloudinit import util
from cloudinit.helpers import Paths
from cloudinit.net import eni, networkd
from cloudinit.net.network_state import parse_net_config_data
from cloudinit.user_data import UserDataProcessor

seed, work = sys.argv[1], sys.argv[2]
# what DataSourceNoCloud reads from a mounted cidata volume
files = util.pathprefix2dict(seed, required=["user-data", "meta-data"],
                             optional=["vendor-data", "network-config"])
out = {"meta": util.load_yaml(files["meta-data"]), "files": sorted(files)}

paths = Paths({"cloud_dir": os.path.join(work, "cloud"), "run_dir": os.path.join(work, "run")})
msg = UserDataProcessor(paths).process(files["user-data"])
out["parts"] = [p.get_content_type() for p in msg.walk() if not p.is_multipart()]
out["cloud_config"] = [util.load_yaml(p.get_payload(decode=True)) for p in msg.walk()
                       if p.get_content_type() == "text/cloud-config"]

out["render"] = {}
if "network-config" in files:
    cfg = util.load_yaml(files["network-config"])
    if "network" in cfg:
        cfg = cfg["network"]
    state = parse_net_config_data(cfg)
    for name, renderer in (("eni", eni.Renderer), ("networkd", networkd.Renderer)):
        target = os.path.join(work, name)
        renderer({}).render_network_state(state, target=target)
        for root, _, names in os.walk(target):
            for n in names:
                p = os.path.join(root, n)
                with open(p) as fh:
                    out["render"][f"{name}:{os.path.relpath(p, target)}"] = fh.read()
print(json.dumps(out))
