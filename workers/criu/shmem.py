"""Page locations of System V shared memory segments in a checkpoint.

An ``ipc_shm_entry`` with ``in_pagemaps`` set (CRIU 4.1.1 always sets it) has its
contents in ``pagemap-shmem-<shmid>.img``: a ``pagemap_head`` naming the pages file,
then ``pagemap_entry`` runs of ``nr_pages`` pages at ``vaddr``, which is the offset in
the segment. The pages of the entries flagged PE_PRESENT follow one another in
``pages-<pages_id>.img`` in pagemap order. Pages that no entry covers were never written
and read as zeros.
"""

import mmap
import os

from cerman.errors import ImageError
from workers.criu.model import ShmChunk

# Pagemap entry flags (CRIU 4.1.1 criu/include/pagemap.h).
PE_PARENT = 1 << 0  # the pages are in the parent (pre-dump) image, not in this pages file
PE_LAZY = 1 << 1  # the pages may be restored lazily, from a page server
PE_PRESENT = 1 << 2  # the pages are in this pages file
KNOWN_FLAGS = PE_PARENT | PE_LAZY | PE_PRESENT

# CRIU counts pagemap runs in pages of the dumping machine. A checkpoint restores only
# on the same architecture and page size, so the local page size is the one CRIU used.
PAGE_SIZE = mmap.PAGESIZE

REDUMP = "re-dump or re-export the checkpoint"


def round_up(value, alignment):
    return (value + alignment - 1) // alignment * alignment


def entry_flags(entry):
    """Return the PE_* flags of a decoded ``pagemap_entry``.

    Pagemaps written before the ``flags`` field existed mark parent pages with the
    ``in_parent`` bool and all other entries present; CRIU 4.1.1 reads them the same way.
    """
    if entry.get("in_parent"):
        return entry.get("flags", 0) | PE_PARENT
    if "flags" not in entry:
        return PE_PRESENT
    return entry["flags"]


def pagemap_chunks(pagemap_path, pagemap, images_dir, size, page_size=PAGE_SIZE):
    """Return the ``ShmChunk``s of a segment of ``size`` bytes from its decoded pagemap.

    ``pagemap`` is the entry list of ``pagemap_path``: the head, then the page runs.
    The last chunk is clipped to ``size``, since segments need not be page-aligned.
    Raises ``ImageError`` when a run is not in the pages file (parent or lazy pages),
    lies outside the segment, or the pages file is missing or of the wrong size.
    """
    head, runs = pagemap[0], pagemap[1:]
    pages_path = images_dir / f"pages-{head['pages_id']}.img"
    try:
        pages_size = os.stat(pages_path).st_size
    except FileNotFoundError:
        raise ImageError(
            pages_path, f"missing; {pagemap_path.name} stores the segment's pages there; {REDUMP}"
        ) from None

    chunks = []
    limit = round_up(size, page_size)
    file_offset = 0
    previous_end = 0
    for index, run in enumerate(runs, start=1):
        _check_run_is_stored(pagemap_path, index, entry_flags(run))
        offset = run["vaddr"]
        length = run["nr_pages"] * page_size

        if offset % page_size:
            raise ImageError(pagemap_path, f"vaddr {offset:#x} is not page-aligned; {REDUMP}", index)
        if offset < previous_end:
            raise ImageError(pagemap_path, f"vaddr {offset:#x} overlaps the previous run; {REDUMP}", index)
        if offset + length > limit:
            raise ImageError(
                pagemap_path,
                f"run {offset:#x}+{length:#x} ends beyond the segment's {size} bytes; {REDUMP}",
                index,
            )

        if length:
            chunks.append(ShmChunk(offset, pages_path, file_offset, min(length, size - offset)))
        file_offset += length
        previous_end = offset + length

    _check_pages_size(pagemap_path, pages_path, pages_size, file_offset)
    return tuple(chunks)


def _check_run_is_stored(pagemap_path, index, flags):
    if flags & ~KNOWN_FLAGS:
        raise ImageError(
            pagemap_path,
            f"unknown pagemap flags {flags & ~KNOWN_FLAGS:#x}; the image is newer than this reader; {REDUMP}",
            index,
        )
    if flags & PE_PARENT:
        raise ImageError(
            pagemap_path,
            "pages are in the parent image of an incremental dump, not in this checkpoint; "
            "dump without --prev-images-dir",
            index,
        )
    if not flags & PE_PRESENT:
        reason = "lazy pages are served by a page server" if flags & PE_LAZY else "flags name no storage"
        raise ImageError(
            pagemap_path,
            f"pages are not in the pages file ({reason}); dump without --lazy-pages",
            index,
        )


def _check_pages_size(pagemap_path, pages_path, pages_size, needed):
    if pages_size < needed:
        raise ImageError(
            pages_path,
            f"is truncated: {pages_size} bytes, {pagemap_path.name} lists {needed}; {REDUMP}",
        )
    if pages_size > needed:
        raise ImageError(
            pages_path,
            f"has trailing garbage: {pages_size} bytes, {pagemap_path.name} lists {needed}; {REDUMP}",
        )
