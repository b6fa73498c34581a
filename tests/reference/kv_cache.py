"""References of the kv_cache family by plain indexing (new tensors; the inputs are untouched)."""

from __future__ import annotations


def append_kv_cache(k_cache, v_cache, key, value, seq_lens, kv_layout="NHD"):
    """Row ``b``'s token ``t`` at position ``seq_lens[b] + t`` (positions past the cache skipped)."""
    k, v = k_cache.clone(), v_cache.clone()
    S = k.size(1) if kv_layout == "NHD" else k.size(2)
    for b in range(key.size(0)):
        for t in range(key.size(1)):
            pos = int(seq_lens[b]) + t
            if int(seq_lens[b]) < 0 or pos >= S:
                continue
            if kv_layout == "NHD":
                k[b, pos], v[b, pos] = key[b, t], value[b, t]
            else:
                k[b, :, pos], v[b, :, pos] = key[b, t], value[b, t]
    return k, v


def append_paged_kv_cache(k_cache, v_cache, key, value, slot_mapping, kv_layout="NHD"):
    """Row ``i`` at slot ``slot_mapping[i]`` (block ``slot // block_size``, offset ``slot % block_size``);
    negative slots skipped."""
    k, v = k_cache.clone(), v_cache.clone()
    bs = k.size(1) if kv_layout == "NHD" else k.size(2)
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, bs)
        if kv_layout == "NHD":
            k[blk, off], v[blk, off] = key[i], value[i]
        else:
            k[blk, :, off], v[blk, :, off] = key[i], value[i]
    return k, v


def _path(row):
    """The accepted nodes of one row: the entries before the first -1."""
    row = [int(x) for x in row]
    return row[: row.index(-1)] if -1 in row else row


def compact_kv_cache(k_cache, v_cache, start, accepted_nodes, kv_layout="NHD"):
    """Position ``start[b] + k`` of row ``b`` gets the entry that was at ``start[b] +
    accepted_nodes[b, k]`` (read from the untouched input, so no ordering question arises)."""
    k, v = k_cache.clone(), v_cache.clone()
    src_k = k_cache if kv_layout == "NHD" else k_cache.transpose(1, 2)
    src_v = v_cache if kv_layout == "NHD" else v_cache.transpose(1, 2)
    dst_k = k if kv_layout == "NHD" else k.transpose(1, 2)
    dst_v = v if kv_layout == "NHD" else v.transpose(1, 2)
    for b in range(accepted_nodes.size(0)):
        s0 = int(start[b])
        for t, node in enumerate(_path(accepted_nodes[b])):
            dst_k[b, s0 + t] = src_k[b, s0 + node]
            dst_v[b, s0 + t] = src_v[b, s0 + node]
    return k, v


def compact_paged_kv_cache(k_cache, v_cache, block_tables, start, accepted_nodes, kv_layout="NHD"):
    """As :func:`compact_kv_cache`, position ``p`` of sequence ``b`` being block
    ``block_tables[b, p // block_size]``, offset ``p % block_size``."""
    k, v = k_cache.clone(), v_cache.clone()
    bs = k.size(1) if kv_layout == "NHD" else k.size(2)
    view = (lambda c: c) if kv_layout == "NHD" else (lambda c: c.transpose(1, 2))
    for b in range(accepted_nodes.size(0)):
        s0 = int(start[b])

        def at(p, b=b):
            return int(block_tables[b, p // bs]), p % bs

        for t, node in enumerate(_path(accepted_nodes[b])):
            (db, do), (sb, so) = at(s0 + t), at(s0 + node)
            view(k)[db, do] = view(k_cache)[sb, so]
            view(v)[db, do] = view(v_cache)[sb, so]
    return k, v
