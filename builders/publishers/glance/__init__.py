"""Publish images to OpenStack Glance: authenticated, streamed, hash-verified.

``upload_image`` is what ``invoke glance-upload`` runs and ``publish_amphora``
what ``invoke publish-amphora`` (and the pipeline's glance step) runs.  The
flow:

1. authenticate the OpenStack way and find the image endpoint in the
   service catalog (``client``);
2. remove images an earlier labforge run left stuck (``queued``, ``saving``,
   ``uploading``, ``importing``, ``killed``; marked with
   ``labforge_upload_id``) when the process that made them is gone
   (``upload.cleanup_stuck``);
3. reuse an active image of the same name and content (``os_hash_value``),
   adding the missing tags and properties (``upload.reuse``);
4. otherwise create the image, stream the file (constant memory, one read,
   hashed in the same pass by a reader thread) with a direct upload (as the
   openstack CLI does; ``auto``) or the interoperable ``glance-direct``
   import (asked for, or when Glance refuses the direct upload), wait for
   ``active``, compare Glance's ``os_hash_algo``/``os_hash_value`` with the
   local hash.  Any failure or interruption (Ctrl-C, SIGTERM) deletes the
   image, retrying for a while when Glance does not answer (``upload.upload``);
5. rotate a tag (``--rotate-tag``): only the new image keeps it; older images
   of the same rotation are kept, deactivated or deleted beyond ``keep``
   (``rotation``);
6. record image id, hash and tags in the manifest record's
   ``meta["glance"][<cloud>]`` (``publish``).

Glance is reached through the OpenStack SDK's image proxy (``conn.image``),
so tokens, TLS settings and the endpoint are the SDK's.
"""

from .client import OWNER, ROTATION, SHA256, UPLOAD_ID, Cloud, connect
from .publish import GLANCE, VISIBILITIES, amphora_properties, find_amphora, publish_amphora, upload_image
from .rotation import rotate
from .upload import (BUFFERS, CHUNK, DEFAULT_HASH, GLANCE_DISK_FORMATS, METHODS, STUCK,
                     HashingBody, Source, Terminated, cleanup_stuck, detect_disk_format,
                     file_hash, parse_properties, resolve_image, sigterm_as_interrupt,
                     virtual_size)

__all__ = [
    "GLANCE",
    "BUFFERS", "CHUNK", "DEFAULT_HASH", "GLANCE_DISK_FORMATS", "METHODS", "OWNER", "ROTATION",
    "SHA256", "STUCK", "UPLOAD_ID", "VISIBILITIES", "Cloud", "HashingBody", "Source",
    "Terminated", "amphora_properties", "cleanup_stuck", "connect", "detect_disk_format",
    "file_hash", "find_amphora", "parse_properties", "publish_amphora", "resolve_image",
    "rotate", "sigterm_as_interrupt", "upload_image", "virtual_size",
]
