"""Tag rotation: the new image alone carries the tag (Octavia's
``amp_image_tag`` picks it); older images of the same rotation are kept,
deactivated or deleted beyond ``keep``.

Only images of our project are touched, and of those only the ones
labforge uploaded with the same rotation (``labforge_rotation=TAG``) are
deactivated or deleted; protected images never are.
"""

from __future__ import annotations

from .client import ROTATION, Cloud
from .upload import owned


def rotate(cl: Cloud, new: dict, tag: str, keep: int | None, deactivate_old: bool) -> list[str]:
    """Only ``new`` keeps ``tag``; older images of the rotation beyond ``keep``
    are deactivated (``deactivate_old``) or deleted (``keep``).  Returns
    what changed, for the outcome line."""
    notes = []
    if tag not in new.get("tags", []):
        cl.add_tag(new["id"], tag)
    untagged = []
    for img in cl.images(tag=tag):
        if img["id"] != new["id"] and owned(cl, img):
            cl.remove_tag(img["id"], tag)
            untagged.append(img["id"])
    if untagged:
        notes.append(f"tag {tag} moved from {', '.join(untagged)}")
    if keep is None and not deactivate_old:
        return notes
    mine = {"owner": cl.project_id} if cl.project_id else {}
    family = [i for i in cl.images(properties={ROTATION: tag}, **mine) if owned(cl, i)]
    if not any(i["id"] == new["id"] for i in family):
        family.append(new)
    older = sorted((i for i in family if i["id"] != new["id"]),
                   key=lambda i: i.get("created_at", ""), reverse=True)
    n_keep = (keep or 1) - 1
    for img in older[n_keep:]:
        if img.get("protected"):
            notes.append(f"kept protected image {img['id']}")
            continue
        if deactivate_old:
            if img.get("status") == "active":
                cl.deactivate_image(img["id"])
                notes.append(f"deactivated {img['id']}")
        else:
            cl.delete_image(img["id"])
            notes.append(f"deleted {img['id']}")
    return notes
