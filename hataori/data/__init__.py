"""Token shards: the format, `data prepare`, `data inspect`, the blending and packing loader, `data bench`."""
