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
