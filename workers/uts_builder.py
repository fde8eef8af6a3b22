"""Set the hostname and domainname of a UTS namespace from a CRIU checkpoint.

``populate_uts(image)`` works on the UTS namespace of the calling process: a child
that has just unshared a fresh one (build), or one that joined a pinned namespace
with setns (reset before reuse).
"""

import ctypes
import logging
import os

from cerman.errors import ImageError, NamespaceError

log = logging.getLogger(__name__)

# __NEW_UTS_LEN in <linux/utsname.h>: 64 bytes without the terminating NUL.
UTS_NAME_MAX = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def populate_uts(image):
    """Set the calling process's nodename and domainname to the image's values."""
    nodename = _encode_name(image, "nodename", image.nodename)
    domainname = _encode_name(image, "domainname", image.domainname)

    if _libc.sethostname(nodename, len(nodename)) != 0:
        raise NamespaceError(ctypes.get_errno(), f"sethostname({image.nodename!r})")
    if _libc.setdomainname(domainname, len(domainname)) != 0:
        raise NamespaceError(ctypes.get_errno(), f"setdomainname({image.domainname!r})")
    log.debug("set UTS namespace %d to %r / %r", image.ns_id, image.nodename,
              image.domainname)


def _encode_name(image, field, value):
    encoded = os.fsencode(value)
    if len(encoded) > UTS_NAME_MAX:
        raise ImageError(f"utsns-{image.ns_id}.img", f"{field} is {len(encoded)} bytes, "
                         f"more than the kernel's {UTS_NAME_MAX}; re-dump the checkpoint")
    return encoded
