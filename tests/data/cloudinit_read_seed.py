"""Run by the system python that has Debian's cloud-init: read an extracted
seed the way the NoCloud datasource does (meta-data, user-data processed into
its MIME parts).  Prints one JSON document.

usage: python3 cloudinit_read_seed.py SEED_DIR WORK_DIR
"""
import json
import os
import sys

from cloudinit import util
from cloudinit.helpers import Paths
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

print(json.dumps(out))
