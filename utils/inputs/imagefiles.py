"""Listing the images of a class folder: ImageFolder's order, without following symlink loops.

torchvision's ImageFolder walks class folders with os.walk(followlinks=True): a directory symlink
that points back at one of its own ancestors is walked again and again until the path is too long,
multiplying that class's images. Here such a link is an error naming it; other links are followed.
"""
import os
from pathlib import Path

from .. import UserError


class SymlinkLoop(UserError):
    pass


def walk_images(folder, is_image):
    """Sorted image paths under `folder`, in the order ImageFolder lists them.

    is_image(name) -> bool. Raises SymlinkLoop for a directory link to the folder or an ancestor of its own.
    """
    out = []
    for root, dirs, files in sorted(_walk(Path(folder))):
        out += [os.path.join(root, f) for f in sorted(files) if is_image(f)]
    return out


def has_image(folder, is_image):
    """Whether any image lies at any depth under `folder` (the files walk_images would list), stopping at
    the first one found: a class folder holding its images directly costs one directory listing."""
    return any(is_image(f) for _, _, files in _walk(Path(folder)) for f in files)


def _walk(top):
    # os.walk is top-down, so each directory is checked before anything below it is visited.
    for root, dirs, files in os.walk(top, followlinks=True):
        here = os.path.realpath(root)
        for d in dirs:
            link = os.path.join(root, d)
            if os.path.islink(link):
                target = os.path.realpath(link)
                if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                    raise SymlinkLoop(f"directory symlink loop: {link} -> {os.readlink(link)} points back to "
                                      f"{target}, so its images would be listed without end; remove the link")
        yield root, dirs, files
